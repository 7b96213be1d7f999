"""How long the server holds a packet it forwards: from the datagram's arrival to its copy's ``sendto``.

Each publication keeps one (``Publication.delays``, in ``GET /api/stats``).
The adapter stamps each inbound datagram when aioice hands it over from the
socket (``time.monotonic_ns``), before the queue to the DTLS transport, SRTP,
parsing and Nära's forwarding; each forwarded copy records its own delay when
it goes to the socket. So the figure includes every queue inside the server
and the fan-out to the subscribers before it in the same packet's loop, which
is what grows with load. Counted are the copies of what a publisher sent that
take the hot path; server-made layers (encoded here, not forwarded),
retransmissions, a probe's padding and copies relayed through TURN (aiortc's
own send path) are not.

Recording must cost next to nothing (it runs once per packet per subscriber):
a fixed list of bucket bounds, one integer division (or a ``bisect`` above a
millisecond) and one list increment; no allocation. Percentiles are read from the counts, with the bucket's upper
bound as the value (so they err on the high side, by at most one bucket).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

# Bucket upper bounds in nanoseconds: 25 µs steps to 1 ms, then coarser up to 2 s.
BOUNDS_NS: tuple[int, ...] = (
    *range(25_000, 1_000_001, 25_000),
    *range(1_250_000, 5_000_001, 250_000),
    *range(6_000_000, 20_000_001, 1_000_000),
    25_000_000, 30_000_000, 40_000_000, 50_000_000, 75_000_000, 100_000_000,
    150_000_000, 200_000_000, 300_000_000, 500_000_000, 1_000_000_000, 2_000_000_000,
)


class DelayHistogram:
    """Counts of delays in fixed buckets; the last bucket holds everything above ``BOUNDS_NS[-1]``."""

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (len(BOUNDS_NS) + 1)
        self.sum_ns = 0

    def record(self, delay_ns: int) -> None:
        # (most delays are under a millisecond, where the buckets are evenly spaced: no search)
        if 0 < delay_ns <= 1_000_000:
            self.counts[(delay_ns - 1) // 25_000] += 1
        else:
            self.counts[bisect_left(BOUNDS_NS, delay_ns)] += 1
        self.sum_ns += delay_ns

    def snapshot(self) -> DelaySnapshot:
        return DelaySnapshot(list(self.counts), self.sum_ns)


@dataclass
class DelaySnapshot:
    """The histogram at one moment; two of them give what happened in between."""

    counts: list[int]
    sum_ns: int

    def since(self, earlier: DelaySnapshot) -> DelaySnapshot:
        return DelaySnapshot([a - b for a, b in zip(self.counts, earlier.counts, strict=True)],
                             self.sum_ns - earlier.sum_ns)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The delay in seconds below which a share ``q`` of the packets went (None: no packets)."""
        total = self.total
        if not total:
            return None
        wanted = q * total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= wanted and count:
                return (BOUNDS_NS[i] if i < len(BOUNDS_NS) else BOUNDS_NS[-1] * 2) / 1e9
        return BOUNDS_NS[-1] * 2 / 1e9

    def to_json(self) -> dict[str, object]:
        """The counts (of the buckets of ``BOUNDS_NS``, then everything above) and the sum."""
        return {"counts": self.counts, "sum_ns": self.sum_ns}

    @classmethod
    def empty(cls) -> DelaySnapshot:
        return cls([0] * (len(BOUNDS_NS) + 1), 0)

    def __add__(self, other: DelaySnapshot) -> DelaySnapshot:
        return DelaySnapshot([a + b for a, b in zip(self.counts, other.counts, strict=True)],
                             self.sum_ns + other.sum_ns)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> DelaySnapshot:
        counts = data.get("counts")
        sum_ns = data.get("sum_ns")
        if (not isinstance(counts, list) or len(counts) != len(BOUNDS_NS) + 1
                or not all(isinstance(c, int) for c in counts) or not isinstance(sum_ns, int)):
            raise ValueError("not a forwarding delay histogram of these buckets")
        return cls(list(counts), sum_ns)


class DelayTotal:
    """A process's forwarding delay since it started, for ``/metrics``: the publications that ended (each adds its
    counts when it closes) plus the live ones when read, so the total never goes down while the process lives."""

    def __init__(self) -> None:
        self.ended = DelaySnapshot.empty()

    def retire(self, delays: DelayHistogram) -> None:
        self.ended = self.ended + delays.snapshot()

    def read(self, live: Iterable[DelayHistogram]) -> DelaySnapshot:
        total = self.ended
        for delays in live:
            total = total + delays.snapshot()
        return total
