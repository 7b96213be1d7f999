"""How fast the kit may upload photos: a token bucket under a rate that yields to the call.

Photos go beside the call, never in its way. The upload's rate has a
configured ceiling; while a call is up it is a scavenger, like LEDBAT
(RFC 6817): it watches the call's round-trip time (from the RTCP receiver
reports the server sends the kit) against the lowest seen lately, the
"base". Queueing delay above ``target`` means the upload is filling the
link's queue ahead of the call's audio: the rate is cut by a quarter (at most
once per ``cut_interval``). A call starts the rate low (``call_start``); until
the first sign of a queue (half the target) it grows quickly, by 2^0.7 a
second (a slow start, so a photo beside a call on a good link still takes
seconds, not minutes); after that slowly, by at most ``growth`` of itself per
second (and at least ``min_step``), in proportion to how far below the target
the delay is. It never goes under ``floor``, so a photo still arrives on the
worst link, and never over the ceiling. Without a call the ceiling applies.
While the latest round trip is older than ``stale_after`` the rate holds: a
report stops coming when it is lost or stuck behind a long queue, so its
silence is no sign that the link is free. Nor does it grow while more than
``busy_after`` seconds of bytes wait unsent in the upload's socket: TCP is
not keeping up with the rate (losses to repair), so a low queue says nothing
of what the rate would do; grown there, the rate stood far above the link's
and sent the backlog in a rush once TCP caught up.

In a fluid model of a 256 kbit/s uplink with a 32 kbit/s call and a receiver
report a second (tests/test_edge_pacing.py), the queue in front of the audio
peaks once at about 250 ms when the slow start ends and then stays under
about 100 ms (20 ms on average) while the photo gets 95 % of what the call
leaves; beside a call on 2 Mbit/s a 3 MB photo takes about 18 s.

Bytes are paced by ``TokenBucket``; a PATCH carries about ``chunk_seconds``
of bytes at the current rate (``chunk_size``), so a chunk lost to an outage
costs little. Everything here takes ``now`` as an argument.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

KIB = 1024
MIN_CHUNK = 16 * KIB
MAX_CHUNK = 1024 * KIB


@dataclass(frozen=True)
class RttSample:
    """The call's round-trip time in seconds, and when it was learnt (the caller's clock)."""

    rtt: float
    at: float


@dataclass(frozen=True)
class CallSignal:
    """What the upload knows of the call: whether one is up, and its latest round trip (None until measured)."""

    in_call: bool
    rtt: RttSample | None = None


NO_CALL = CallSignal(False)


class TokenBucket:
    """Bytes at ``rate`` per second, with at most ``burst`` bytes at once."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self.rate = rate

    def take(self, size: int, now: float) -> float:
        """Take ``size`` bytes; how long to wait before sending them (0 if at once)."""
        self._refill(now)
        self._tokens -= size
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now


@dataclass(frozen=True)
class ScavengerSettings:
    ceiling: float  # bytes per second
    floor: float = 2 * KIB  # 16 kbit/s
    target: float = 0.060  # seconds of queueing delay the call's audio may be given
    base_window: float = 120.0  # the base RTT is the lowest of the last this many seconds
    cut: float = 0.75
    cut_interval: float = 1.0
    growth: float = 0.08  # at most this fraction of the rate, per second
    slow_start: float = 0.7  # until the first sign of a queue the rate doubles each second (2 ** (1.0 × s))
    min_step: float = 1 * KIB  # bytes per second per second
    stale_after: float = 2.0  # seconds: an older round trip says nothing of the queue now; the rate holds
    busy_after: float = 1.0  # seconds of bytes unsent in the socket: TCP is not keeping up; the rate does not grow
    call_start: float = 8 * KIB  # where the rate starts when a call begins (64 kbit/s)


class ScavengerRate:
    """The upload's rate, from the call's round-trip times."""

    def __init__(self, settings: ScavengerSettings) -> None:
        self.settings = settings
        self.rate = settings.ceiling
        self.base: float | None = None
        self.queueing: float | None = None
        self._history: deque[tuple[float, float]] = deque()  # (at, rtt), kept increasing in rtt
        self._last: RttSample | None = None
        self._updated_at: float | None = None
        self._cut_at = float("-inf")
        self._calling = False
        self._starting = False  # in slow start: no queue seen yet in this call

    @property
    def in_call(self) -> bool:
        return self._calling

    def set_ceiling(self, ceiling: float) -> None:
        self.settings = ScavengerSettings(**{**self.settings.__dict__, "ceiling": ceiling})
        self.rate = min(self.rate, ceiling) if self.in_call else ceiling

    def update(self, now: float, sample: RttSample | None, in_call: bool | None = None, unsent: int = 0) -> float:
        """The rate at ``now``; ``sample`` is the call's latest RTT, or None without a call.

        ``in_call`` says a call is up even before its first RTT (it defaults to ``sample is not None``):
        the rate then stays at the call's starting rate until there is a measurement. ``unsent``: bytes
        waiting unsent in the upload's socket.
        """
        s = self.settings
        in_call = sample is not None if in_call is None else in_call
        if not in_call:
            self._history.clear()
            self._last, self.base, self.queueing = None, None, None
            self._calling = False
            self.rate = s.ceiling
            self._updated_at = now
            return self.rate
        if not self._calling:
            self._calling = self._starting = True
            self.rate = max(s.floor, min(self.rate, s.call_start))  # a call begins: start low, grow
            self._updated_at = now
        if sample is None:
            self._updated_at = now
            return self.rate  # nothing measured yet: hold
        if self._last is None:
            self._updated_at = now  # growth counts from the first measurement
        if sample != self._last:
            self._learn(sample)
        self._last = sample
        assert self.base is not None
        queueing = max(0.0, sample.rtt - self.base)
        self.queueing = queueing
        elapsed = max(0.0, now - (self._updated_at if self._updated_at is not None else now))
        self._updated_at = now
        if now - sample.at > s.stale_after:
            # No report for a while: lost, or stuck behind a queue that has grown long. No news is not
            # good news: grown on an old "no queue", the rate ran to the ceiling while the audio waited.
            return self.rate
        if unsent > s.busy_after * self.rate and queueing <= s.target:
            return self.rate  # TCP is behind the rate: no growth (a queue above the target still cuts)
        if queueing > s.target:
            self._starting = False
            if now - self._cut_at >= s.cut_interval:
                self.rate *= s.cut
                self._cut_at = now
        elif self._starting and queueing < s.target / 2:
            self.rate *= 2.0 ** (s.slow_start * elapsed)
        else:
            self._starting = False
            off_target = 1.0 - queueing / s.target
            self.rate += off_target * max(s.min_step, s.growth * self.rate) * elapsed
        self.rate = min(s.ceiling, max(s.floor, self.rate))
        return self.rate

    def _learn(self, sample: RttSample) -> None:
        history = self._history
        while history and history[-1][1] >= sample.rtt:
            history.pop()
        history.append((sample.at, sample.rtt))
        while history[0][0] < sample.at - self.settings.base_window:
            history.popleft()
        self.base = history[0][1]


def chunk_size(rate: float, seconds: float = 1.5, smallest: int = MIN_CHUNK, largest: int = MAX_CHUNK) -> int:
    """Bytes per PATCH: about ``seconds`` at ``rate`` bytes per second, within the bounds."""
    return int(min(largest, max(smallest, rate * seconds)))
