"""Which level each subscriber gets: down at once, up only when the link has proven itself, paused below the floor."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import av
import numpy as np

from mediaserver.ladder import (
    DEFAULT_LAYERS,
    HELD_WANTS,
    PAUSED,
    SOURCE_HEADROOM,
    UP_HOLD,
    LayerChooser,
    available_levels,
)
from mediaserver.rates import BurstMeter
from mediaserver.video_encoders import Vp8Encoder

SOURCE = len(DEFAULT_LAYERS)
LEVELS = available_levels(DEFAULT_LAYERS, source_rate=1_000_000)  # 50k, 150k, 400k, original 1.1M


def run(chooser: LayerChooser, budgets: list[tuple[float, float]], step: float = 0.25) -> list[tuple[float, int]]:
    """Feed (until_time, budget) phases; return (time, level) whenever the level changes."""
    changes: list[tuple[float, int]] = []
    t, last = 0.0, None
    for until, budget in budgets:
        while t < until:
            level = chooser.choose(t, budget, LEVELS)
            if level != last:
                changes.append((t, level))
                last = level
            t += step
    return changes


def test_the_original_goes_only_to_links_that_can_carry_it() -> None:
    assert LEVELS == [(0, 50_000.0), (1, 150_000.0), (2, 400_000.0), (SOURCE, 1_100_000.0)]
    assert LayerChooser().choose(0.0, 4_000_000, LEVELS) == SOURCE
    assert LayerChooser().choose(0.0, 300_000, LEVELS) == 1
    assert LayerChooser().choose(0.0, 100_000, LEVELS) == 0


def test_layers_no_cheaper_or_smaller_than_the_original_are_not_offered() -> None:
    levels = available_levels(DEFAULT_LAYERS, source_rate=300_000)
    assert [level for level, _ in levels] == [0, 1, SOURCE]
    levels = available_levels(DEFAULT_LAYERS, source_rate=2_000_000, source_size=(320, 240))
    assert [level for level, _ in levels] == [0, 1, SOURCE]


def test_layers_keep_the_shape_of_the_original() -> None:
    assert [spec.size((640, 480)) for spec in DEFAULT_LAYERS] == [(120, 90), (240, 180), (480, 360)]
    assert [spec.size((1280, 720)) for spec in DEFAULT_LAYERS] == [(160, 90), (320, 180), (640, 360)]


def test_down_at_once_up_only_after_the_budget_has_held() -> None:
    chooser = LayerChooser()
    changes = run(chooser, [(10.0, 2_000_000), (20.0, 300_000), (40.0, 2_000_000)])
    assert changes[0] == (0.0, SOURCE)
    assert changes[1] == (10.0, 1)  # the first decision after the drop
    up = changes[2]
    assert up[1] == SOURCE
    assert 20.0 + UP_HOLD <= up[0] <= 20.0 + UP_HOLD + 1.0  # not before the link has held, not much later


def test_a_flapping_budget_does_not_flap_the_level() -> None:
    chooser = LayerChooser()
    phases = []
    for second in range(20):
        phases.append((second + 0.5, 2_000_000.0))
        phases.append((second + 1.0, 300_000.0))
    changes = run(chooser, phases)
    assert [level for _, level in changes] == [SOURCE, 1]


def test_pauses_below_the_lowest_layer_and_resumes_by_itself() -> None:
    chooser = LayerChooser()
    changes = run(chooser, [(5.0, 100_000), (10.0, 45_000), (15.0, 30_000), (30.0, 120_000)])
    levels = [level for _, level in changes]
    assert levels == [0, PAUSED, 0]
    paused_at = changes[1][0]
    assert 10.0 <= paused_at < 10.5  # 45 kbit/s is on the edge: the lowest layer stays; 30 kbit/s pauses
    assert changes[2][0] >= 15.0 + UP_HOLD


def test_wanted_is_more_of_the_original_or_the_lowest_layer_while_paused() -> None:
    chooser = LayerChooser()
    chooser.choose(0.0, 200_000, LEVELS)
    assert chooser.wanted(LEVELS, cap_limited=False) == 1_100_000 * 1.2
    paused = LayerChooser()
    paused.choose(0.0, 10_000, LEVELS)
    assert paused.wanted(LEVELS, cap_limited=False) == 50_000
    on_top = LayerChooser()
    on_top.choose(0.0, 4_000_000, LEVELS)
    assert on_top.wanted(LEVELS, cap_limited=True) == 1_100_000 * HELD_WANTS
    assert on_top.wanted(LEVELS, cap_limited=False) == 1_100_000 * 1.2


def test_a_publisher_capped_below_every_layer_still_plays_above_the_lowest_layers_rate() -> None:
    levels = available_levels(DEFAULT_LAYERS, source_rate=60_000)  # no layer is worth making
    assert levels == [(SOURCE, 66_000.0)]
    chooser = LayerChooser()
    assert chooser.choose(0.0, 70_000, levels, floor=50_000) == SOURCE
    assert chooser.choose(1.0, 55_000, levels, floor=50_000) == SOURCE  # a little short: the cap will follow
    assert chooser.choose(2.0, 30_000, levels, floor=50_000) == PAUSED


def test_an_original_not_yet_measured_is_not_free() -> None:
    levels = available_levels(DEFAULT_LAYERS, source_rate=0)
    assert LayerChooser().choose(0.0, 300_000, levels) == 1


def test_a_budget_resting_on_a_guess_keeps_the_level_but_raises_it_only_as_far_as_the_link_carried() -> None:
    chooser = LayerChooser()
    assert chooser.choose(0.0, 270_000, LEVELS, rise_budget=60_000) == 0  # first: the lowest layer
    for t in (1.0, 2.0, 3.0):
        assert chooser.choose(t, 270_000, LEVELS, rise_budget=60_000) == 0  # 180p would fit the guess: no
    assert chooser.choose(4.0, 270_000, LEVELS, rise_budget=160_000) == 0  # carried enough for 180p: after a hold
    assert chooser.choose(4.0 + UP_HOLD, 270_000, LEVELS, rise_budget=160_000) == 1
    assert chooser.choose(6.0, 30_000, LEVELS, rise_budget=160_000) == PAUSED  # down on the budget, at once


def test_a_burst_meter_finds_the_fullest_window_and_forgets_old_bursts() -> None:
    meter = BurstMeter()
    for frame in range(24):  # 8 frames a second, 1000 bytes each, and a keyframe of 4000 at 1 s
        meter.add(4000 if frame == 8 else 1000, frame / 8)
    assert meter.peak(3.0) == (4000 + 2 * 1000) * 8  # the keyframe and two more frames within 0.3 s
    for frame in range(24, 96):
        meter.add(1000, frame / 8)
    assert meter.peak(12.0) == 3 * 1000 * 8  # the keyframe is eleven seconds old: forgotten


def test_a_burst_meter_keeps_seconds_of_bursts_without_objects_the_collector_walks() -> None:
    meter = BurstMeter()
    meter.add(1000, 0.0)
    gc.collect()
    before = len(gc.get_objects())
    for frame in range(1, 300):  # 25 frames a second for 12 s, each a little larger: the last 7 s remembered
        meter.add(1000 + frame, frame / 25)
    gc.collect()
    assert len(gc.get_objects()) - before < 10  # not an object per bucket
    assert meter.peak(12.0) == sum(1000 + frame for frame in range(292, 300)) * 8  # the fullest 0.3 s: the last


def test_a_level_whose_keyframes_would_hold_up_the_audio_does_not_fit_a_thin_link() -> None:
    # Nära's VP8 at 78 kbit/s (320x180, 10 fps; a thin link's original): a keyframe and the frame after it
    # put most of a second's bits into 0.3 s; at 2 Mbit/s its bursts are within what the rate needs.
    thin, fast = encoded_bursts(78_000, (320, 180), 10), encoded_bursts(2_000_000, (640, 360), 15)
    levels = available_levels(DEFAULT_LAYERS, source_rate=thin.rate, bursts={SOURCE: thin.peak})
    assert levels[-1][1] >= 1.5 * thin.rate * SOURCE_HEADROOM
    budget = 1.2 * thin.rate  # room for its mean rate, but not for its keyframes
    assert LayerChooser().choose(0.0, budget, levels) == 0
    levels = available_levels(DEFAULT_LAYERS, source_rate=fast.rate, bursts={SOURCE: fast.peak})
    assert levels[-1][1] == fast.rate * SOURCE_HEADROOM
    assert LayerChooser().choose(0.0, 1.2 * fast.rate, levels) == SOURCE


@dataclass(frozen=True)
class Bursts:
    rate: float  # bit/s
    peak: float  # bits in the fullest 0.3 s


def encoded_bursts(bitrate: int, size: tuple[int, int], framerate: float, seconds: float = 8.0) -> Bursts:
    """Nära's VP8 encoder over the bench's moving gradient (keyframes every 3 s), measured as the ladder does."""
    from bench.synthetic import source_luma

    encoder = Vp8Encoder(size[0], size[1], framerate, bitrate)
    meter, total, chroma = BurstMeter(), 0, np.full((180, 640), 128, dtype=np.uint8)
    try:
        for number in range(int(seconds * 15)):
            picture = av.VideoFrame.from_ndarray(np.vstack([source_luma(640, 360, number), chroma]), format="yuv420p")
            frame = encoder.encode(picture, number * 6000)
            if frame is not None and number >= 15:  # (after the first second)
                meter.add(len(frame.data), number / 15)
                total += len(frame.data)
    finally:
        encoder.close()
    return Bursts(rate=total * 8 / (seconds - 1.0), peak=meter.peak(seconds))


def test_a_publisher_given_more_is_held_by_its_cap_until_its_encoder_has_had_time_to_use_it() -> None:
    from typing import Any, cast

    from mediaserver.forwarder import CAP_SETTLE, Publication

    now = [0.0]
    publication = Publication("kit", "video", cast(Any, None), clock=lambda: now[0])
    publication.meter.rate = 280_000.0  # all of a 300 kbit/s cap (its encoder keeps a tenth spare)
    publication.rate_cap = 300_000
    publication.caps.append((0.0, 300_000))
    assert publication.held_by_cap(0.5)
    now[0] = 1.0
    publication.rate_cap = 1_200_000  # a probe proved the subscriber's link: four times the cap
    publication.caps.append((1.0, 1_200_000))
    assert publication.held_by_cap(1.5)  # (its encoder has not yet used the new cap: still held)
    assert not publication.held_by_cap(1.0 + CAP_SETTLE + 0.1)  # it did not: its picture needs no more
    publication.meter.rate = 1_100_000.0
    assert publication.held_by_cap(1.0 + CAP_SETTLE + 0.1)
