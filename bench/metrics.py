"""What a person would see and hear, computed from what a receiver decoded.

Video frames carry their number and capture time (bench/synthetic.py), so a
receiver knows which frame it got, how late, and how close to the source it
is (PSNR against the regenerated frame, scaled to the received size when the
server sent a lower layer). Freezes follow the W3C webrtc-stats definition.
Audio is a tone in 20 ms frames: missing frames are missing sound, and so are
frames the receiver had to conceal.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import av
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


def picture_psnr(luma: np.ndarray, stamp: FrameStamp, source_size: tuple[int, int] | None = None,
                 scene: str = "gradient") -> float:
    """PSNR of a decoded Y plane against its source (of ``scene``), below the stamp rows.

    ``source_size`` (width, height) is what the publisher sent; a picture that
    arrives smaller (a server-made layer) is compared with the source scaled
    down to its size, so the figure is the layer's own fidelity.
    """
    height, width = luma.shape
    top = 2 * _block_size(width)
    if source_size is None or source_size == (width, height):
        source = source_luma(width, height, stamp.frame, scene)
    else:
        original = source_luma(source_size[0], source_size[1], stamp.frame, scene)
        scaled = av.VideoFrame.from_ndarray(original, format="gray").reformat(width=width, height=height)
        source = scaled.to_ndarray()
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


def frozen_time(arrivals: list[float], start: float, end: float, unjudged: float = 0.5) -> float:
    """Seconds of [start, end) during which the picture stood still.

    W3C freezes, and what they cannot judge: a wait longer than ``unjudged``
    seconds before five intervals have set a mean, a picture that stopped
    coming (after the last frame, once the wait is long enough to be a
    freeze, the rest of the window is frozen), and the time before the first.
    """
    if not arrivals:
        return max(0.0, end - start)
    stalls = freezes(arrivals)
    early = arrivals[:6]
    stalls += [(a, b - a) for a, b in zip(early, early[1:], strict=False) if b - a >= unjudged]
    tail = arrivals[-31:]
    recent = [b - a for a, b in zip(tail, tail[1:], strict=False)]
    mean = sum(recent) / len(recent) if len(recent) >= 5 else None
    last = arrivals[-1]
    if end - last >= (unjudged if mean is None else max(3 * mean, mean + 0.150)):
        stalls.append((last, end - last))
    if arrivals[0] > start:
        stalls.append((start, arrivals[0] - start))  # nothing shown yet
    return sum(max(0.0, min(s + d, end) - max(s, start)) for s, d in stalls)


@dataclass(frozen=True)
class AudioReceipt:
    at: float  # seconds since the run began
    pts: int | None  # RTP media time of the frame, in ticks of ``rate``
    rate: int  # ticks per second
    duration: float  # seconds of sound
    played: bool  # carried the tone and was not concealed
    source: str | None = None  # Nära's receive path: "packet", "stretch", "shorten", "fec", "conceal"
    # or "silence"
    skipped: int | None = None  # Nära's receive path: frames it had passed over by then (to shrink its delay)


def audio_gap(receipts: list[AudioReceipt], start: float, end: float, slack: float = 0.2) -> float | None:
    """Share of the 20 ms audio frames due in [start, end) that did not play.

    A frame is due if its media time lies between the first and the last frame
    that arrived in the window; it played if it arrived with sound and was not
    concealed. A stream that stopped, or had not started, counts its silent
    time at either end of the window (beyond ``slack`` seconds) as gaps too.
    """
    window = [r for r in receipts if start <= r.at < end and r.pts is not None]
    span = end - start
    if span <= 0:
        return None
    if not window:
        return 1.0
    first = window[0]
    assert first.pts is not None
    due: set[int] = set()
    played: set[int] = set()
    for r in window:
        assert r.pts is not None
        ticks = (r.pts - first.pts) % (1 << 32)
        if ticks >= 1 << 31:
            ticks -= 1 << 32  # arrived out of order
        # A frame covers the 20 ms units from its start to its end, rounded alike, so that frames of any
        # length (a packet of 40 ms, one lengthened by a period or two) tile the units without gap or overlap.
        begins = ticks / r.rate / AUDIO_FRAME_S
        index = round(begins)
        units = range(index, max(index + 1, round(begins + r.duration / AUDIO_FRAME_S)))
        due.update(units)
        if r.played:
            played.update(units)
    expected = max(due) - min(due) + 1
    silent_ends = max(0.0, first.at - start - slack) + max(0.0, end - window[-1].at - slack)
    expected += round(silent_ends / AUDIO_FRAME_S)
    return 1 - len(played) / expected


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
    audio_receipts: list[AudioReceipt] = field(default_factory=list)
    seen_frames: set[int] = field(default_factory=set)

    def add_audio(self, receipt: AudioReceipt) -> None:
        self.audio_receipts.append(receipt)
        if receipt.played:
            self.audio_arrivals.append(receipt.at)

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
