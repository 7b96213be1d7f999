"""A probe's padding on a clock of its own: behind the lowest layer's few packets (here, one) it still reaches
the probe's rate, paced, and it stops when the probe does."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiortc.rtp import RtpPacket

from mediaserver.forwarder import Publication, Subscription
from mediaserver.rewriter import StreamRewriter

PROBE = 1_000_000.0  # bit/s the probe asks for
LAYER = 40_000.0  # the lowest layer's own rate: 8 frames a second of 625 bytes


@dataclass
class _Port:
    connected: bool = True
    payload_type: int | None = 96
    sent: list[tuple[float, int, bool]] = field(default_factory=list)  # (when, bytes, a probe's duplicate)

    async def send(self, payload: bytes, *, sequence_number: int, timestamp: int, marker: bool, padding_size: int,
                   audio_level: Any, probe: bool, resend: bool = False) -> None:
        self.sent.append((asyncio.get_running_loop().time(), len(payload), probe))


@dataclass
class _ProbingLink:
    until: float  # the probe pads until then

    def video_budget(self) -> float | None:
        return 100_000.0

    def rise_budget(self) -> float | None:
        return 100_000.0

    rate: float = PROBE

    def probe(self, now: float, wanted: float) -> float | None:
        return self.rate

    def padding(self, now: float) -> bool:
        return now < self.until

    def lost_packets(self, now: float, packets: int = 1) -> None:
        pass

    def own_loss(self) -> float:
        return 0.0

    def transit(self) -> float | None:
        return None


@pytest.mark.parametrize("probe", [PROBE, 150_000.0])  # (at 150 kbit/s, 20 ms of padding is less than a packet)
async def test_padding_behind_a_thin_layer_reaches_the_probe_rate_and_stops_with_the_probe(probe: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    publication = Publication("kit", "video", cast(Any, None), clock=loop.time)
    publication.meter.rate = LAYER
    port = _Port()
    link = _ProbingLink(until=start + 0.4, rate=probe)  # (a cluster, shorter than a sent packet stays fresh to repeat)
    subscription = Subscription(publication, cast(Any, port), StreamRewriter(90000), link)
    subscription.level, subscription.target = 0, None
    await subscription.decide(start, [(0, LAYER), (1, 2_000_000.0)], cap_limited=False)
    assert subscription.probe_factor > 1.0
    # One packet of the layer, then none for the rest of the cluster (its next frame is 125 ms away, or more)
    packet = RtpPacket(payload_type=96, sequence_number=0, timestamp=0, ssrc=7)
    packet.payload = bytes(625)
    await subscription.offer(0, packet, keyframe=True)
    padder = subscription._padder
    assert padder is not None
    await asyncio.wait_for(padder, 2.0)  # it ends with the probe
    padding = [(at, size) for at, size, probe in port.sent if probe]
    assert padding and all(at <= link.until + 0.05 for at, _ in padding), "none after the probe"
    rate = sum(size for _, size in padding) * 8 / (padding[-1][0] - padding[0][0])
    # (behind each packet, at most ten times the layer's rate went: 0.4 Mbit/s)
    assert rate >= 0.7 * (probe - LAYER), f"padding at {rate / 1e3:.0f} kbit/s"
    assert rate <= 1.2 * probe, "paced at the probe's rate, not flooded"


async def test_the_video_sent_during_a_cluster_counts_toward_its_rate() -> None:
    """A publisher whose cap has just risen sends more than its level's mean: the duplicates fill only what the
    video leaves, so the cluster goes at the probe's rate, not over it (at 1.2-1.5 times it, a cluster filled a
    link that carried its rate, and failed)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    publication = Publication("kit", "video", cast(Any, None), clock=loop.time)
    publication.meter.rate = LAYER  # (the mean, lagging behind what the publisher now sends)
    port = _Port()
    link = _ProbingLink(until=start + 0.4)
    subscription = Subscription(publication, cast(Any, port), StreamRewriter(90000), link)
    subscription.level, subscription.target = 0, None
    await subscription.decide(start, [(0, LAYER), (1, 2_000_000.0)], cap_limited=False)
    sequence = 0
    while loop.time() < link.until:  # the video itself at 400 kbit/s: 1250 bytes every 25 ms
        packet = RtpPacket(payload_type=96, sequence_number=sequence, timestamp=sequence * 2250, ssrc=7)
        packet.payload = bytes(1250)
        await subscription.offer(0, packet, keyframe=sequence == 0)
        sequence += 1
        await asyncio.sleep(0.025)  # (the source's own pace)
    padder = subscription._padder
    assert padder is not None
    await asyncio.wait_for(padder, 2.0)
    video = sum(size for _, size, probe in port.sent if not probe)
    padding = sum(size for _, size, probe in port.sent if probe)
    span = port.sent[-1][0] - port.sent[0][0]
    rate = (video + padding) * 8 / span
    assert padding > 0
    assert 0.6 * PROBE <= rate <= 1.1 * PROBE, f"the cluster went at {rate / 1e3:.0f} kbit/s"
