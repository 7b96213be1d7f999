"""A model of one direction of an access link, decided packet by packet.

Deterministic for a given seed, with time passed in: ``Link.send(size, now)``
answers when the packet comes out of the far end, or ``None`` when the link
drops it. Nothing here sleeps or touches a socket; the TURN relay in
``bench/turn.py`` schedules the deliveries this model decides.

What it models, in the order a packet meets it:

1. Outages: a scheduled window in which the link carries nothing.
2. Loss: independent random loss, or Gilbert–Elliott bursts (a good and a bad
   state, each with its own loss rate, and per-packet switching chances).
3. The bottleneck: a rate (fixed, stepped over time, or replayed from a
   Mahimahi delivery trace) behind a drop-tail queue bounded in bytes or in
   milliseconds of queueing delay.
4. Propagation: a base one-way delay plus jitter. Packets stay in order unless
   reordering is allowed.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from pathlib import Path

MTU = 1500


@dataclass(frozen=True)
class GilbertElliott:
    """Bursty loss: mean burst length 1/p_bad_to_good packets."""

    p_good_to_bad: float
    p_bad_to_good: float
    loss_in_good: float = 0.0
    loss_in_bad: float = 1.0

    @property
    def mean_loss(self) -> float:
        bad_share = self.p_good_to_bad / (self.p_good_to_bad + self.p_bad_to_good)
        return bad_share * self.loss_in_bad + (1 - bad_share) * self.loss_in_good

    @classmethod
    def with_mean(cls, loss: float, mean_burst: float) -> GilbertElliott:
        """A model that loses ``loss`` of packets in bursts of ``mean_burst`` on average."""
        p_bad_to_good = 1 / mean_burst
        p_good_to_bad = loss * p_bad_to_good / (1 - loss)
        return cls(p_good_to_bad, p_bad_to_good)


@dataclass(frozen=True)
class DeliveryTrace:
    """Mahimahi delivery opportunities: each one carries one MTU-sized packet."""

    opportunities_ms: tuple[int, ...]

    @property
    def period_ms(self) -> int:
        return max(self.opportunities_ms[-1], 1)

    @classmethod
    def load(cls, path: Path | str) -> DeliveryTrace:
        lines = Path(path).read_text().split()
        values = tuple(int(v) for v in lines)
        if not values or any(b < a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"{path}: not a Mahimahi trace (non-decreasing milliseconds, one per line)")
        return cls(values)

    @classmethod
    def constant(cls, bits_per_second: float, seconds: int = 1) -> DeliveryTrace:
        """A trace that delivers a steady rate (for tests)."""
        per_ms = bits_per_second / 8 / MTU / 1000
        opportunities = []
        credit = 0.0
        for ms in range(1, seconds * 1000 + 1):
            credit += per_ms
            while credit >= 1:
                opportunities.append(ms)
                credit -= 1
        return cls(tuple(opportunities))

    def mean_bits_per_second(self) -> float:
        return len(self.opportunities_ms) * MTU * 8 / (self.period_ms / 1000)


@dataclass(frozen=True)
class LinkProfile:
    """Everything that describes one direction of a link."""

    rate_bps: float | None = None  # None: unlimited (or see trace)
    rate_steps: tuple[tuple[float, float], ...] = ()  # (from second, rate) after t=0
    trace: DeliveryTrace | None = None
    queue_bytes: int | None = None
    queue_ms: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: bool = False
    loss: float = 0.0
    bursts: GilbertElliott | None = None
    outages: tuple[tuple[float, float], ...] = ()  # (start second, duration seconds)

    def rate_at(self, t: float) -> float | None:
        rate = self.rate_bps
        for start, step_rate in self.rate_steps:
            if t >= start:
                rate = step_rate
        return rate

    def in_outage(self, t: float) -> bool:
        return any(start <= t < start + length for start, length in self.outages)


@dataclass
class LinkCounters:
    offered: int = 0
    bytes_offered: int = 0
    delivered: int = 0
    lost_random: int = 0
    lost_queue: int = 0
    lost_outage: int = 0
    bytes_delivered: int = 0


@dataclass
class Link:
    """One direction of a link, started at time ``start`` (seconds, any clock)."""

    profile: LinkProfile
    seed: int = 0
    start: float = 0.0
    counters: LinkCounters = field(default_factory=LinkCounters)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._bad = False
        self._busy_until = self.start  # when the bottleneck finishes what it holds
        self._last_delivery = self.start
        self._trace_index = 0  # next unused delivery opportunity (absolute, counts periods)
        self._trace_left = 0  # bytes left in the current opportunity

    def send(self, size: int, now: float) -> float | None:
        """When a packet of ``size`` bytes offered at ``now`` arrives, or None if dropped."""
        self.counters.offered += 1
        self.counters.bytes_offered += size
        t = now - self.start
        if self.profile.in_outage(t):
            self.counters.lost_outage += 1
            return None
        if self._lost():
            self.counters.lost_random += 1
            return None
        leaves = self._through_bottleneck(size, now)
        if leaves is None:
            self.counters.lost_queue += 1
            return None
        arrival = leaves + self.profile.delay_ms / 1000
        if self.profile.jitter_ms:
            arrival += self._rng.uniform(0, self.profile.jitter_ms) / 1000
        if not self.profile.reorder:
            arrival = max(arrival, self._last_delivery)
        self._last_delivery = max(self._last_delivery, arrival)
        self.counters.delivered += 1
        self.counters.bytes_delivered += size
        return arrival

    def capacity_at(self, now: float) -> float | None:
        """The bottleneck's rate in bit/s at ``now`` (None when unlimited)."""
        t = now - self.start
        if self.profile.in_outage(t):
            return 0.0
        if self.profile.trace is not None:
            return self.profile.trace.mean_bits_per_second()
        return self.profile.rate_at(t)

    # --- the pieces ---------------------------------------------------------------

    def _lost(self) -> bool:
        bursts = self.profile.bursts
        if bursts is not None:
            if self._bad:
                self._bad = self._rng.random() >= bursts.p_bad_to_good
            else:
                self._bad = self._rng.random() < bursts.p_good_to_bad
            chance = bursts.loss_in_bad if self._bad else bursts.loss_in_good
            return self._rng.random() < chance
        return self.profile.loss > 0 and self._rng.random() < self.profile.loss

    def _queue_full(self, size: int, now: float, rate: float | None) -> bool:
        backlog_s = max(0.0, self._busy_until - now)
        if self.profile.queue_ms is not None and backlog_s * 1000 > self.profile.queue_ms:
            return True
        if self.profile.queue_bytes is not None and rate:
            return backlog_s * rate / 8 + size > self.profile.queue_bytes
        return False

    def _through_bottleneck(self, size: int, now: float) -> float | None:
        if self.profile.trace is not None:
            return self._through_trace(size, now)
        rate = self.profile.rate_at(now - self.start)
        if rate is None:
            return now
        if self._queue_full(size, now, rate):
            return None
        begin = max(now, self._busy_until)
        self._busy_until = begin + size * 8 / rate
        return self._busy_until

    def _through_trace(self, size: int, now: float) -> float | None:
        trace = self.profile.trace
        assert trace is not None
        if self._queue_full(size, now, trace.mean_bits_per_second()):
            return None
        opportunities, period = trace.opportunities_ms, trace.period_ms
        count = len(opportunities)
        # The packet can use no opportunity before it arrives.
        now_ms = (now - self.start) * 1000
        earliest = bisect.bisect_left(opportunities, now_ms % period) + int(now_ms // period) * count
        if self._trace_index <= earliest:  # the partly used opportunity is in the past
            self._trace_index, self._trace_left = earliest, 0
        left = size
        while True:
            if self._trace_left == 0:
                self._trace_left = MTU
                self._trace_index += 1
            used = min(left, self._trace_left)
            self._trace_left -= used
            left -= used
            if left == 0:
                break
        index = self._trace_index - 1
        at_ms = opportunities[index % count] + (index // count) * period
        leaves = self.start + at_ms / 1000
        self._busy_until = leaves
        return max(leaves, now)

