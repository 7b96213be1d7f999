"""``nara bench encoders``: Nära's VP8 encoder against aiortc's, on the same frames.

Two questions: what one frame costs (CPU time per frame, best of three
passes), and whether the output follows the target when it is changed on a
running encoder (bit rate over the two seconds after each change, and whether
the change cost a keyframe). aiortc's encoder is the baseline: it cannot go
under 250 kbit/s, and PyAV cannot change libvpx's rate once it is open.
"""

from __future__ import annotations

import argparse
import fractions
import time
from typing import Any

import av
import numpy as np

from .synthetic import source_luma

SIZES = ((640, 480, 500_000), (320, 180, 250_000))
RATE_STEPS = (1_000_000, 100_000, 30_000)


def moving_frames(width: int, height: int, count: int) -> list[av.VideoFrame]:
    """A moving gradient with a moving square: enough detail and motion to need bits."""
    frames = []
    chroma = np.full((height // 2, width), 128, dtype=np.uint8)
    for i in range(count):
        luma = source_luma(width, height, i)
        x = (i * 7) % max(width - 40, 1)
        luma[height // 3:height // 3 + 40, x:x + 40] = 255 - luma[height // 3:height // 3 + 40, x:x + 40]
        frame = av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")
        frame.pts = i * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        frames.append(frame)
    return frames


def nara_cost(frames: list[av.VideoFrame], width: int, height: int, rate: int) -> float:
    from mediaserver.video_encoders import Vp8Encoder, vp8_payloads

    encoder = Vp8Encoder(width, height, 30, rate)
    began = time.process_time()
    for i, frame in enumerate(frames):
        encoded = encoder.encode(frame, i * 3000)
        if encoded is not None:
            vp8_payloads(encoded, i)
    encoder.close()
    return (time.process_time() - began) / len(frames) * 1000


def aiortc_cost(frames: list[av.VideoFrame], rate: int) -> float:
    from aiortc.codecs import vpx

    encoder = vpx.Vp8Encoder()
    encoder.target_bitrate = rate
    began = time.process_time()
    for i, frame in enumerate(frames):
        encoder.encode(frame, i == 0)
    return (time.process_time() - began) / len(frames) * 1000


def rate_following(frames: list[av.VideoFrame], width: int, height: int) -> list[dict[str, Any]]:
    """Change the target every two seconds of video; measure what comes out."""
    from mediaserver.video_encoders import Vp8Encoder

    encoder = Vp8Encoder(width, height, 30, RATE_STEPS[0])
    rows = []
    index = 0
    for step, target in enumerate(RATE_STEPS):
        if step:
            encoder.set_target(bitrate=target)
        sizes, keyframes = 0, 0
        for frame_in_step in range(60):  # two seconds at 30 fps
            encoded = encoder.encode(frames[index % len(frames)], index * 3000)
            index += 1
            if encoded is not None:
                sizes += len(encoded.data)
                # A keyframe right after the change is one the change cost (later ones are the
                # encoder's regular keyframe interval).
                keyframes += int(encoded.keyframe and step > 0 and frame_in_step < 5)
        rows.append({"target_kbps": target // 1000, "out_kbps": round(sizes * 8 / 2 / 1000),
                     "keyframes_at_change": keyframes})
    encoder.close()
    return rows


def main(args: argparse.Namespace) -> int:
    print("CPU per frame (ms, best of 3), same frames:")
    print(f"  {'size':>9} {'kbit/s':>7} {'nara':>7} {'aiortc':>7} {'ratio':>6}")
    for width, height, rate in SIZES:
        frames = moving_frames(width, height, args.frames)
        nara = min(nara_cost(frames, width, height, rate) for _ in range(3))
        stock = min(aiortc_cost(frames, rate) for _ in range(3))
        print(f"  {width}x{height:<4} {rate // 1000:>7} {nara:>7.2f} {stock:>7.2f} {nara / stock:>6.2f}")
    print("Rate changed on a running encoder (640x360, 30 fps):")
    for row in rate_following(moving_frames(640, 360, 120), 640, 360):
        print(f"  target {row['target_kbps']:>5} kbit/s -> {row['out_kbps']:>5} kbit/s, "
              f"keyframes at the change: {row['keyframes_at_change']}")
    return 0
