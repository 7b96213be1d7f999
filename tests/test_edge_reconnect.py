"""The kit's reconnect decisions on a fake clock: back-off bounds, immediate retry, final states."""

from __future__ import annotations

import random

import pytest

from edge.reconnect import Backoff, Failure, Reconnector, State, Step


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    assert [backoff.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.ceiling(10_000) == 30.0


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 20])
def test_full_jitter_spreads_waits_over_the_whole_range(attempt: int) -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    rng = random.Random(attempt)
    waits = [backoff.delay(attempt, rng) for _ in range(2000)]
    ceiling = backoff.ceiling(attempt)
    assert all(0.0 <= w <= ceiling for w in waits)
    # Full jitter: as many kits near zero as near the ceiling, none bunched at one value.
    assert min(waits) < 0.05 * ceiling and max(waits) > 0.95 * ceiling
    assert 0.45 * ceiling < sum(waits) / len(waits) < 0.55 * ceiling


def test_kits_that_lose_the_same_server_do_not_come_back_together() -> None:
    retries = []
    for seed in range(50):
        machine = Reconnector(rng=random.Random(seed))
        machine.assigned(0.0)
        machine.connected(1.0)
        for n in range(5):
            machine.failed(100.0 + n, Failure.UNREACHABLE)
        assert machine.retry_at is not None
        retries.append(machine.retry_at)
    per_second = [sum(1 for r in retries if s <= r < s + 1) for s in range(104, 112)]
    assert max(per_second) <= 10  # at most a fifth of the kits come back in any one second


def test_first_call_path_waiting_then_assigned_then_connected() -> None:
    machine = Reconnector(rng=random.Random(1))
    assert machine.state is State.STARTING
    assert machine.next_step(0.0) is Step.ASK
    machine.asking(0.0)
    machine.idle(25.0)  # a long poll that ran its course
    assert machine.state is State.WAITING
    assert machine.next_step(25.0) is Step.ASK
    machine.asking(25.0)
    machine.assigned(27.0)
    assert (machine.state, machine.next_step(27.0)) == (State.CONNECTING, Step.JOIN)
    machine.connected(28.0)
    assert machine.state is State.CONNECTED
    assert [t.new for t in machine.transitions] == [State.WAITING, State.CONNECTING, State.CONNECTED]


def test_a_server_that_answers_idle_at_once_is_not_asked_in_a_loop() -> None:
    machine = Reconnector(ask_spacing=1.0)
    machine.asking(10.0)
    machine.idle(10.01)
    assert machine.next_step(10.5) is Step.PAUSE
    assert machine.next_step(11.0) is Step.ASK


def test_failures_back_off_within_bounds_and_growing() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    machine = Reconnector(backoff, random.Random(7))
    now = 0.0
    for attempt in range(12):
        wait = machine.failed(now, Failure.UNREACHABLE, "connection refused")
        assert 0.0 <= wait <= backoff.ceiling(attempt)
        assert machine.state is State.RECONNECTING
        assert machine.next_step(now) is Step.PAUSE or wait == 0.0
        assert machine.retry_at == now + wait
        now += wait
        assert machine.next_step(now) is Step.ASK
        machine.asking(now)
    assert machine.attempt == 12


def test_network_back_means_try_at_once() -> None:
    machine = Reconnector(Backoff(base=10.0, cap=30.0), random.Random(3))
    for n in range(4):
        machine.failed(float(n), Failure.NO_NETWORK, "name does not resolve")
    assert machine.state is State.NO_NETWORK
    assert machine.retry_at is not None and machine.retry_at > 4.0
    assert machine.next_step(4.0) is Step.PAUSE
    machine.server_answered(4.0)
    assert machine.next_step(4.0) is Step.ASK


def test_a_probe_answer_does_not_hurry_a_waiting_kit() -> None:
    machine = Reconnector(ask_spacing=1.0)
    machine.asking(0.0)
    machine.idle(0.1)
    machine.server_answered(0.2)
    assert machine.next_step(0.2) is Step.PAUSE


def test_a_long_good_call_starts_the_count_again() -> None:
    machine = Reconnector(Backoff(base=1.0, cap=30.0), random.Random(5), stable_after=10.0)
    for n in range(6):
        machine.failed(float(n), Failure.UNREACHABLE)
    machine.assigned(10.0)
    machine.connected(11.0)
    wait = machine.failed(60.0, Failure.HEARTBEAT, "no pong for 3 s")
    assert wait <= 1.0  # the first attempt's ceiling, not the sixth's
    assert machine.attempt == 1


def test_a_call_that_keeps_dropping_at_once_backs_off() -> None:
    machine = Reconnector(Backoff(base=1.0, cap=30.0), random.Random(5), stable_after=10.0)
    for n in range(6):
        machine.assigned(n * 40.0)
        machine.connected(n * 40.0 + 1)
        machine.failed(n * 40.0 + 2, Failure.MEDIA)
    assert machine.attempt == 6


def test_revoked_stops_for_good() -> None:
    machine = Reconnector()
    machine.assigned(0.0)
    machine.revoked(1.0, "device_revoked")
    assert machine.next_step(1.0) is Step.STOP
    machine.failed(2.0, Failure.UNREACHABLE)
    machine.server_answered(3.0)
    assert machine.state is State.REVOKED
    assert machine.next_step(100.0) is Step.STOP


def test_config_error_stops() -> None:
    machine = Reconnector()
    machine.config_error(0.0, "credential file missing")
    assert machine.next_step(0.0) is Step.STOP


def test_every_change_is_reported_once() -> None:
    seen = []
    machine = Reconnector(on_change=seen.append)
    machine.asking(0.0)
    machine.idle(1.0)
    machine.idle(2.0)  # the same state for the same reason: no new transition
    machine.failed(3.0, Failure.NO_NETWORK, "dns")
    assert [(t.old, t.new) for t in seen] == [
        (State.STARTING, State.WAITING), (State.WAITING, State.NO_NETWORK)]
    assert seen[-1].reason == "no_network: dns"
