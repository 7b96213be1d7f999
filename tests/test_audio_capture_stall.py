"""The kit's audio after its machine stalled: the packets' timestamps jump where the capture dropped time, so the
audio does not go out later than its timestamps say for good (a receiver would take every packet as late)."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack

from mediaserver.encoders import NORMAL, THIN_UPLINK, OpusProfile, OpusTrack
from mediaserver.opus import packet_samples

RATE = 48000
FRAME = 960  # 20 ms


class CapturedVoice(MediaStreamTrack):
    """20 ms frames stamped on the capture's clock; ``missing``: frame numbers a slow reader never got."""

    kind = "audio"

    def __init__(self, missing: range = range(0), restart_at: int | None = None) -> None:
        super().__init__()
        self.number = 0
        self.missing = missing
        self.restart_at = restart_at
        self.rng = np.random.default_rng(3)

    async def recv(self) -> av.AudioFrame:
        while self.number in self.missing:
            self.number += 1
        at = self.number if self.restart_at is None or self.number < self.restart_at else self.number - self.restart_at
        self.number += 1
        t = (np.arange(FRAME) + at * FRAME) / RATE
        pcm = np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 8000
        pcm += self.rng.standard_normal(FRAME) * 300
        frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, at * FRAME, fractions.Fraction(1, RATE)
        return frame


async def timestamps(source: MediaStreamTrack, profile: OpusProfile, count: int) -> list[tuple[int, int]]:
    """(timestamp, samples) of ``count`` packets."""
    track = OpusTrack(source)
    track.use(profile)
    packets = []
    for _ in range(count):
        packet = await track.recv()
        assert packet.pts is not None
        packets.append((int(packet.pts), packet_samples(bytes(packet))))
    return packets


@pytest.mark.parametrize("profile", [NORMAL, THIN_UPLINK], ids=["20ms", "60ms"])
async def test_after_the_capture_dropped_1_5_s_the_packets_are_stamped_when_their_sound_was_captured(
        profile: OpusProfile) -> None:
    dropped = range(100, 175)  # 1.5 s the reader lost after a stall of the machine
    stalled = await timestamps(CapturedVoice(dropped), profile, 120)
    unbroken = await timestamps(CapturedVoice(), profile, 120)
    steps = [b - a for (a, _), (b, _) in zip(stalled, stalled[1:], strict=False)]
    jumps = [step - samples for step, (_, samples) in zip(steps, stalled, strict=False) if step != samples]
    # One jump, by what was dropped give or take the packet under way (its frames go with the gap).
    assert len(jumps) == 1 and abs(jumps[0] - len(dropped) * FRAME) <= profile.packet_ms * RATE // 1000
    # From then on each packet carries the time its sound was captured: the capture's own clock.
    last_ts, _ = stalled[-1]
    last_unbroken, _ = unbroken[-1]
    assert last_ts - last_unbroken == len(dropped) * FRAME
    assert all(samples == profile.packet_ms * RATE // 1000 for _, samples in stalled[1:])


async def test_a_source_whose_time_goes_back_is_followed_without_a_jump() -> None:
    """A microphone opened again starts its clock anew: the packets go on, one unbroken clock."""
    packets = await timestamps(CapturedVoice(restart_at=50), NORMAL, 100)
    for (ts, samples), (next_ts, _) in zip(packets, packets[1:], strict=False):
        assert next_ts - ts == samples
