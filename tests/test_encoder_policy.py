"""The video encoders' decisions, on exact media time: frame pacing, keyframes, size steps."""

from __future__ import annotations

import pytest

from mediaserver.encoder_policy import (
    CLOCK_RATE,
    FramePacer,
    KeyframeSchedule,
    MediaClock,
    SizeSteps,
    clamp_bitrate,
    scaled_size,
)

FRAME_30 = CLOCK_RATE // 30


def kept(pacer: FramePacer, timestamps: list[int]) -> list[int]:
    return [t for t in timestamps if pacer.admit(t)]


@pytest.mark.parametrize(("source_fps", "target_fps", "expected_per_second"), [
    (30, 30, 30), (30, 20, 20), (30, 15, 15), (30, 10, 10), (30, 7, 7), (15, 30, 15), (30, 1, 1),
])
def test_pacer_keeps_the_target_frame_rate(source_fps: int, target_fps: int, expected_per_second: int) -> None:
    pacer = FramePacer(target_fps)
    step = CLOCK_RATE // source_fps
    timestamps = [i * step for i in range(source_fps * 4)]
    assert len(kept(pacer, timestamps)) == pytest.approx(expected_per_second * 4, abs=1)


def test_pacer_tolerates_capture_jitter_and_restarts_after_a_pause() -> None:
    pacer = FramePacer(15)
    jittered = [i * 6000 + (300 if i % 2 else -300) for i in range(30)]
    assert len(kept(pacer, jittered)) == 30
    assert pacer.admit(30 * 6000 + 10 * CLOCK_RATE)  # ten seconds later: kept, on a new grid
    assert not pacer.admit(30 * 6000 + 10 * CLOCK_RATE + 1000)


def test_pacer_takes_a_new_rate_at_once() -> None:
    pacer = FramePacer(30)
    assert len(kept(pacer, [i * FRAME_30 for i in range(30)])) == 30
    pacer.framerate = 10
    assert len(kept(pacer, [(30 + i) * FRAME_30 for i in range(30)])) == 10


def test_keyframes_come_every_interval_and_on_request_merged() -> None:
    schedule = KeyframeSchedule(interval=2.0, min_gap=0.5)
    keys = []
    for i in range(30 * 5):
        now = i * FRAME_30
        if i in (5, 6, 7, 40, 41, 42):  # two bursts of requests
            schedule.request()
        if schedule.due(now):
            schedule.produced(now)
            keys.append(i)
    # The first burst comes within half a second of the keyframe at 0: it waits for
    # the gap and gets one keyframe (15). The second is served at once (40); its later
    # requests may come from a receiver that lost that keyframe, so they get one more,
    # half a second on (55). Any keyframe restarts the interval (55 + 60).
    assert keys == [0, 15, 40, 55, 115]


def test_requests_never_wait_longer_than_the_gap() -> None:
    schedule = KeyframeSchedule(interval=10.0, min_gap=0.5)
    schedule.produced(0)
    schedule.request()
    assert not schedule.due(CLOCK_RATE // 2 - 1)
    assert schedule.due(CLOCK_RATE // 2)


@pytest.mark.parametrize(("rates", "expected_steps"), [
    ([500_000, 140_000, 100_000], [0, 1, 1]),  # down below 150 kbit/s
    ([500_000, 40_000], [0, 2]),  # straight to a quarter: one change
    ([140_000, 160_000, 190_000], [1, 1, 1]),  # not back up inside the margin (195 kbit/s)
])
def test_size_steps_follow_the_rate(rates: list[int], expected_steps: list[int]) -> None:
    steps = SizeSteps()
    chosen = [steps.steps.index(steps.choose(rate, i * CLOCK_RATE * 10)) for i, rate in enumerate(rates)]
    assert chosen == expected_steps


def test_size_steps_go_up_after_holding_as_far_as_the_rate_allows() -> None:
    steps = SizeSteps(hold=2.0)
    assert steps.choose(40_000, 0).divisor == 4
    assert steps.choose(1_000_000, 1 * CLOCK_RATE).divisor == 4  # held
    assert steps.choose(1_000_000, 2 * CLOCK_RATE).divisor == 1  # both steps at once: one keyframe
    assert steps.current.max_framerate is None
    steps = SizeSteps(hold=2.0)
    assert steps.choose(40_000, 0).divisor == 4
    assert steps.choose(100_000, 2 * CLOCK_RATE).divisor == 2  # (not above 150 kbit/s by the margin)
    assert steps.choose(1_000_000, 3 * CLOCK_RATE).divisor == 2  # held again
    assert steps.choose(1_000_000, 4 * CLOCK_RATE).divisor == 1


def test_size_steps_do_not_flap_on_a_rate_around_the_threshold() -> None:
    steps = SizeSteps()
    changes = 0
    previous = steps.current
    for i in range(200):
        rate = 150_000 + (10_000 if i % 2 else -10_000)
        step = steps.choose(rate, i * CLOCK_RATE)
        changes += step != previous
        previous = step
    assert changes == 1


def test_media_clock_unwraps_32_bit_timestamps() -> None:
    clock = MediaClock()
    start = 0xFFFFFFFF - 3000
    assert clock.ticks(start) == 0
    assert clock.ticks(start + 3000) == 3000
    assert clock.ticks((start + 6000) & 0xFFFFFFFF) == 6000  # wrapped
    assert clock.ticks((start + 3000) & 0xFFFFFFFF) == 3000  # a late one goes back, not forward 13 h


def test_bitrate_and_size_helpers() -> None:
    assert clamp_bitrate(5_000) == 30_000
    assert clamp_bitrate(50_000_000) == 4_000_000
    assert scaled_size(640, 360, 4) == (160, 90)
    assert scaled_size(642, 362, 4) == (160, 90)
    assert scaled_size(1280, 720, 3) == (426, 240)
