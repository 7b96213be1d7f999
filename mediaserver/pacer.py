"""Video toward one subscriber, at no more than its link can take: the sound goes first.

On a thin link a keyframe and the frame after it carry most of a second's
bits in a few tens of milliseconds. Forwarded as they come, they sit in the
link's queue, and every audio packet sent after them waits behind them, past
its playout time (a 150 kbit/s link takes a quarter of a second to carry
them). A pacer keeps that queue in the server instead: video leaves toward a
subscriber at no more than a rate set from its estimate, and its audio, which
never passes through here, overtakes whatever video waits.

* A token bucket: the rate is ``PACING_FACTOR`` times the sum of what each of
  the subscriber's videos is allowed (``allow``), and up to ``BURST_TIME`` of
  it may go at once. A second bucket, at the allowance itself, holds what went
  to at most ``AHEAD_TIME`` of the allowance ahead of it: the queue a long
  burst leaves in the link. A packet goes whenever neither bucket is in debt,
  and takes its size from both, so one packet can always go; a subscriber whose
  queue is empty and whose bucket has room pays one check (``admit``), and a
  timer runs only while something waits.
* Resends wait ahead of new media: a hole the subscriber waits on holds up a
  whole frame.
* The queue is bounded in time: when what waits would take more than
  ``QUEUE_LIMIT`` to leave at the pacing rate, the video that overflows it
  loses its queued packets, resends too (they would mend a picture the
  keyframe replaces, and held up that keyframe in turn), and waits for its
  next keyframe (``hold`` returns False and the forwarder asks for one).
  Latency does not grow without bound, and no one sees a broken picture.
* No rate known (nothing heard from the link yet, or adaptation off): nothing
  is paced.

Probe padding is not paced here: it only goes while no media waits (padding
never delays media), at the probe's own pace (``forwarder.Subscription._pad``).

Decisions take the time as an argument; the timer is an injected ``Schedule``
(the event loop's ``call_later`` by default), so tests drive it with a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

# Video may leave at this many times what the subscriber's videos are allowed, but no further than AHEAD_TIME
# of that allowance ahead of it. The allowance is about what the link carries beside the sound, and video sent
# faster queues there, the sound with it: as much as it ran ahead. A keyframe of a layer on a few hundred
# kbit/s takes a fraction of a second, within the lead: it leaves at the full factor, and the picture comes
# back soonest after a link falls. The original's keyframe on nara bench adapt's 150 kbit/s thin150 (8-9 kB,
# 100-120 kbit/s of video) takes most of a second: at 1.25 throughout, it queued the sound 100-250 ms behind
# it, every 3 s: thin150 lost 0.55 % of its sound (the mean of 27 runs), 0.32 % with the lead (12 runs). (At
# 1.0 throughout, 0.30 %, but the step's picture came back 0.1-0.2 s later after its drop.)
PACING_FACTOR = 1.25
AHEAD_TIME = 0.05  # seconds of the allowance
BURST_TIME = 0.03  # seconds at the pacing rate that may go at once (and one packet more)
# Seconds of queued video at the pacing rate before a video that overflows loses its queue and waits for a
# keyframe. A thin link's keyframe and the frame after it take about 0.35 s at the lowest rates.
QUEUE_LIMIT = 0.5


class Cancellable(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Cancellable]


class PacedStream(Protocol):
    """One video toward the subscriber: it sends what the pacer lets go."""

    def release(self, item: Any, waited: float) -> None: ...


def _loop_schedule(delay: float, callback: Callable[[], None]) -> Cancellable:
    return asyncio.get_running_loop().call_later(delay, callback)


class _Waiting:
    __slots__ = ("stream", "size", "item", "since")

    def __init__(self, stream: PacedStream, size: int, item: Any, since: float) -> None:
        self.stream = stream
        self.size = size
        self.item = item
        self.since = since


class VideoPacer:
    """The video toward one subscriber, all its videos together, paced at its link's rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, schedule: Schedule = _loop_schedule,
                 factor: float = PACING_FACTOR, burst_time: float = BURST_TIME,
                 queue_limit: float = QUEUE_LIMIT, ahead_time: float = AHEAD_TIME) -> None:
        self.clock = clock
        self.schedule = schedule
        self.factor = factor
        self.burst_time = burst_time
        self.ahead_time = ahead_time
        self.queue_limit = queue_limit
        self.allowances: dict[PacedStream, float] = {}  # bit/s each video may use
        self.rate: float | None = None  # bytes a second, None: not paced
        self.tokens = 0.0  # bytes that may go now (negative: in debt)
        self.allowed = 0.0  # bytes a second: the allowance (the rate without the factor)
        self.lead = 0.0  # bytes that may still go ahead of the allowance (negative: in debt)
        self.last = 0.0
        self.resends: deque[_Waiting] = deque()
        self.media: deque[_Waiting] = deque()
        self.queued_bytes = 0
        self.timer: Cancellable | None = None
        self.dropped = 0  # packets dropped because the queue was over its limit
        self.closed = False

    @property
    def waiting(self) -> bool:
        """Whether any video waits to leave (then probe padding does not go)."""
        return bool(self.media or self.resends)

    def allow(self, stream: PacedStream, bitrate: float | None, now: float) -> None:
        """What one video may use, bit/s (None: unknown; a subscriber with no known allowance is not paced)."""
        if bitrate is None:
            self.allowances.pop(stream, None)
        else:
            self.allowances[stream] = bitrate
        self._set_rate(now)

    def forget(self, stream: PacedStream) -> None:
        """A video the subscriber no longer receives: its waiting packets go nowhere."""
        self.allowances.pop(stream, None)
        self._drop(stream, resends=True)
        self._set_rate(self.clock())

    def discard(self, stream: PacedStream) -> None:
        """What waits of this video went stale (it moved to another level): it goes nowhere and takes no
        tokens, so the new level's keyframe is not held behind packets that would be thrown away."""
        self._drop(stream, resends=True)

    def _set_rate(self, now: float) -> None:
        total = sum(self.allowances.values())
        rate = total * self.factor / 8 if self.allowances and total > 0 else None
        if rate is not None and self.rate is None:
            # (both buckets start full)
            self.tokens, self.lead, self.last = rate * self.burst_time, rate / self.factor * self.ahead_time, now
        elif rate is not None:
            self._refill(now)  # (at the rates until now)
        self.rate = rate
        if rate is not None:
            self.allowed = rate / self.factor
        if self.waiting:
            self._arm(now)

    def _refill(self, now: float) -> None:
        rate = self.rate
        if rate is not None and now > self.last:
            self.tokens = min(self.tokens + (now - self.last) * rate, rate * self.burst_time)
            self.lead = min(self.lead + (now - self.last) * self.allowed, self.allowed * self.ahead_time)
        self.last = now

    def admit(self, size: int, now: float) -> bool:
        """The hot path: True if a packet of ``size`` bytes may go now (its size is taken); False: ``hold`` it."""
        if self.rate is None:
            return True
        if self.media or self.resends:
            return False
        self._refill(now)
        if self.tokens < 0 or self.lead < 0:
            return False
        self.tokens -= size
        self.lead -= size
        return True

    def refund(self, size: int) -> None:
        """A packet ``admit`` let go did not go after all."""
        if self.rate is not None:
            self.tokens += size
            self.lead += size

    def hold(self, stream: PacedStream, size: int, item: Any, now: float, resend: bool = False) -> bool:
        """Queue a packet that ``admit`` refused. False: the queue is over its limit, so the stream's
        queued media was dropped and this packet too: the stream must wait for a keyframe."""
        rate = self.rate
        if rate is None:
            stream.release(item, 0.0)
            return True
        if not resend and (self.queued_bytes + size) > rate * self.queue_limit:
            self._drop(stream, resends=True)
            self.dropped += 1
            return False
        (self.resends if resend else self.media).append(_Waiting(stream, size, item, now))
        self.queued_bytes += size
        if self.timer is None:
            self._arm(now)
        return True

    def _drop(self, stream: PacedStream, resends: bool) -> None:
        for queue in (self.media, self.resends) if resends else (self.media,):
            kept = [w for w in queue if w.stream is not stream]
            self.dropped += len(queue) - len(kept)
            queue.clear()
            queue.extend(kept)
        self.queued_bytes = sum(w.size for w in self.media) + sum(w.size for w in self.resends)

    def _arm(self, now: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.closed:
            return
        rate = self.rate
        self._refill(now)  # (both buckets, as they stand now)
        delay = 0.0 if rate is None else max(-self.tokens / rate, -self.lead / self.allowed, 0.0)
        self.timer = self.schedule(delay, self.drain)

    def drain(self) -> None:
        """Let go of what the bucket allows now, resends first; wake again when the next may go."""
        self.timer = None
        if self.closed:
            return
        now = self.clock()
        self._refill(now)
        while self.resends or self.media:
            # (below -1: a byte's rounding would wake it forever)
            if self.rate is not None and (self.tokens < -1.0 or self.lead < -1.0):
                self._arm(now)
                return
            waiting = (self.resends or self.media).popleft()
            self.queued_bytes -= waiting.size
            self.tokens -= waiting.size
            self.lead -= waiting.size
            waiting.stream.release(waiting.item, now - waiting.since)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.media.clear()
        self.resends.clear()
        self.queued_bytes = 0
        self.allowances.clear()
        self.rate = None
