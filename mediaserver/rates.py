"""Bit rates measured over time: what a stream really carries, not what it was asked to."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 0.5  # seconds per sample
SMOOTHING = 0.3  # weight of the newest sample


@dataclass
class RateMeter:
    """Bits per second, smoothed over the last few half-second windows."""

    rate: float = 0.0
    latest: float = 0.0  # the last half-second window's rate, unsmoothed
    window_start: float | None = None
    window_bytes: int = 0

    @property
    def rising(self) -> float:
        """The smoothed rate, or the last window's if that is more: a rise shows within a window, not after
        the smoothing has followed it (an encoder given more uses it within half a second)."""
        return max(self.rate, self.latest)

    def add(self, size: int, now: float) -> None:
        self._roll(now)
        self.window_bytes += size

    def current(self, now: float) -> float:
        self._roll(now)
        return self.rate

    def _roll(self, now: float) -> None:
        if self.window_start is None:
            self.window_start = now
            return
        elapsed = now - self.window_start
        if elapsed < WINDOW:
            return
        sample = self.latest = self.window_bytes * 8 / elapsed
        first = self.rate == 0.0
        self.rate = sample if first else (1 - SMOOTHING) * self.rate + SMOOTHING * sample
        # A long silence counts as one sample of nothing, not many.
        self.window_start = now
        self.window_bytes = 0


BURST_WINDOW = 0.3  # seconds: a keyframe and the frame after it
BURST_MEMORY = 7.0  # seconds of a stream's bursts remembered: two keyframe intervals of a few seconds
BURST_BUCKET = 0.01  # seconds: packets this close together are counted together


@dataclass
class BurstMeter:
    """The most bits a stream sent within any ``BURST_WINDOW`` of the last ``BURST_MEMORY`` seconds.

    A stream's mean rate hides its bursts: at low rates a VP8 keyframe, and the frame after it
    (which makes up the detail the keyframe's coarse quantizer left out), carry most of a second's
    bits in a few hundred milliseconds, and on a link that is nearly full they queue the audio
    behind them past its playout time.

    The buckets are kept as two columns of floats, which the garbage collector does not track: kept
    as a ``[start, bytes]`` list each, every stream added about thirty tracked objects a second that
    lived for seconds, walked by the collector's passes as they aged through its generations while
    the loop, and every packet arriving, waited (docs/benchmarks.md, issue 9, "The young passes:
    what waited in the youngest generation").
    """

    starts: deque[float] = field(default_factory=deque)  # each bucket's first packet, oldest first
    sizes: deque[float] = field(default_factory=deque)  # bytes in each bucket

    def add(self, size: int, now: float) -> None:
        starts, sizes = self.starts, self.sizes
        if starts and now - starts[-1] < BURST_BUCKET:
            sizes[-1] += size
        else:
            starts.append(now)
            sizes.append(float(size))
            while now - starts[0] > BURST_MEMORY:
                starts.popleft()
                sizes.popleft()

    def peak(self, now: float) -> float:
        """Bits, in the fullest window of the remembered ones (0 for a stream not heard from lately)."""
        kept = [(start, size) for start, size in zip(self.starts, self.sizes, strict=True)
                if now - start <= BURST_MEMORY]
        best = total = 0.0
        first = 0
        for start, size in kept:
            total += size
            while start - kept[first][0] >= BURST_WINDOW:
                total -= kept[first][1]
                first += 1
            best = max(best, total)
        return best * 8
