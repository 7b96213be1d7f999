"""What a person would see and hear, computed from what a receiver decoded.

Video frames carry their number and capture time (bench/synthetic.py), so a
receiver knows which frame it got, how late, and how close to the source it
is (PSNR against the regenerated frame). Freezes follow the W3C webrtc-stats
definition. Audio is a tone in 20 ms frames: missing frames are missing sound.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .synthetic import FrameStamp, _block_size, source_luma

AUDIO_FRAME_S = 0.02


@dataclass(frozen=True)
class Receipt:
    at: float  # wall-clock seconds since the run began
    frame: int
    latency_ms: float
    psnr_db: float | None


def psnr(received: np.ndarray, source: np.ndarray) -> float:
    diff = received.astype(np.float64) - source.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return 99.0 if mse == 0 else 10 * math.log10(255 * 255 / mse)


def picture_psnr(luma: np.ndarray, stamp: FrameStamp) -> float:
    """PSNR of a decoded Y plane against its source, below the stamp rows."""
    height, width = luma.shape
    top = 2 * _block_size(width)
    source = source_luma(width, height, stamp.frame)
    return psnr(luma[top:], source[top:])


def freezes(arrivals: list[float]) -> list[tuple[float, float]]:
    """(start, duration) of each freeze, W3C webrtc-stats: an interval between rendered
    frames of at least max(3 x mean, mean + 150 ms), the mean over the last 30 intervals."""
    found = []
    recent: deque[float] = deque(maxlen=30)
    for before, after in zip(arrivals, arrivals[1:], strict=False):
        interval = after - before
        if len(recent) >= 5:
            mean = sum(recent) / len(recent)
            if interval >= max(3 * mean, mean + 0.150):
                found.append((before, interval))
        recent.append(interval)
    return found


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class StreamRecord:
    """One receiver's view of one publisher."""

    receiver: str
    publisher: str
    receipts: list[Receipt] = field(default_factory=list)
    audio_arrivals: list[float] = field(default_factory=list)
    seen_frames: set[int] = field(default_factory=set)

    def add_frame(self, at: float, stamp: FrameStamp, latency_ms: float, psnr_db: float | None) -> None:
        if stamp.frame in self.seen_frames:
            return
        self.seen_frames.add(stamp.frame)
        self.receipts.append(Receipt(at, stamp.frame, latency_ms, psnr_db))

    def per_second(self, seconds: int) -> list[dict[str, float | None]]:
        stalls = freezes([r.at for r in self.receipts])
        rows = []
        for second in range(seconds):
            window = [r for r in self.receipts if second <= r.at < second + 1]
            latencies = [r.latency_ms for r in window]
            psnrs = [r.psnr_db for r in window if r.psnr_db is not None]
            frozen = sum(_overlap(start, length, second) for start, length in stalls)
            audio = sum(1 for a in self.audio_arrivals if second <= a < second + 1)
            rows.append({
                "fps": float(len(window)),
                "freeze_ms": frozen * 1000,
                "latency_p50_ms": quantile(latencies, 0.5),
                "latency_p95_ms": quantile(latencies, 0.95),
                "psnr_db": sum(psnrs) / len(psnrs) if psnrs else None,
                "audio_missing": max(0.0, 1 - audio * AUDIO_FRAME_S),
            })
        return rows

    def summary(self, start: float, end: float) -> dict[str, float | int | None]:
        window = [r for r in self.receipts if start <= r.at < end]
        span = end - start
        stalls = [(s, d) for s, d in freezes([r.at for r in self.receipts]) if start <= s < end]
        psnrs = [r.psnr_db for r in window if r.psnr_db is not None]
        audio = sum(1 for a in self.audio_arrivals if start <= a < end)
        return {
            "fps": len(window) / span,
            "freeze_count": len(stalls),
            "freeze_s": sum(d for _, d in stalls),
            "latency_p50_ms": quantile([r.latency_ms for r in window], 0.5),
            "latency_p95_ms": quantile([r.latency_ms for r in window], 0.95),
            "psnr_db": sum(psnrs) / len(psnrs) if psnrs else None,
            "audio_missing": max(0.0, 1 - audio * AUDIO_FRAME_S / span),
        }


def _overlap(start: float, length: float, second: int) -> float:
    return max(0.0, min(start + length, second + 1) - max(start, second))
