"""Bit rates measured over time: what a stream really carries, not what it was asked to."""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 0.5  # seconds per sample
SMOOTHING = 0.3  # weight of the newest sample


@dataclass
class RateMeter:
    """Bits per second, smoothed over the last few half-second windows."""

    rate: float = 0.0
    window_start: float | None = None
    window_bytes: int = 0

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
        sample = self.window_bytes * 8 / elapsed
        first = self.rate == 0.0
        self.rate = sample if first else (1 - SMOOTHING) * self.rate + SMOOTHING * sample
        # A long silence counts as one sample of nothing, not many.
        self.window_start = now
        self.window_bytes = 0
