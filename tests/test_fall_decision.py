"""A subscriber whose link fell far is moved down at the publisher's next packet, not at the next quarter
second's decision: each packet of the old level sent meanwhile floods the fallen link (fake clock)."""

from __future__ import annotations

from typing import Any, cast

from aiortc.rtp import RtpPacket

from mediaserver.forwarder import DECISION_INTERVAL, Publication, Subscription
from mediaserver.rewriter import StreamRewriter

from .test_pacer_overflow import _Port
from .test_steady_probes import _Link


class _Transport:
    _state = None  # (not connected: what the hot path would send is dropped, as before a transport is up)


class _Sender:
    _RTCRtpSender__transport = _Transport()


class _Unconnected(_Port):
    _sender = _Sender()
    _route = None


class _Tap:
    """The publisher's side of the server (what a publication asks of it here)."""

    arrival_ns = 0
    uplink_estimate = None

    async def send_remb(self, bitrate: int, media_ssrcs: list[int]) -> None:
        pass

    async def request_keyframe(self, media_ssrc: int) -> None:
        pass


async def _moved_after_fall(decide_soon: bool) -> float | None:
    """Seconds from the fall to the subscriber's move toward a layer, the original arriving every 10 ms."""
    now = [100.0]
    publication = Publication("kit", "video", cast(Any, _Tap()), clock=lambda: now[0], adaptation=True)
    link = _Link(2_000_000)
    link.bandwidth.on_remb(2_000_000, now[0])  # (heard from: the estimate is known)
    subscription = Subscription(publication, cast(Any, _Unconnected()), StreamRewriter(90000), link)
    subscription.level, subscription.target = publication.source_level, None
    publication.subscriptions.add(subscription)
    try:
        fell_at = None
        for seq in range(100):
            if seq == 3:  # (just after a decision)
                link.bandwidth.estimate = 250_000  # the link fell: an overflow's cut, as the peer makes it
                publication.decide_soon = decide_soon  # (the peer's doing when an estimate falls under half)
                fell_at = now[0]
            packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 900, ssrc=1234)
            packet.payload = b"\x10\x01" + bytes(1000)  # (no keyframe: the original keeps flowing)
            await publication.on_packet(packet)
            if fell_at is None:
                assert subscription.target is None, "on the original while the link carried it"
            elif subscription.target is not None:
                return now[0] - fell_at
            now[0] += 0.01
        return None
    finally:
        publication.close()


async def test_a_link_that_fell_far_moves_its_subscriber_at_the_next_packet() -> None:
    assert await _moved_after_fall(decide_soon=True) == 0.0
    waited = await _moved_after_fall(decide_soon=False)
    assert waited is not None and waited >= DECISION_INTERVAL - 0.05  # (what it costs without)
