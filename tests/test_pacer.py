"""The video pacer toward one subscriber, on a fake clock: what leaves when, and what waits for a keyframe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mediaserver.pacer import VideoPacer


class FakeTimers:
    """The pacer's timer, driven by hand: ``run_until`` fires what is due, in order, moving the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[tuple[float, int, Callable[[], None]]] = []
        self.count = 0

    def clock(self) -> float:
        return self.now

    def schedule(self, delay: float, callback: Callable[[], None]) -> Any:
        entry = (self.now + delay, self.count, callback)
        self.count += 1
        self.due.append(entry)
        timers = self

        class Handle:
            def cancel(self) -> None:
                if entry in timers.due:
                    timers.due.remove(entry)

        return Handle()

    def run_until(self, end: float) -> None:
        while self.due:
            entry = min(self.due)
            if entry[0] > end:
                break
            self.due.remove(entry)
            self.now = max(self.now, entry[0])
            entry[2]()
        self.now = max(self.now, end)


class Video:
    """One of the subscriber's videos: notes when each packet left."""

    def __init__(self, timers: FakeTimers) -> None:
        self.timers = timers
        self.sent: list[tuple[float, Any]] = []

    def release(self, item: Any, waited: float) -> None:
        self.sent.append((self.timers.now, item))


def offer(pacer: VideoPacer, video: Video, size: int, item: Any, resend: bool = False) -> bool:
    """What the forwarder does with each packet: send it if admitted, else queue it."""
    now = video.timers.now
    if pacer.admit(size, now):
        video.release(item, 0.0)
        return True
    return pacer.hold(video, size, item, now, resend=resend)


def make(**kwargs: Any) -> tuple[FakeTimers, VideoPacer, Video]:
    timers = FakeTimers()
    pacer = VideoPacer(clock=timers.clock, schedule=timers.schedule, **kwargs)
    return timers, pacer, Video(timers)


def test_a_keyframe_burst_leaves_at_the_pacing_rate_not_at_once() -> None:
    timers, pacer, video = make(factor=1.0, burst_time=0.03, queue_limit=1.0)
    pacer.allow(video, 80_000, 0.0)  # 10 kB a second
    for n in range(8):  # a keyframe and the frame after it: 8 kB in one go
        assert offer(pacer, video, 1000, n)
    assert len(video.sent) == 1  # one packet goes at once; the rest wait in the server
    timers.run_until(2.0)
    assert [item for _, item in video.sent] == list(range(8))  # in order, none lost
    times = [at for at, _ in video.sent]
    # 8 kB at 10 kB/s: the last leaves about 0.7 s after the first (the bucket starts with 0.3 kB in it)
    assert 0.65 <= times[-1] <= 0.75
    # at no moment more than the rate allows, with its burst and one packet
    for i, at in enumerate(times):
        assert (i + 1) * 1000 <= at * 10_000 + 300 + 1000 + 1e-6


def test_an_empty_queue_with_room_costs_no_timer() -> None:
    timers, pacer, video = make(factor=1.0)
    pacer.allow(video, 800_000, 0.0)  # 100 kB a second
    for n in range(50):  # a steady 40 kB/s: each packet finds room
        timers.run_until(n * 0.025)
        assert offer(pacer, video, 1000, n)
    assert len(video.sent) == 50 and all(at == n * 0.025 for n, (at, _) in enumerate(video.sent))
    assert timers.count == 0  # nothing ever waited


def test_a_burst_allowance_lets_a_few_packets_go_at_once() -> None:
    timers, pacer, video = make(factor=1.0, burst_time=0.04)
    pacer.allow(video, 800_000, 0.0)  # 100 kB a second: 4 kB of burst
    timers.run_until(1.0)
    for n in range(10):
        offer(pacer, video, 1000, n)
    assert len(video.sent) == 5  # 4 kB of tokens, and one packet more
    timers.run_until(1.1)
    assert len(video.sent) == 10


def test_a_long_burst_runs_no_further_ahead_of_the_allowance_than_its_lead_a_short_one_goes_at_the_factor() -> None:
    # The allowance is about what the link carries beside the sound: what video runs ahead of it waits in
    # the link's queue, and the sound with it. 10 kB a second allowed; 12.5 kB a second at most.
    def burst(kilobytes: int) -> list[float]:
        timers, pacer, video = make(factor=1.25, burst_time=0.0, queue_limit=50.0, ahead_time=0.1)
        pacer.allow(video, 80_000, 0.0)
        timers.run_until(1.0)  # (idle: both buckets full)
        for n in range(kilobytes):
            offer(pacer, video, 1000, n)
        timers.run_until(10.0)
        return [at - 1.0 for at, _ in video.sent]

    short = burst(4)  # 4 kB: within the lead (1 kB) at the factor's pace, it goes at 12.5 kB a second
    assert short[-1] == pytest.approx(3 / 12.5, abs=0.01)
    long = burst(9)  # a thin link's keyframe: the first part at the factor's pace, the rest at the allowance
    for i, at in enumerate(long):
        assert (i + 1) * 1000 <= at * 10_000 + 1000 + 1000 + 1e-6  # never more than the lead (and a packet) ahead
    assert long[-1] == pytest.approx((9 - 1 - 1) / 10, abs=0.02)  # 7 kB after the first at 10 kB/s, the lead's
    # 1 kB sooner
    assert long[4] < 4 / 10  # its start went faster than the allowance


def test_the_factor_scales_the_rate() -> None:
    timers, pacer, video = make(factor=1.5, burst_time=0.0, queue_limit=5.0, ahead_time=100.0)
    pacer.allow(video, 80_000, 0.0)
    for n in range(16):
        offer(pacer, video, 1000, n)
    timers.run_until(5.0)
    # 15 kB after the first packet at 15 kB/s
    assert abs(video.sent[-1][0] - 1.0) < 0.01


def test_two_videos_share_their_allowances_and_keep_their_order() -> None:
    timers, pacer, first = make(factor=1.0, burst_time=0.0, queue_limit=5.0)
    second = Video(timers)
    pacer.allow(first, 40_000, 0.0)
    pacer.allow(second, 40_000, 0.0)  # together 10 kB a second
    for n in range(5):
        offer(pacer, first, 1000, ("a", n))
        offer(pacer, second, 1000, ("b", n))
    timers.run_until(5.0)
    assert abs(max(at for at, _ in first.sent + second.sent) - 0.9) < 0.01
    assert [item for _, item in first.sent] == [("a", n) for n in range(5)]


def test_resends_leave_before_new_media() -> None:
    timers, pacer, video = make(factor=1.0, burst_time=0.0, queue_limit=5.0)
    pacer.allow(video, 80_000, 0.0)
    for n in range(4):
        offer(pacer, video, 1000, n)
    offer(pacer, video, 1000, "resend", resend=True)
    timers.run_until(5.0)
    assert [item for _, item in video.sent] == [0, "resend", 1, 2, 3]


def test_no_known_rate_paces_nothing() -> None:
    timers, pacer, video = make(queue_limit=10.0)
    for n in range(20):
        assert offer(pacer, video, 1200, n)
    assert len(video.sent) == 20 and timers.count == 0
    # and a rate that becomes unknown lets whatever waits go at once
    pacer.allow(video, 8_000, 0.0)
    for n in range(3):
        offer(pacer, video, 1200, n)
    pacer.allow(video, None, 0.0)
    timers.run_until(0.0)
    assert len(video.sent) == 23


def test_an_overflowing_queue_drops_that_videos_packets_and_says_so() -> None:
    timers, pacer, video = make(factor=1.0, burst_time=0.0, queue_limit=0.5)
    other = Video(timers)
    pacer.allow(video, 40_000, 0.0)
    pacer.allow(other, 40_000, 0.0)  # 10 kB a second: 5 kB may wait
    offer(pacer, video, 1000, "first")
    offer(pacer, other, 1000, "other's")
    offer(pacer, video, 1000, "resend", resend=True)
    accepted = [offer(pacer, video, 1000, n) for n in range(4)]
    assert accepted == [True, True, True, False]  # the fourth would make 5.0 kB + 1 kB wait
    assert pacer.dropped == 5  # its three queued packets, its resend (it would mend a picture the keyframe
    # awaited replaces) and this one
    # the other video's packet still goes; the dropped ones never do
    timers.run_until(5.0)
    assert [item for _, item in video.sent] == ["first"]
    assert [item for _, item in other.sent] == ["other's"]
    assert not pacer.waiting


def test_a_forgotten_video_sends_nothing_more() -> None:
    timers, pacer, video = make(factor=1.0, burst_time=0.0, queue_limit=5.0)
    pacer.allow(video, 80_000, 0.0)
    for n in range(5):
        offer(pacer, video, 1000, n)
    pacer.forget(video)
    timers.run_until(5.0)
    assert [item for _, item in video.sent] == [0]
    assert pacer.rate is None


def test_a_rate_that_rises_wakes_the_queue_sooner() -> None:
    timers, pacer, video = make(factor=1.0, burst_time=0.0, queue_limit=50.0)
    pacer.allow(video, 8_000, 0.0)  # 1 kB a second
    for n in range(3):
        offer(pacer, video, 1000, n)
    timers.run_until(0.5)
    pacer.allow(video, 800_000, 0.5)  # the estimate grew
    timers.run_until(0.6)
    assert len(video.sent) == 3


def test_a_discarded_queue_takes_no_turn_from_what_comes_after() -> None:
    timers, pacer, video = make(factor=1.0, burst_time=0.0, queue_limit=5.0)
    pacer.allow(video, 80_000, 0.0)  # 10 kB a second
    for n in range(5):
        offer(pacer, video, 1000, n)  # 0 goes; 1-4 wait
    pacer.discard(video)  # (the video moved to another level: what waits is stale)
    assert not pacer.waiting and pacer.queued_bytes == 0
    offer(pacer, video, 1000, "keyframe")
    timers.run_until(0.15)
    assert [item for _, item in video.sent] == [0, "keyframe"]
    assert video.sent[-1][0] == pytest.approx(0.1)  # its own turn, not behind four stale packets
    assert pacer.rate is not None  # (the video keeps its allowance)
