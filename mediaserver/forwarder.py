"""Forwarding: one published track in, the same packets out to each subscriber.

Nothing here decodes. A ``Publication`` is one publisher's audio or video
track; each ``Subscription`` is that track on one subscriber's peer
connection. Packets keep their payload and marker bit; only SSRC, payload type,
sequence number and timestamp are rewritten per subscriber.

Why packets and not frames: forwarding at the packet level never waits for a
frame to be complete, so loss on one subscriber's link costs only that
subscriber a retransmission from our cache, and loss on the publisher's link is
repaired by aiortc's NACKs upstream with the retransmission forwarded as soon as
it arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .aiortc_adapter import InboundTap, OutboundPort, RtcpFeedback, RtpPacket
from .keyframes import KeyframeThrottle
from .packet_cache import PacketCache
from .rewriter import StreamRewriter
from .vp8 import is_keyframe_start

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

CLOCK_RATES = {"audio": 48000, "video": 90000}
# How often one missing packet may be asked for again upstream.
UPSTREAM_NACK_INTERVAL = 0.1
# How often the publisher is told its rate cap (REMB), in seconds.
REMB_INTERVAL = 1.0
MIME_TYPES = {"audio": "audio/opus", "video": "video/VP8"}


@dataclass
class ForwardingStats:
    """Counters of a publication (what came in, what we asked upstream) or a subscription
    (what went out, what the subscriber asked for)."""

    packets: int = 0
    bytes: int = 0
    retransmitted: int = 0
    nacks: int = 0
    keyframe_requests: int = 0
    send_errors: int = 0


class Publication:
    """One published audio or video track and the subscribers it feeds."""

    def __init__(
        self,
        participant_id: str,
        kind: str,
        tap: InboundTap,
        clock: Clock = time.monotonic,
        keyframe_interval: float = 0.5,
    ) -> None:
        self.participant_id = participant_id
        self.kind = kind
        self.id = f"{participant_id}/{kind}"
        self.tap = tap
        self.clock = clock
        self.subscriptions: set[Subscription] = set()
        self.cache: PacketCache[RtpPacket] = PacketCache(1024 if kind == "video" else 128)
        self.throttle = KeyframeThrottle(interval=keyframe_interval)
        self.source_ssrc: int | None = None
        self.asked_upstream: dict[int, float] = {}  # source seq -> when we last NACKed it
        self.last_remb: float | None = None
        self.rate_cap: int | None = None  # what the publisher was last told, bit/s
        self.muted = False
        self.closed = False
        self.stats = ForwardingStats()

    async def on_packet(self, packet: RtpPacket) -> None:
        if self.closed:
            return
        # Late packets (retransmissions after a loss or an outage) are forwarded too:
        # they fill holes that receivers would otherwise wait on.
        if not self.cache.store(packet.sequence_number, packet):
            return  # a retransmission we already forwarded
        self.source_ssrc = packet.ssrc
        self.stats.packets += 1
        self.stats.bytes += len(packet.payload)
        keyframe = self.kind == "video" and is_keyframe_start(packet.payload)
        if keyframe:
            self.throttle.keyframe_seen()
        for subscription in tuple(self.subscriptions):
            await subscription.forward(packet, keyframe)
        if self.throttle.pending and self.throttle.due(self.clock()):
            await self._send_keyframe_request()
        if self.kind == "video":
            now = self.clock()
            if self.last_remb is None or now - self.last_remb >= REMB_INTERVAL:
                self.last_remb = now
                await self._tell_rate_cap()

    async def _tell_rate_cap(self) -> None:
        """Cap the publisher at what its best-connected subscriber can take, and its uplink allows."""
        budgets = [s.budget() for s in self.subscriptions]
        wanted = [b for b in budgets if b is not None]
        uplink = self.tap.uplink_estimate
        caps = ([int(max(wanted))] if wanted else []) + ([uplink] if uplink else [])
        if not caps or self.source_ssrc is None:
            return
        self.rate_cap = min(caps)
        try:
            await self.tap.send_remb(self.rate_cap, [self.source_ssrc])
        except ConnectionError:
            pass

    async def request_keyframe(self) -> None:
        """A subscriber needs a keyframe; ask the publisher, throttled."""
        if self.kind != "video" or self.closed:
            return
        if self.throttle.request(self.clock()):
            await self._send_keyframe_request()

    async def _send_keyframe_request(self) -> None:
        if self.source_ssrc is None:
            return
        self.stats.keyframe_requests += 1
        try:
            await self.tap.request_keyframe(self.source_ssrc)
        except ConnectionError:
            pass

    async def recover(self, missing: list[int]) -> None:
        """Ask the publisher again for packets a subscriber lacks and we never got.

        aiortc's receiver NACKs a gap once, when it appears; if that NACK or its
        retransmission is lost, only a subscriber's NACK tells us the hole is
        still there.
        """
        now = self.clock()
        wanted = [seq for seq in missing if now - self.asked_upstream.get(seq, -1.0) >= UPSTREAM_NACK_INTERVAL]
        if not wanted or self.source_ssrc is None or self.closed:
            return
        for seq in wanted:
            self.asked_upstream[seq] = now
        if len(self.asked_upstream) > 512:
            self.asked_upstream = {s: t for s, t in self.asked_upstream.items() if now - t < 2.0}
        self.stats.nacks += 1
        try:
            await self.tap.request_retransmission(self.source_ssrc, wanted)
        except ConnectionError:
            pass

    def attach(self, port: OutboundPort, rewriter: StreamRewriter,
               budget: Callable[[], float | None] = lambda: None) -> Subscription:
        subscription = Subscription(self, port, rewriter, budget)
        self.subscriptions.add(subscription)
        return subscription

    def detach(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)

    def close(self) -> None:
        self.closed = True
        self.subscriptions.clear()
        self.cache.clear()


class Subscription:
    """One publication on one subscriber's outbound stream.

    The rewriter belongs to the outbound stream, not to the subscription: when a
    stream is reused for another publication, its sequence numbers and
    timestamps must carry on from where they were (SRTP refuses to send a
    sequence number far behind the last one on the same SSRC).
    """

    def __init__(self, publication: Publication, port: OutboundPort, rewriter: StreamRewriter,
                 budget: Callable[[], float | None] = lambda: None) -> None:
        self.publication = publication
        self.port = port
        self.rewriter = rewriter
        self.budget = budget  # the subscriber's video bit/s for this stream, if known
        # Video starts on a keyframe so the subscriber never sees a broken picture.
        self.waiting_for_keyframe = publication.kind == "video"
        self.asked_for_keyframe = False
        self.stats = ForwardingStats()

    async def forward(self, packet: RtpPacket, keyframe: bool) -> None:
        now = self.publication.clock()
        if self.waiting_for_keyframe:
            if not self.port.connected or self.port.payload_type is None:
                return
            if not keyframe:
                if not self.asked_for_keyframe:
                    self.asked_for_keyframe = True
                    await self.publication.request_keyframe()
                return
            self.waiting_for_keyframe = False
            self.rewriter.switch_source(packet.ssrc, packet.sequence_number, packet.timestamp, now)
        elif self.rewriter.source_ssrc != packet.ssrc:
            self.rewriter.switch_source(packet.ssrc, packet.sequence_number, packet.timestamp, now)
        out_seq, out_ts = self.rewriter.rewrite(packet.sequence_number, packet.timestamp, now)
        await self._send(packet, out_seq, out_ts)

    async def _send(self, packet: RtpPacket, out_seq: int, out_ts: int) -> None:
        try:
            await self.port.send(
                packet.payload,
                sequence_number=out_seq,
                timestamp=out_ts,
                marker=packet.marker,
                padding_size=packet.padding_size,
                audio_level=packet.extensions.audio_level,
            )
        except ConnectionError:
            self.stats.send_errors += 1
            return
        self.stats.packets += 1
        self.stats.bytes += len(packet.payload)

    async def on_feedback(self, feedback: RtcpFeedback) -> None:
        if feedback.kind == "nack":
            self.stats.nacks += 1
            upstream = []
            for out_seq in feedback.lost:
                source_seq = self.rewriter.source_seq(out_seq)
                cached = self.publication.cache.get(source_seq)
                if cached is None or cached.ssrc != self.rewriter.source_ssrc:
                    upstream.append(source_seq)
                    continue
                out_ts = (cached.timestamp + self.rewriter.ts_offset) % (1 << 32)
                await self._send(cached, out_seq, out_ts)
                self.stats.retransmitted += 1
            if upstream and self.rewriter.source_ssrc == self.publication.source_ssrc:
                await self.publication.recover(upstream)
        elif feedback.kind == "keyframe":
            self.stats.keyframe_requests += 1
            await self.publication.request_keyframe()

