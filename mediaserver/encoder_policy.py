"""What a video encoder decides, as plain objects over media time.

Time here is the 90 kHz RTP video clock, unwrapped to an ever-growing
integer (``MediaClock``), so every decision is exact and testable without
sleeping: which frames to keep for a frame rate (``FramePacer``), when a
keyframe is due (``KeyframeSchedule``) and which picture size and frame rate
suit a bitrate (``SizeSteps``).
"""

from __future__ import annotations

from dataclasses import dataclass

CLOCK_RATE = 90_000
MIN_BITRATE = 30_000
MAX_BITRATE = 4_000_000


def clamp_bitrate(bitrate: int) -> int:
    """A target bitrate within what Nära's encoders are asked to do (30 kbit/s … 4 Mbit/s)."""
    return max(MIN_BITRATE, min(MAX_BITRATE, int(bitrate)))


class MediaClock:
    """Turns 32-bit RTP timestamps into an ever-growing tick count.

    A step backwards of less than half the 32-bit range is taken as a
    reordered or repeated timestamp, not as a wrap.
    """

    def __init__(self) -> None:
        self._last: int | None = None
        self._ticks = 0

    def ticks(self, timestamp: int) -> int:
        timestamp &= 0xFFFFFFFF
        if self._last is not None:
            step = (timestamp - self._last) & 0xFFFFFFFF
            if step >= 1 << 31:
                step -= 1 << 32
            self._ticks += step
        self._last = timestamp
        return self._ticks


def valid_framerate(value: float) -> float:
    if not 0 < value <= 120:
        raise ValueError("frame rate must be above 0 and at most 120 per second")
    return float(value)


class FramePacer:
    """Keeps at most ``framerate`` frames per second of media time.

    Frames are kept on a grid of the target interval, so 30 fps in and 20
    fps out keeps two frames of every three; a source slower than the
    target passes untouched.
    """

    def __init__(self, framerate: float) -> None:
        self.framerate = framerate
        self._next_due: float | None = None

    @property
    def framerate(self) -> float:
        return self._framerate

    @framerate.setter
    def framerate(self, value: float) -> None:
        self._framerate = valid_framerate(value)

    @property
    def interval(self) -> float:
        return CLOCK_RATE / self._framerate

    def admit(self, now: int) -> bool:
        interval = self.interval
        if self._next_due is not None and now < self._next_due - interval * 0.1:
            return False
        if self._next_due is None or now > self._next_due + interval:
            self._next_due = now + interval  # first frame, or the source paused: start a new grid
        else:
            self._next_due += interval
        return True


class KeyframeSchedule:
    """When the next frame must be a keyframe.

    One every ``interval`` seconds of media time, and one on request, but
    requests that come within ``min_gap`` seconds of the last keyframe wait
    until that gap has passed, and any number of waiting requests give one
    keyframe. Any keyframe, whatever caused it, restarts the interval.
    """

    def __init__(self, interval: float = 3.0, min_gap: float = 0.5) -> None:
        if interval <= 0 or min_gap < 0:
            raise ValueError("keyframe interval must be positive and the gap not negative")
        self.interval = round(interval * CLOCK_RATE)
        self.min_gap = round(min_gap * CLOCK_RATE)
        self._last: int | None = None
        self._requested = False

    def request(self) -> None:
        self._requested = True

    @property
    def requested(self) -> bool:
        return self._requested

    def due(self, now: int) -> bool:
        if self._last is None:
            return True
        elapsed = now - self._last
        return elapsed >= self.interval or (self._requested and elapsed >= self.min_gap)

    def produced(self, now: int) -> None:
        """A keyframe went out at ``now``."""
        self._last = now
        self._requested = False


@dataclass(frozen=True)
class SizeStep:
    """A picture size (the source's divided by ``divisor``) and a frame rate cap, for rates below ``below``."""

    divisor: int
    max_framerate: float | None
    below: int | None  # bit/s; None for the full-size step


DEFAULT_STEPS = (
    SizeStep(divisor=1, max_framerate=None, below=None),
    SizeStep(divisor=2, max_framerate=10.0, below=150_000),
    SizeStep(divisor=4, max_framerate=7.0, below=60_000),
)


class SizeSteps:
    """Which size step suits a bitrate, without flapping.

    Down at once, as far as the rate calls for (one size change, one
    keyframe). Up, once ``hold`` seconds have passed since the last change,
    as far as the rate is ``up_margin`` above the thresholds: also one
    change, and no second wait between steps (after a link comes back, the
    publisher's encoder is the slowest part of the way up). Each change
    costs a keyframe, which a thin link pays for in queued sound: a rate
    near a threshold must not move the size often.
    """

    def __init__(self, steps: tuple[SizeStep, ...] = DEFAULT_STEPS, up_margin: float = 1.3, hold: float = 5.0) -> None:
        if steps[0].below is not None or any(s.below is None for s in steps[1:]):
            raise ValueError("the first step is the full size, every other step has a threshold")
        self.steps = steps
        self.up_margin = up_margin
        self.hold = round(hold * CLOCK_RATE)
        self.index = 0
        self._changed_at: int | None = None

    @property
    def current(self) -> SizeStep:
        return self.steps[self.index]

    def choose(self, bitrate: int, now: int) -> SizeStep:
        lower = self.index
        while lower + 1 < len(self.steps) and bitrate < (self.steps[lower + 1].below or 0):
            lower += 1
        if lower > self.index:
            self._move(lower, now)
        elif self.index > 0:
            held = self._changed_at is None or now - self._changed_at >= self.hold
            higher = self.index
            while higher > 0 and bitrate >= (self.steps[higher].below or 0) * self.up_margin:
                higher -= 1
            if higher < self.index and held:
                self._move(higher, now)
        return self.current

    def _move(self, index: int, now: int) -> None:
        self.index = index
        self._changed_at = now


def scaled_size(width: int, height: int, divisor: int) -> tuple[int, int]:
    """``width`` × ``height`` divided by ``divisor``, rounded to even numbers (4:2:0 needs them)."""
    return max(2, (width // divisor) & ~1), max(2, (height // divisor) & ~1)
