"""Probing in steady state, on a fake clock: a subscriber on the best level at its full rate, over a link
proven to carry it, is not probed (nothing to climb to: the padding would only load the worker); one a
level below, or one whose budget holds its publisher's cap, still is."""

from __future__ import annotations

from typing import Any, cast

from mediaserver.bwe import BandwidthEstimate
from mediaserver.forwarder import Publication, Subscription
from mediaserver.ladder import SOURCE_HEADROOM
from mediaserver.rewriter import StreamRewriter

LEVELS = [(0, 150_000.0), (1, 300_000.0), (2, 550_000.0)]  # two layers and the original
ORIGINAL = LEVELS[-1][0]


class _Link:
    """A subscriber's link as the forwarder sees it, over the real bandwidth estimate (one video, no audio)."""

    def __init__(self, estimate: float) -> None:
        self.bandwidth = BandwidthEstimate(estimate=estimate, confirmed=True)

    def video_budget(self) -> float | None:
        return self.bandwidth.estimate if self.bandwidth.known else None

    def rise_budget(self) -> float | None:
        return self.bandwidth.usable if self.bandwidth.known else None

    def probe(self, now: float, wanted: float) -> float | None:
        return self.bandwidth.probe_rate(now, wanted)

    def padding(self, now: float) -> bool:
        return self.bandwidth.padding(now)

    def lost_packets(self, now: float, packets: int = 1) -> None:
        self.bandwidth.on_nack(now, packets)

    def own_loss(self) -> float:
        return 0.0

    def transit(self) -> float | None:
        return None


async def _probes_in_a_minute(level: int, estimate: float, cap_limited: bool, rate_cap: float | None) -> int:
    """Probes started over 60 s of a clean link (a report a second, decisions every 0.5 s)."""
    now = 100.0
    publication = Publication("kit", "video", cast(Any, None), clock=lambda: now)
    publication.rate_cap = None if rate_cap is None else int(rate_cap)
    link = _Link(estimate)
    subscription = Subscription(publication, cast(Any, None), StreamRewriter(90000), link)
    subscription.level, subscription.target = level, None
    for step in range(120):
        now = 100.0 + step * 0.5
        if step % 2 == 0:
            link.bandwidth.on_report(0, now)  # no loss, flat round trip: a link with room
            link.bandwidth.estimate = estimate  # (held where it is: the question is the probes, not growth)
        await subscription.decide(now, LEVELS, cap_limited)
        subscription.level, subscription.target = level, None  # (where it stays; the chooser is not under test)
    return link.bandwidth.probes


async def test_on_the_original_with_room_no_probe() -> None:
    # proven 600 kbit/s for a 550 kbit/s original: less than the 1.2x a subscriber could use, yet nothing to climb to
    assert await _probes_in_a_minute(ORIGINAL, 600_000, cap_limited=False, rate_cap=None) == 0
    # the publisher held by a cap its uplink sets (under what this link carries): no probe lifts it
    assert await _probes_in_a_minute(ORIGINAL, 1_000_000, cap_limited=True, rate_cap=600_000) == 0


async def test_climbing_subscribers_still_probe() -> None:
    # a layer below the original, the link proven for more than that layer: probes to climb
    assert await _probes_in_a_minute(1, 400_000, cap_limited=False, rate_cap=None) > 0
    # on the original, its publisher held by the cap this link's budget sets: proving more lifts it
    budget = 1_000_000.0
    assert await _probes_in_a_minute(ORIGINAL, budget, cap_limited=True, rate_cap=budget / SOURCE_HEADROOM) > 0
    # on the original, the link not yet shown to carry it: probed
    assert await _probes_in_a_minute(ORIGINAL, 500_000, cap_limited=False, rate_cap=None) > 0
