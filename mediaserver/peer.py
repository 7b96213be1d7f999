"""One participant's peer connection with the SFU.

The server is always the offerer. That keeps renegotiation free of glare: when
participants or tracks come and go, the server builds a new offer and the
client only ever answers. A publishing participant gets one receive-only audio
and one receive-only video transceiver in the first offer, which its answer
turns into its published tracks; every other participant's track reaches it on
a send-only transceiver ("slot"). Slots are reused when a track goes away,
because m-lines can never be removed from a session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcrtptransceiver import RTCRtpTransceiver

from .aiortc_adapter import (
    InboundTap,
    OutboundPort,
    ParkedTrack,
    RtcpFeedback,
    RtpPacket,
    follow_round_trips,
    follow_transport_feedback,
    negotiated_payload_type,
    prefer_codec,
    send_transport_feedback,
)
from .bwe import DELIVERED_FRESH, BandwidthEstimate, DeliveryMeter, NackLoss
from .delay_detector import DelayDetector
from .errors import MediaError
from .forwarder import CLOCK_RATES, MIME_TYPES, Publication, Subscription
from .pacer import VideoPacer
from .rewriter import StreamRewriter
from .sdp import transport_cc_toward_subscribers, with_opus_fec
from .twcc import SendHistory, TransportFeedback

if TYPE_CHECKING:
    from .room import Room

logger = logging.getLogger(__name__)

Signal = Callable[[dict[str, Any]], Awaitable[None]]

DECIDE_AT_ONCE = 0.5  # an estimate cut under this share of what it was has its videos' levels decided at once
ANSWER_DEADLINE = 15.0


@dataclass(frozen=True)
class ParticipantInfo:
    id: str
    name: str
    role: str
    can_publish: bool
    # The client stamps what it sends with transport-wide sequence numbers and wants the server's transport
    # feedback on them (a home kit: it reads its uplink's queue from them, edge/uplink.py).
    uplink_feedback: bool = False

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "role": self.role}


class Slot:
    """A send-only transceiver carrying one other participant's track."""

    def __init__(self, transceiver: RTCRtpTransceiver, kind: str, peer: Peer) -> None:
        self.transceiver = transceiver
        self.kind = kind
        self.peer = peer
        self.port = OutboundPort(transceiver.sender, self._on_feedback)
        self.rewriter = StreamRewriter(CLOCK_RATES[kind])
        self.publication: Publication | None = None
        self.subscription: Subscription | None = None
        self.delivery = DeliveryMeter()
        self.nack_loss = NackLoss()
        # Each report's own round trip, answering any recent sender report: aiortc's is an average
        # that gives a new report 15 %, of reports that answer its latest sender report only, so a
        # queue showed late or, once it held more than the time between two sender reports, not at all.
        self.round_trip: float | None = None
        follow_round_trips(transceiver.sender, self._on_round_trip)

    def _on_round_trip(self, seconds: float) -> None:
        self.round_trip = seconds

    async def _on_feedback(self, feedback: RtcpFeedback) -> None:
        now = time.monotonic()
        bandwidth = self.peer.bandwidth
        if feedback.kind == "remb" and feedback.bitrate is not None:
            bandwidth.on_remb(feedback.bitrate, now, self.peer.sending_rate(now))
        elif feedback.kind == "report":
            # The round trip is the link's, whichever stream reports it. Loss is read
            # from video, or from audio while no video flows (all of it paused).
            rtt, self.round_trip = self.round_trip, None  # (set by this very report, if it answered one)
            if rtt is not None:
                bandwidth.on_rtt(rtt, now, stream=str(self.transceiver.mid))
            self.delivery.update(now, feedback.highest_sequence, feedback.packets_lost, *self.port.sent)
            bandwidth.on_delivered(self.peer.delivered(now), now)
            nacked = self.subscription.stats.nacked if self.subscription is not None else 0
            asked = self.nack_loss.update(self.port.sent[0], nacked)
            if self.kind == "video" or not self.peer.video_flowing():
                bandwidth.on_report(feedback.fraction_lost, now, asked)
        if self.subscription is not None:
            await self.subscription.on_feedback(feedback)

    def release(self) -> None:
        if self.subscription is not None:
            self.peer.pacer.forget(self.subscription)
            self.subscription.publication.detach(self.subscription)
        self.subscription = None
        self.publication = None


class Peer:
    def __init__(
        self,
        room: Room,
        info: ParticipantInfo,
        signal: Signal,
        ice_servers: list[RTCIceServer],
        on_failed: Callable[[Peer, str], Awaitable[None]],
    ) -> None:
        self.room = room
        self.info = info
        self.signal = signal
        self.on_failed = on_failed
        self._failure_told = False
        # MAX_BUNDLE: with aiortc's default (balanced), a second transceiver of a kind
        # created before the first answer stays on a transport that bundling discards.
        self.pc = RTCPeerConnection(
            RTCConfiguration(iceServers=ice_servers, bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        self.inbound: dict[str, RTCRtpTransceiver] = {}
        self._taps: dict[str, InboundTap] = {}
        self.publications: dict[str, Publication] = {}
        self.muted: dict[str, bool] = {"audio": False, "video": False}
        self.slots: list[Slot] = []
        self.bandwidth = BandwidthEstimate()
        # Video toward this participant leaves at its link's rate; its audio overtakes it (pacer.py).
        self.pacer = VideoPacer()
        # Per-packet delay feedback from this subscriber (transport-wide congestion control), if it sends it.
        self.delay = DelayDetector()
        self.sent_history: SendHistory | None = None
        self.transport_feedbacks = 0
        self.joined_at = time.time()  # wall clock
        self.closed = False
        self._lock = asyncio.Lock()
        self._awaiting_answer = False
        self._renegotiate = False
        self._answer_timer: asyncio.TimerHandle | None = None
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    # --- set-up ------------------------------------------------------------

    def open_publishing(self) -> None:
        """Add the receive-only transceivers this participant publishes into."""
        for kind in ("audio", "video"):
            transceiver = self.pc.addTransceiver(kind, direction="recvonly")
            prefer_codec(transceiver, MIME_TYPES[kind], with_rtx=(kind == "video"))
            self._taps[kind] = InboundTap(transceiver.receiver, self._inbound_handler(kind))
            self.inbound[kind] = transceiver

    def _inbound_handler(self, kind: str) -> Callable[[RtpPacket], Awaitable[None]]:
        async def on_packet(packet: RtpPacket) -> None:
            publication = self.publications.get(kind)
            if publication is not None:
                await publication.on_packet(packet)

        return on_packet

    def _on_track(self, track: Any) -> None:
        kind = track.kind
        if kind in self.publications or self.closed:
            return
        if not self.info.can_publish:
            # The answer turned a slot around; nothing from this peer is forwarded.
            asyncio.ensure_future(
                self.room.notify_error(self, "publish_not_allowed", "This role may not publish media.")
            )
            return
        if kind not in self._taps:
            return
        if self.info.uplink_feedback:
            send_transport_feedback(self.inbound[kind].receiver)
        publication = Publication(self.info.id, kind, self._taps[kind], adaptation=self.room.adaptation)
        if publication.ladder is not None:
            publication.ladder.pacer = self.room.ladder_starts  # (a join storm's ladders start paced, worker-wide)
        publication.loop_lag = self.room.loop_lag  # (probes, then resends, shed while the worker is behind)
        publication.muted = self.muted[kind]
        self.publications[kind] = publication
        asyncio.ensure_future(self.room.publish(publication))

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        logger.info("participant %s media connection %s", self.info.id, state)
        # "closed" without our own close(): the remote end or ICE consent ended every DTLS transport and aiortc
        # closed the connection itself; the participant must hear of it as of a failure, not stay in the call
        if state in ("failed", "closed") and not self.closed and not self._failure_told:
            self._failure_told = True  # (a failed connection may go on to close itself: told once)
            await self.on_failed(self, "media_failed")

    # --- negotiation ---------------------------------------------------------

    @property
    def awaiting_answer(self) -> bool:
        return self._awaiting_answer

    async def negotiate(self) -> None:
        """Bring this peer's slots in line with the room and send an offer."""
        async with self._lock:
            if self.closed:
                return
            if self._awaiting_answer:
                self._renegotiate = True
                return
            self._assign_slots()
            if not self.pc.getTransceivers():
                return  # nothing to send or receive yet; an empty offer is not valid SDP
            offer = await self.pc.createOffer()
            sdp = with_opus_fec(offer.sdp)
            if not self.info.uplink_feedback:
                sdp = transport_cc_toward_subscribers(sdp)
            offer = RTCSessionDescription(sdp=sdp, type=offer.type)
            await self.pc.setLocalDescription(offer)
            self._awaiting_answer = True
            self._arm_answer_deadline()
            tracks = [
                {
                    "mid": slot.transceiver.mid,
                    "participant_id": slot.publication.participant_id,
                    "kind": slot.kind,
                }
                for slot in self.slots
                if slot.publication is not None
            ]
            publish = {kind: t.mid for kind, t in self.inbound.items()}
            description = self.pc.localDescription
        await self.signal({"type": "offer", "sdp": description.sdp, "tracks": tracks, "publish": publish})

    def _assign_slots(self) -> None:
        wanted = {p.id: p for p in self.room.publications_for(self.info.id)}
        for slot in self.slots:
            if slot.publication is not None and wanted.get(slot.publication.id) is not slot.publication:
                slot.release()
                slot.transceiver.direction = "inactive"
        assigned = {slot.publication.id for slot in self.slots if slot.publication is not None}
        for publication in wanted.values():
            if publication.id in assigned:
                continue
            free = next(
                (s for s in self.slots if s.publication is None and s.kind == publication.kind),
                None,
            )
            if free is not None:
                slot = free
            else:
                transceiver = self.pc.addTransceiver(ParkedTrack(publication.kind), direction="sendonly")
                prefer_codec(transceiver, MIME_TYPES[publication.kind], with_rtx=False)
                slot = Slot(transceiver, publication.kind, self)
                self.slots.append(slot)
            slot.publication = publication
            slot.transceiver.direction = "sendonly"

    async def handle_answer(self, sdp: str) -> None:
        async with self._lock:
            if not self._awaiting_answer:
                raise MediaError("unexpected_answer", "No offer is waiting for an answer.")
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            except Exception as exc:  # aiortc raises ValueError, OperationError, ...
                raise MediaError("sdp_invalid", f"The answer could not be applied: {exc}") from exc
            self._awaiting_answer = False
            if self.sent_history is None:
                self.sent_history = follow_transport_feedback(self.pc, self._on_transport_feedback)
            if self._answer_timer is not None:
                self._answer_timer.cancel()
                self._answer_timer = None
            for slot in self.slots:
                if slot.publication is not None and slot.subscription is None:
                    mime = MIME_TYPES[slot.kind]
                    payload_type = negotiated_payload_type(slot.transceiver, mime)
                    if payload_type is None:
                        continue
                    slot.port.configure(payload_type, slot.transceiver.mid)
                    slot.subscription = slot.publication.attach(slot.port, slot.rewriter, self, self.info.id)
                    if slot.kind == "video" and slot.publication.ladder is not None:
                        slot.subscription.pacer = self.pacer
            again = self._renegotiate
            self._renegotiate = False
        if again:
            await self.negotiate()

    def _arm_answer_deadline(self) -> None:
        loop = asyncio.get_running_loop()

        def expired() -> None:
            if self._awaiting_answer and not self.closed:
                asyncio.ensure_future(self.on_failed(self, "answer_timeout"))

        self._answer_timer = loop.call_later(ANSWER_DEADLINE, expired)

    def _on_transport_feedback(self, feedback: TransportFeedback) -> None:
        if self.sent_history is None:
            return
        results = self.sent_history.results(feedback)
        if not results:
            return
        self.transport_feedbacks += 1
        state = self.delay.on_results(results)
        before = self.bandwidth.estimate
        self.bandwidth.on_transport_feedback(results, state, self.delay.acked_rate, time.monotonic(),
                                             self.delay.sent_rate, self.delay.lost_share, self.delay.arriving_rate,
                                             self.delay.queue_delay)
        if self.bandwidth.estimate < before * DECIDE_AT_ONCE:
            # (a link that fell: each quarter second's wait for the next decision is more of the old level flooding it)
            for subscription in self._receiving("video"):
                subscription.publication.decide_soon = True

    def subscriptions(self) -> list[Subscription]:
        return [s.subscription for s in self.slots if s.subscription is not None]

    def delivered(self, now: float) -> float:
        """What this subscriber's link carried lately, all streams together (from receiver reports)."""
        return sum(slot.delivery.rate or 0.0 for slot in self.slots
                   if slot.delivery.at is not None and now - slot.delivery.at < DELIVERED_FRESH)

    def _audio_rate(self, now: float) -> float:
        return sum(s.meter.current(now) for s in self._receiving("audio"))

    def sending_rate(self, now: float) -> float:
        """What is sent toward this subscriber lately, all streams together (padding and resends aside)."""
        return sum(s.meter.current(now) for s in self.subscriptions())

    def video_flowing(self) -> bool:
        return any(s.level is not None and s.level >= 0 for s in self._receiving("video"))

    def _receiving(self, kind: str) -> list[Subscription]:
        return [s for s in self.subscriptions() if s.publication.kind == kind]

    def video_budget(self) -> float | None:
        """What this subscriber's link can take for each video it receives.

        Audio comes first: what its audio streams carry is taken off the estimate
        before the rest is shared equally by the videos.
        """
        if not self.bandwidth.known:
            return None  # nothing heard from this subscriber's link yet
        return self._share(self.bandwidth.estimate)

    def rise_budget(self) -> float | None:
        """What each video may move up to: the same share of the usable estimate (a starting guess
        the link has not yet been seen to carry moves no one up)."""
        if not self.bandwidth.known:
            return None
        return self._share(self.bandwidth.usable)

    def _share(self, estimate: float) -> float:
        audio = self._audio_rate(time.monotonic())
        videos = max(len(self._receiving("video")), 1)
        return max(estimate - audio, 0.0) / videos

    def probe(self, now: float, wanted: float) -> float | None:
        """Pad one video up to this rate now, to learn whether the link could carry ``wanted``."""
        videos = max(len(self._receiving("video")), 1)
        audio = self._audio_rate(now)
        rate = self.bandwidth.probe_rate(now, wanted * videos + audio)
        return None if rate is None else max(rate - audio, 0.0) / videos

    def padding(self, now: float) -> bool:
        return self.bandwidth.padding(now)

    def lost_packets(self, now: float, packets: int = 1) -> None:
        self.bandwidth.on_nack(now, packets)

    def own_loss(self) -> float:
        return self.bandwidth.own_loss()

    def transit(self) -> float | None:
        """How long this subscriber's link now takes to answer a packet: its lowest round trip plus
        the queue it shows. A packet asked for sooner than that after it was sent is still on its way."""
        return self.bandwidth.transit(time.monotonic())

    # --- state -----------------------------------------------------------------

    def set_muted(self, kind: str, muted: bool) -> None:
        self.muted[kind] = muted
        publication = self.publications.get(kind)
        if publication is not None:
            publication.muted = muted

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._answer_timer is not None:
            self._answer_timer.cancel()
        for slot in self.slots:
            slot.release()
        self.pacer.close()
        for publication in self.publications.values():
            publication.close()
        await self.pc.close()

