"""Growing the audio playout's delay ahead of need by lengthening frames of sound that is there.

A queue that fills on the listener's link holds the sound back. The playout
learns the delay it needs from the first spike; the frames it then lengthens
(by whole periods of the sound, crossfaded) grow the delay before the next
spike's packets are due, and nothing is concealed. When the delay is to come
down, frames are shortened the same way instead of passed over. These tests
run the resizing on real signals, the playout on a fake clock, and the track
on real Opus packets.
"""

from __future__ import annotations

import numpy as np
import pytest

from mediaserver.receive import PEAK_MEMORY, STRETCH_INTERVAL, AudioPlayout, PlayoutFrame
from mediaserver.receive_track import ReceivedAudioTrack
from mediaserver.stretch import MATCH_TIME, MAX_SHARE, MIN_SHARE, lengthen, shorten

from .test_receive_path import FRAME, PACKETS, RATE, TICK, Stream, queue_spikes, speech_like, steady

WINDOW = int(RATE * MATCH_TIME)


def tone(frequency: float, samples: int, channels: int = 1, start: int = 0) -> np.ndarray:
    t = (np.arange(samples) + start) / RATE
    wave = (8000 * np.sin(2 * np.pi * frequency * t)).astype(np.int16)
    return np.repeat(wave[:, None], channels, axis=1)


def largest_step(sound: np.ndarray) -> int:
    return int(np.abs(np.diff(sound[:, 0].astype(np.int64))).max())


@pytest.mark.parametrize("frequency", [110.0, 220.0, 440.0, 997.0])
def test_a_tone_is_lengthened_by_whole_periods_without_a_click(frequency: float) -> None:
    sound = tone(frequency, 2 * FRAME, channels=2)
    history, frame = sound[:FRAME], sound[FRAME:]
    longer = lengthen(history, frame, FRAME, RATE)
    added = len(longer) - FRAME
    assert MIN_SHARE * FRAME <= added <= MAX_SHARE * FRAME
    periods = added * frequency / RATE
    assert abs(periods - round(periods)) < 0.05  # a whole number of periods: the tone goes on in phase
    assert largest_step(longer) <= 1.05 * largest_step(sound)  # no click where it jumps back
    assert longer.shape[1] == 2 and (longer[:, 0] == longer[:, 1]).all()
    assert (longer[:FRAME // 2] == frame[:FRAME // 2]).all()  # the frame's own start ...
    assert (longer[-FRAME // 4:] == frame[-FRAME // 4:]).all()  # ... and its own end, so the next frame follows on
    # and the lengthened sound is the same tone throughout, at its full level
    spectrum = np.abs(np.fft.rfft(longer[:, 0].astype(np.float64)))
    assert abs(np.argmax(spectrum) * RATE / len(longer) - frequency) < RATE / len(longer)
    assert np.abs(longer[:, 0]).max() >= 0.95 * 8000


def test_a_voice_is_lengthened_by_its_pitch_period() -> None:
    rng = np.random.default_rng(1)
    voice = np.concatenate([speech_like(i, rng) for i in range(2)])[:, None]  # 200 Hz and its harmonics
    longer = lengthen(voice[:FRAME], voice[FRAME:], FRAME, RATE)
    added = len(longer) - FRAME
    assert added % (RATE // 200) in (0, 1, RATE // 200 - 1)  # whole 5 ms periods
    assert largest_step(longer) <= 1.1 * largest_step(voice)


def test_silence_and_noise_are_lengthened_too() -> None:
    silent = np.zeros((FRAME, 1), dtype=np.int16)
    assert (lengthen(silent, silent, FRAME, RATE) == 0).all()
    assert len(lengthen(silent, silent, FRAME, RATE)) > FRAME
    noise = np.random.default_rng(2).integers(-3000, 3000, size=(2 * FRAME, 1)).astype(np.int16)
    longer = lengthen(noise[:FRAME], noise[FRAME:], FRAME, RATE)
    assert MIN_SHARE * FRAME <= len(longer) - FRAME <= MAX_SHARE * FRAME


def test_the_first_frame_of_a_stream_reaches_back_only_into_itself() -> None:
    frame = tone(440.0, FRAME)
    longer = lengthen(frame[:0], frame, FRAME, RATE)
    assert MIN_SHARE * FRAME <= len(longer) - FRAME <= FRAME  # no more than the frame holds before its end
    assert largest_step(longer) <= 1.05 * largest_step(frame)
    too_short = frame[:100]
    assert (lengthen(frame[:0], too_short, FRAME, RATE) == too_short).all()


@pytest.mark.parametrize("frequency", [110.0, 220.0, 440.0, 997.0])
def test_a_tone_is_shortened_by_whole_periods_without_a_click(frequency: float) -> None:
    sound = tone(frequency, 3 * FRAME, channels=2)
    shorter = shorten(sound[FRAME:2 * FRAME], RATE)
    removed = FRAME - len(shorter)
    assert WINDOW <= removed <= FRAME - WINDOW
    periods = removed * frequency / RATE
    assert abs(periods - round(periods)) < 0.05
    played = np.concatenate([sound[:FRAME], shorter, sound[2 * FRAME:]])  # the frames around it follow on
    assert largest_step(played) <= 1.05 * largest_step(sound)
    assert np.abs(played[:, 0]).max() >= 0.95 * 8000
    assert shorter.shape[1] == 2 and (shorter[0] == sound[FRAME]).all()


def test_a_voice_is_shortened_by_its_pitch_periods() -> None:
    rng = np.random.default_rng(3)
    voice = np.concatenate([speech_like(i, rng) for i in range(3)])[:, None]
    shorter = shorten(voice[FRAME:2 * FRAME], RATE)
    assert (FRAME - len(shorter)) % (RATE // 200) in (0, 1, RATE // 200 - 1)
    played = np.concatenate([voice[:FRAME], shorter, voice[2 * FRAME:]])
    assert largest_step(played) <= 1.1 * largest_step(voice)
    too_short = voice[:WINDOW]
    assert (shorten(too_short, RATE) == too_short).all()


def test_frames_of_different_channels_are_refused() -> None:
    with pytest.raises(ValueError, match="same channels"):
        lengthen(tone(440.0, FRAME, channels=2), tone(440.0, FRAME), FRAME, RATE)
    with pytest.raises(ValueError, match="same channels"):
        lengthen(tone(440.0, FRAME)[:, 0], tone(440.0, FRAME), FRAME, RATE)


def spiky_run(can_stretch: bool) -> tuple[Stream, list[int]]:
    """Eight queue spikes of 0.15 s, 4 s apart, through a playout; the frames concealed around each."""
    spikes = [2.0 + 4.0 * k for k in range(8)]
    end = spikes[-1] + 4.0
    stream = Stream(AudioPlayout(can_recover=lambda packet: False, can_stretch=can_stretch))
    stream.run(queue_spikes(spikes, until=end), until=end - TICK)
    sources = stream.sources()
    return stream, [sources[int(s / TICK) - 10:int((s + 2) / TICK)].count("c") for s in spikes]


def test_a_filling_queue_is_met_by_lengthened_frames_and_only_its_first_spike_costs_sound() -> None:
    stretching, concealed = spiky_run(can_stretch=True)
    waiting, concealed_waiting = spiky_run(can_stretch=False)
    assert concealed[1:] == [0] * 7  # once the first spike has shown the delay needed, nothing is made up
    assert sum(concealed) < sum(concealed_waiting)  # the delay grew before the packets were missing, not after
    assert stretching.playout.counters.stretched == stretching.sources().count("S") > 0
    at = [t for t, frame in zip(stretching.played_at, stretching.played, strict=True) if frame.source == "stretch"]
    assert all(b - a >= STRETCH_INTERVAL - 1e-9 for a, b in zip(at, at[1:], strict=False))
    assert stretching.playout.delay <= stretching.playout.max_delay + TICK


def test_a_steady_link_is_never_stretched() -> None:
    stream = Stream(AudioPlayout(can_recover=lambda packet: False, can_stretch=True))
    stream.run([(i * TICK + 0.03, i) for i in range(300)], until=298 * TICK)
    assert stream.sources().count("S") == 0 and stream.playout.counters.concealed == 0


def test_the_delay_comes_down_by_shortened_frames_and_nothing_is_passed_over() -> None:
    quiet_from = 2.0 + 4.0 * 8
    quiet = steady(int((PEAK_MEMORY + 10.0) / TICK), start=int(quiet_from / TICK))
    runs = {}
    for can_stretch in (True, False):
        stream, _ = spiky_run(can_stretch)
        held = stream.playout.delay
        passed_over = stream.playout.counters.skipped
        stream.run(quiet, until=quiet[-1][0] - TICK)
        assert stream.playout.delay < held - 0.05  # a quiet link: the spikes forgotten, the delay comes down
        runs[can_stretch] = (stream.playout.counters, stream.playout.counters.skipped - passed_over)
    (resizing, passed_over), (_, dropped) = runs[True], runs[False]
    assert passed_over == 0 and resizing.shortened > 0 and resizing.concealed == runs[True][0].concealed
    assert dropped > 0  # a player that cannot shorten has frames passed over instead


def test_a_playout_is_told_how_much_a_frame_was_resized() -> None:
    playout = AudioPlayout(can_stretch=True)
    with pytest.raises(ValueError, match="more than the playout's whole delay"):
        playout.resized(-1.0)


async def test_the_track_plays_a_stretch_as_its_packet_lengthened_and_moves_the_playout_on() -> None:
    track = ReceivedAudioTrack(channels=1)
    playout = track.playout
    for i in range(3):
        playout.push(1000 + i, i * FRAME, PACKETS[i], i * TICK + 0.03)
    first = track._frame(PlayoutFrame("packet", PACKETS[0], 0))
    due_before = playout.next_due()
    assert due_before is not None
    longer = track._frame(PlayoutFrame("stretch", PACKETS[1], FRAME))
    assert track.last_frame_source == "stretch" and not track.last_frame_concealed
    assert MIN_SHARE * FRAME <= longer.samples - FRAME <= MAX_SHARE * FRAME
    assert playout.next_due() == pytest.approx(due_before + (longer.samples - FRAME) / RATE)
    assert longer.pts == first.samples  # the next frame's media time follows on from this one's length
    due_before = playout.next_due()
    assert due_before is not None
    shorter = track._frame(PlayoutFrame("shorten", PACKETS[2], 2 * FRAME))
    assert track.last_frame_source == "shorten" and WINDOW <= FRAME - shorter.samples <= FRAME - WINDOW
    assert playout.next_due() == pytest.approx(due_before - (FRAME - shorter.samples) / RATE)
    assert shorter.pts == first.samples + longer.samples
    track.stop()
