"""The synthetic camera's detailed scene: it needs the bit rate a fast link offers, and stays measurable."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from bench.metrics import picture_psnr
from bench.synthetic import FrameStamp, draw_stamp, read_stamp, source_luma
from mediaserver.video_encoders import Vp8Encoder

WIDTH, HEIGHT, FPS = 640, 360, 15


def encode(scene: str, bitrate: int, frames: int = 30) -> tuple[float, list[tuple[int, np.ndarray]]]:
    """kbit/s Nära's VP8 made of ``frames`` stamped frames after the first second, and the decoded pictures."""
    encoder = Vp8Encoder(WIDTH, HEIGHT, FPS, bitrate)
    decoder = av.CodecContext.create("vp8", "r")
    chroma = np.full((HEIGHT // 2, WIDTH), 128, dtype=np.uint8)
    size, pictures = 0, []
    for number in range(frames):
        luma = source_luma(WIDTH, HEIGHT, number, scene)
        draw_stamp(luma, FrameStamp(7, number, 1000 + number))
        frame = av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")
        frame.pts, frame.time_base = number * 6000, fractions.Fraction(1, 90000)
        encoded = encoder.encode(frame, number * 6000)
        if encoded is None:
            continue
        if number >= FPS:
            size += len(encoded.data)
        pictures += [(number, p.to_ndarray(format="yuv420p")[:HEIGHT]) for p in decoder.decode(av.Packet(encoded.data))]
    encoder.close()
    return size * 8 / ((frames - FPS) / FPS) / 1000, pictures


def test_the_detailed_scene_needs_more_than_two_megabits_where_the_gradient_needs_a_fraction() -> None:
    detailed, _ = encode("detailed", 4_000_000)
    gradient, _ = encode("gradient", 4_000_000)
    assert detailed > 2_000  # a 2 Mbit/s link can be filled
    assert gradient < 1_000


def test_the_detailed_scene_is_read_and_scored_at_a_low_rate_and_a_high_one() -> None:
    kbps, pictures = encode("detailed", 300_000)
    assert kbps < 450  # the encoder can follow a 300 kbit/s link down
    assert [read_stamp(luma).frame for _, luma in pictures] == [number for number, _ in pictures]
    assert len(pictures) >= 28  # (no frame dropped for the rate)
    assert min(picture_psnr(luma, read_stamp(luma), scene="detailed") for _, luma in pictures[FPS:]) > 28
    # At 2 Mbit/s the grain comes through, and the regenerated source has the same grain.
    _, sharp = encode("detailed", 2_000_000)
    detailed = min(picture_psnr(luma, read_stamp(luma), scene="detailed") for _, luma in sharp[FPS:])
    assert detailed > 34
    assert max(picture_psnr(luma, read_stamp(luma), scene="gradient") for _, luma in sharp[FPS:]) < detailed - 2


def test_an_unknown_scene_is_refused() -> None:
    with pytest.raises(ValueError, match="gradient, detailed"):
        source_luma(64, 48, 0, "snow")
