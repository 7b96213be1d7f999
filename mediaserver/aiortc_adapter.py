"""Every use of aiortc (and aioice) internals in Nära, in one place.

aiortc is our transport: ICE, DTLS, SRTP, RTP/RTCP parsing and SDP. It has no
public way to receive encoded packets or to send packets it did not encode, so
the forwarding SFU reaches into it here and nowhere else. The pinned minor
version is in pyproject.toml; ``tests/test_aiortc_adapter.py`` checks every
assumption below and fails loudly when aiortc changes under us.

The hook points and why they are shaped this way:

* Inbound: ``RTCRtpReceiver._handle_rtp_packet`` does SRTP-decrypted parsing,
  receive statistics (for receiver reports), REMB estimation, NACK generation
  and RTX unwrapping, then hands the packet to a jitter buffer that counts
  packets, not time; one unrecoverable packet can stall it for seconds. We keep
  everything up to the jitter buffer and replace the buffer itself with a sink
  that collects each packet, so forwarding never waits on reassembly and
  nothing is decoded.
* Outbound: ``RTCRtpSender`` only sends what its own loop encodes and
  re-packetises per frame. We park that loop on a track that never yields a
  frame and write our rewritten RTP packets straight to the sender's DTLS
  transport, keeping the sender-report counters it uses for RTCP SR. The
  forwarding hot path goes further (``direct_send``, near the end): a header
  template patched per packet, SRTP, then the ICE pair's socket; no coroutine.
* RTCP from a subscriber (NACK, PLI/FIR, REMB, receiver reports) arrives at the
  sender's ``_handle_rtcp_packet``; we route it to Nära first and let aiortc
  keep only what it can still use (RTT and statistics from reports).
* Host candidates: aioice gathers every interface address except 127.0.0.1.
  A server must announce only the addresses it is configured for, so the list
  is set here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aioice.candidate
import aioice.ice
import aioice.turn
import aiortc.rtcicetransport
import pylibsrtp
from aiortc import RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc import clock as aiortc_clock
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    unpack_remb_fci,
)

from .errors import CodedError

__all__ = [
    "RtpPacket",
    "InboundTap",
    "OutboundPort",
    "ParkedTrack",
    "RtcpFeedback",
    "restrict_host_addresses",
    "restrict_port_range",
    "MediaPortsExhausted",
    "prefer_codec",
    "negotiated_payload_type",
    "ntp_now",
    "filter_inbound_rtp",
    "dtls_transport",
    "hold_encoder_bitrate",
    "SendFailed",
    "selected_local_candidate_type",
]

logger = logging.getLogger(__name__)

RTCP_PSFB_FIR = 4

PacketHandler = Callable[[RtpPacket], Awaitable[None]]


def ntp_now() -> int:
    """The current time as a 64-bit NTP timestamp, as aiortc's RTCP uses it."""
    return aiortc_clock.current_ntp_time()


# --- ICE host addresses -------------------------------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses


def restrict_host_addresses(addresses: Iterable[str] | None) -> None:
    """Gather ICE host candidates only on ``addresses`` (None: every interface).

    aioice looks this function up as a module global at gathering time, so the
    setting applies to every peer connection created afterwards in this process.
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    fixed = list(addresses)

    def configured(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = configured


# --- codecs ------------------------------------------------------------------


def prefer_codec(transceiver: RTCRtpTransceiver, mime_type: str, with_rtx: bool) -> None:
    """Offer only ``mime_type`` (and optionally its RTX) on this transceiver."""
    capabilities = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    wanted: list[RTCRtpCodecCapability] = [
        c for c in capabilities if c.mimeType.lower() == mime_type.lower()
    ]
    if not wanted:
        raise RuntimeError(f"aiortc does not offer {mime_type}")
    if with_rtx:
        wanted += [c for c in capabilities if c.mimeType.lower().endswith("/rtx")]
    transceiver.setCodecPreferences(wanted)


def negotiated_payload_type(transceiver: RTCRtpTransceiver, mime_type: str) -> int | None:
    """The payload type agreed for ``mime_type`` in the last negotiation."""
    for codec in transceiver._codecs:
        if codec.mimeType.lower() == mime_type.lower() and codec.payloadType is not None:
            return int(codec.payloadType)
    return None


def hold_encoder_bitrate(sender: RTCRtpSender, bitrate: int) -> None:
    """Make aiortc's own VP8 encoder on ``sender`` run at a fixed ``bitrate``.

    For benchmarks that need the same load in every run: aiortc starts its
    encoders at a module-wide default and follows the receiver's REMB; here
    the default is set and REMB is ignored for this sender.
    """
    import aiortc.codecs.vpx as vpx

    vpx.DEFAULT_BITRATE = bitrate
    original = sender._handle_rtcp_packet

    async def handle_rtcp_packet(packet: AnyRtcpPacket) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            return
        await original(packet)

    sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]


# --- inbound -----------------------------------------------------------------


class _PacketSink:
    """Stands in for aiortc's jitter buffer: keeps each packet for the tap."""

    def __init__(self) -> None:
        self.packets: deque[RtpPacket] = deque()

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        self.packets.append(packet)
        return False, None


class InboundTap:
    """Hands every RTP packet a receiver gets to ``on_packet``, undecoded.

    Packets arrive after SRTP, statistics, NACK generation and RTX unwrapping,
    so retransmissions come through with their original sequence number.
    """

    def __init__(self, receiver: RTCRtpReceiver, on_packet: PacketHandler) -> None:
        self._receiver = receiver
        self._on_packet = on_packet
        self.uplink_estimate: int | None = None  # aiortc's delay-based estimate of the publisher's uplink
        # When the packet being handed to on_packet reached the server (time.monotonic_ns; 0: unknown).
        self.arrival_ns = 0
        self._arrivals: _ArrivalStamps | None = None
        self._send_own_rtcp = receiver._send_rtcp

        async def send_rtcp(packet: AnyRtcpPacket) -> None:
            # aiortc sends its own REMB from this receiver; Nära decides the cap the
            # publisher is told (see send_remb), so keep aiortc's figure as one input.
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                try:
                    self.uplink_estimate = unpack_remb_fci(packet.fci)[0]
                except ValueError:
                    pass
                return
            await self._send_own_rtcp(packet)

        receiver._send_rtcp = send_rtcp  # type: ignore[method-assign]
        sink = _PacketSink()
        if not hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            raise RuntimeError("aiortc changed: RTCRtpReceiver has no jitter buffer to replace")
        receiver._RTCRtpReceiver__jitter_buffer = sink
        original = receiver._handle_rtp_packet

        async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
            await original(packet, arrival_time_ms)
            arrivals = self._arrivals or self._stamp_arrivals()
            while sink.packets:
                self.arrival_ns = arrivals.last_ns if arrivals is not None else 0
                await self._on_packet(sink.packets.popleft())

        receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]

    def _stamp_arrivals(self) -> _ArrivalStamps | None:
        self._arrivals = stamp_arrivals(self._receiver)
        return self._arrivals

    async def request_keyframe(self, media_ssrc: int) -> None:
        """Send a PLI to the publisher."""
        await self._receiver._send_rtcp_pli(media_ssrc)

    async def request_retransmission(self, media_ssrc: int, sequence_numbers: list[int]) -> None:
        """Send a generic NACK to the publisher.

        ``sequence_numbers`` in stream order; where they wrap past 65535 a
        second NACK carries the rest, as aiortc packs each NACK from its first
        number upwards (and fails on a list that wraps).
        """
        runs: list[list[int]] = []
        for seq in sequence_numbers:
            if runs and seq > runs[-1][-1]:
                runs[-1].append(seq)
            else:
                runs.append([seq])
        for run in runs:
            await self._receiver._send_rtcp_nack(media_ssrc, run)

    async def send_remb(self, bitrate: int, media_ssrcs: list[int]) -> None:
        """Tell the publisher the most it should send on these streams (REMB)."""
        rtcp_ssrc = self._receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
        if rtcp_ssrc is None:
            return
        packet = RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0,
                                fci=pack_remb_fci(bitrate, media_ssrcs))
        await self._send_own_rtcp(packet)


def filter_inbound_rtp(transport: Any, keep: Callable[[bytes], bool]) -> None:
    """Drop inbound RTP on ``transport`` (an RTCDtlsTransport) unless ``keep(data)``.

    Loss at the receiver's socket, before SRTP: ``data`` is the encrypted
    datagram, whose 12-byte RTP header is in the clear. Dropping before
    decryption matters: SRTP's replay protection would refuse a retransmission
    of a packet that had been decrypted once. For tests and benchmarks that
    need a link to lose packets without a network.
    """
    ice = transport.transport
    original = ice._recv

    async def recv() -> bytes:
        while True:
            data: bytes = await original()
            is_rtp = len(data) >= 12 and 127 < data[0] < 192 and not 192 <= data[1] <= 223
            if not is_rtp or keep(data):
                return data

    ice._recv = recv


def filter_outbound_rtcp(transport: Any, keep: Callable[[bytes], bool]) -> None:
    """Drop outbound RTCP on ``transport`` (an RTCDtlsTransport) unless ``keep(data)``.

    ``data`` is the plain RTCP datagram, before SRTCP protects it. Loss on the
    way out, for tests and benchmarks of what a lost report or NACK costs.
    """
    if not hasattr(transport, "_send_rtp"):
        raise RuntimeError("aiortc changed: RTCDtlsTransport has no _send_rtp to filter")
    original = transport._send_rtp

    async def send_rtp(data: bytes) -> None:
        if len(data) >= 2 and 192 <= data[1] <= 208 and not keep(data):
            return
        await original(data)

    transport._send_rtp = send_rtp


def selected_local_candidate_type(pc: Any) -> str | None:
    """'host', 'srflx' or 'relay': the kind of local candidate ICE chose, if any."""
    transport = dtls_transport(pc)
    if transport is None:
        return None
    pair = transport.transport._connection._nominated.get(1)
    return None if pair is None else str(pair.local_candidate.type)


def dtls_transport(pc: Any) -> Any:
    """The one DTLS transport of a max-bundle peer connection (None before negotiation)."""
    transceivers = pc.getTransceivers()
    return transceivers[0].receiver.transport if transceivers else None


# --- outbound ----------------------------------------------------------------


class ParkedTrack(MediaStreamTrack):
    """A track whose ``recv`` never returns: it parks the sender's own RTP loop.

    Without a track aiortc's sender polls every 20 ms; with this one it waits
    without waking, and Nära writes packets to the transport itself.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._never: asyncio.Future[None] | None = None

    async def recv(self) -> Any:
        self._never = asyncio.get_running_loop().create_future()
        await self._never
        raise asyncio.CancelledError

    def stop(self) -> None:
        if self._never is not None and not self._never.done():
            self._never.cancel()
        super().stop()


class SendFailed(ConnectionError):
    """A packet could not be protected or sent on an outbound stream."""


class RtcpFeedback:
    """What a subscriber told us about one outbound stream, in plain data."""

    __slots__ = ("kind", "lost", "bitrate", "fraction_lost", "packets_lost", "jitter", "highest_sequence")

    def __init__(
        self,
        kind: str,
        lost: list[int] | None = None,
        bitrate: int | None = None,
        fraction_lost: int = 0,
        packets_lost: int = 0,
        jitter: int = 0,
        highest_sequence: int = 0,
    ) -> None:
        self.kind = kind  # "nack" | "keyframe" | "remb" | "report"
        self.highest_sequence = highest_sequence  # extended highest sequence number received
        self.lost = lost or []
        self.bitrate = bitrate
        self.fraction_lost = fraction_lost
        self.packets_lost = packets_lost
        self.jitter = jitter


FeedbackHandler = Callable[[RtcpFeedback], Awaitable[None]]


class OutboundPort:
    """Sends Nära's RTP packets through an aiortc sender's transport."""

    def __init__(self, sender: RTCRtpSender, on_feedback: FeedbackHandler) -> None:
        for name in (
            "_RTCRtpSender__rtp_header_extensions_map",
            "_RTCRtpSender__ntp_timestamp",
            "_RTCRtpSender__rtp_timestamp",
            "_RTCRtpSender__octet_count",
            "_RTCRtpSender__packet_count",
            "_RTCRtpSender__rtt",
        ):
            if not hasattr(sender, name):
                raise RuntimeError(f"aiortc changed: RTCRtpSender has no {name}")
        self._sender = sender
        self._on_feedback = on_feedback
        self.ssrc: int = sender._ssrc
        self.payload_type: int | None = None
        self.mid: str | None = None
        self._templates: list[_HeaderTemplate | None] = [None, None]  # direct_send's headers, without/with level
        self._route: _Route | None = None  # where direct_send writes, while the ICE pair stays
        original = sender._handle_rtcp_packet

        async def handle_rtcp_packet(packet: AnyRtcpPacket) -> None:
            if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                await self._on_feedback(RtcpFeedback("nack", lost=list(packet.lost)))
            elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                await self._on_feedback(RtcpFeedback("keyframe"))
            elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                try:
                    bitrate, ssrcs = unpack_remb_fci(packet.fci)
                except ValueError:
                    return
                if self.ssrc in ssrcs:
                    await self._on_feedback(RtcpFeedback("remb", bitrate=bitrate))
            elif isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
                await original(packet)  # RTT and remote-inbound statistics
                for report in packet.reports:
                    if report.ssrc == self.ssrc:
                        await self._on_feedback(
                            RtcpFeedback(
                                "report",
                                fraction_lost=report.fraction_lost,
                                packets_lost=report.packets_lost,
                                jitter=report.jitter,
                                highest_sequence=report.highest_sequence,
                            )
                        )

        sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]

    def configure(self, payload_type: int, mid: str | None) -> None:
        self.payload_type = payload_type
        self.mid = mid
        self._templates = [None, None]
        self._route = None

    @property
    def sent(self) -> tuple[int, int]:
        """(packets, payload octets) sent on this stream so far, as its sender reports count them."""
        sender = self._sender
        return sender._RTCRtpSender__packet_count, sender._RTCRtpSender__octet_count  # type: ignore[attr-defined]

    @property
    def round_trip_time(self) -> float | None:
        """Smoothed RTT in seconds from the subscriber's receiver reports."""
        rtt: float | None = self._sender._RTCRtpSender__rtt  # type: ignore[attr-defined]
        return rtt

    @property
    def connected(self) -> bool:
        return bool(self._sender.transport.state == "connected")

    async def send(
        self,
        payload: bytes,
        *,
        sequence_number: int,
        timestamp: int,
        marker: int,
        padding_size: int = 0,
        audio_level: Any = None,
        probe: bool = False,
        resend: bool = False,
    ) -> None:
        """Send one RTP packet on this sender's SSRC and payload type (``probe``: a probe's padding;
        ``resend``: a packet sent before, asked for again).

        Raises ConnectionError (SendFailed for SRTP refusals) when the packet
        cannot go out; nothing else.
        """
        if self.payload_type is None:
            raise ConnectionError("outbound stream not negotiated yet")
        sender = self._sender
        packet = RtpPacket(
            payload_type=self.payload_type,
            marker=marker,
            sequence_number=sequence_number,
            timestamp=timestamp,
            ssrc=self.ssrc,
            payload=payload,
        )
        packet.padding_size = padding_size
        now = ntp_now()
        packet.extensions.abs_send_time = (now >> 14) & 0x00FFFFFF
        packet.extensions.mid = self.mid
        packet.extensions.audio_level = audio_level
        if stamps_transport_cc(sender):
            packet.extensions.transport_sequence_number = transport_history(sender.transport).take(
                time.monotonic(), len(payload) + padding_size + PACKET_SIZE_AROUND_PAYLOAD, probe or resend)
        data = packet.serialize(sender._RTCRtpSender__rtp_header_extensions_map)  # type: ignore[attr-defined]
        try:
            await sender.transport._send_rtp(data)
        except pylibsrtp.Error as exc:
            # An SRTP refusal concerns this stream only; it must never travel up
            # into the publisher's receive path that called us.
            raise SendFailed(f"SRTP refused the packet: {exc}") from exc
        # The sender's RTCP loop builds its sender reports from these.
        sender._RTCRtpSender__ntp_timestamp = now  # type: ignore[attr-defined]
        sender._RTCRtpSender__rtp_timestamp = timestamp  # type: ignore[attr-defined]
        sender._RTCRtpSender__octet_count += len(payload)  # type: ignore[attr-defined]
        sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]


# --- feedback for senders whose track hands aiortc finished packets -----------
#
# When a track returns ``av.Packet`` objects, aiortc's sender only packetises
# them: PLI/FIR set a flag nothing reads and REMB retunes an encoder that
# never runs. Nära's own encoders (mediaserver/video_encoders.py) get both here.


def follow_sender_feedback(
    sender: RTCRtpSender,
    on_remb: Callable[[int], None],
    on_keyframe_request: Callable[[], None],
) -> None:
    """Call ``on_remb(bitrate)`` for each REMB naming ``sender``'s SSRC and
    ``on_keyframe_request()`` for each PLI or FIR; aiortc keeps everything else
    (NACK retransmission from its history, RTT and statistics from reports).
    """
    original = sender._handle_rtcp_packet

    async def handle_rtcp_packet(packet: AnyRtcpPacket) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            on_keyframe_request()
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if sender._ssrc in ssrcs:
                on_remb(bitrate)
        else:
            await original(packet)

    sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]


async def send_keyframe_request(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Send a PLI for ``media_ssrc`` from a receiver that decodes as usual."""
    await receiver._send_rtcp_pli(media_ssrc)


async def send_bitrate_cap(receiver: RTCRtpReceiver, bitrate: int, media_ssrcs: list[int]) -> None:
    """Send a REMB of ``bitrate`` for ``media_ssrcs`` from a receiver that decodes as usual."""
    rtcp_ssrc = receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
    if rtcp_ssrc is None:
        raise ConnectionError("the receiver has not started RTCP yet")
    packet = RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(bitrate, media_ssrcs))
    await receiver._send_rtcp(packet)


# --- Nära's receive path for receivers that play or show what they get -------
#
# aiortc's own receive path decodes behind a jitter buffer that counts packets:
# audio loses frames under light loss and never uses Opus FEC, and video waits
# seconds behind one lost packet. ``nara_receive_track`` puts an InboundTap on
# the receiver (aiortc keeps statistics, receiver reports, NACKs and RTX) and
# feeds the packets to mediaserver/receive_track.py instead. Unlike the SFU, a
# receiver here keeps aiortc's own REMB, so the tap's interception is undone.

_receive_tasks: set[asyncio.Future[None]] = set()


def _keep_running(coroutine: Awaitable[None]) -> None:
    task = asyncio.ensure_future(coroutine)
    _receive_tasks.add(task)
    task.add_done_callback(_receive_tasks.discard)


def nara_receive_track(receiver: RTCRtpReceiver, kind: str, *, channels: int = 2) -> MediaStreamTrack:
    """A track that plays ``receiver``'s stream through Nära's receive path.

    Audio: a ``ReceivedAudioTrack`` (Opus decoded to 48 kHz s16 in 20 ms
    frames, now and then one lengthened or shortened to move the delay,
    ``channels`` 1 or 2, paced by its playout buffer, each frame marked "packet",
    "stretch", "shorten", "fec", "conceal" or "silence"; missing packets are asked for
    again with a generic NACK while they can still play). Video: a ``ReceivedVideoTrack``
    (VP8 pictures shown on their own clock; keyframe requests go out as PLI from this
    receiver, holes are asked for again with a generic NACK). Call it
    once the receiver has its remote track (after setRemoteDescription) and
    before media flows; read the returned track instead of ``receiver.track``.
    The track ends when the receiver stops.
    """
    from .receive_track import ReceivedAudioTrack, ReceivedVideoTrack, stop_when_ended

    remote = receiver.track
    if remote is None:
        raise ValueError("the receiver has no remote track yet: call this after setRemoteDescription")
    media_ssrc: int | None = None
    tap: InboundTap | None = None

    def request_keyframe() -> None:
        if tap is not None and media_ssrc is not None:
            _keep_running(tap.request_keyframe(media_ssrc))

    def request_retransmission(sequence_numbers: list[int]) -> None:
        # A generic NACK even though SDP offers none for Opus: Nära's SFU answers it from its cache.
        if tap is not None and media_ssrc is not None:
            _keep_running(tap.request_retransmission(media_ssrc, sequence_numbers))

    track: ReceivedAudioTrack | ReceivedVideoTrack
    if kind == "audio":
        audio = track = ReceivedAudioTrack(channels, request_retransmission=request_retransmission)

        async def on_packet(packet: RtpPacket) -> None:
            nonlocal media_ssrc
            media_ssrc = packet.ssrc
            now = asyncio.get_running_loop().time()
            audio.add_packet(packet.sequence_number, packet.timestamp, packet.payload, now, packet.ssrc)
    elif kind == "video":
        video = track = ReceivedVideoTrack(request_keyframe, request_retransmission=request_retransmission)

        async def on_packet(packet: RtpPacket) -> None:
            nonlocal media_ssrc
            media_ssrc = packet.ssrc
            now = asyncio.get_running_loop().time()
            video.add_packet(packet.sequence_number, packet.timestamp, bool(packet.marker), packet.payload,
                             now, packet.ssrc)
    else:
        raise ValueError(f"no receive path for {kind!r} media")
    tap = InboundTap(receiver, on_packet)
    if receiver.__dict__.pop("_send_rtcp", None) is None:
        raise RuntimeError("aiortc changed: InboundTap no longer wraps the receiver's _send_rtcp")
    route_retransmissions(receiver)
    send_transport_feedback(receiver)  # (the connection's transport-wide congestion control feedback)
    _keep_running(stop_when_ended(remote, track))
    return track


def route_retransmissions(receiver: RTCRtpReceiver) -> None:
    """Deliver ``receiver``'s RTX packets to it when several receivers share one bundle.

    aiortc's RTP router knows a receiver's media SSRC but not its RTX SSRC, so it
    routes an RTX packet by payload type alone; once two video receivers share
    the RTX payload type it drops every retransmission, and NACK repairs nothing.
    """
    if not hasattr(receiver, "_RTCRtpReceiver__rtx_ssrc") or not hasattr(receiver, "_RTCRtpReceiver__started"):
        raise RuntimeError("aiortc changed: RTCRtpReceiver keeps no RTX SSRC map")

    def register(rtx_ssrcs: Iterable[int]) -> None:
        router = receiver.transport._rtp_router
        for ssrc in rtx_ssrcs:
            router.ssrc_table[ssrc] = receiver

    if receiver._RTCRtpReceiver__started:
        register(receiver._RTCRtpReceiver__rtx_ssrc)
        return
    original = receiver.receive

    async def receive(parameters: Any) -> None:
        await original(parameters)
        register(e.rtx.ssrc for e in parameters.encodings if e.rtx is not None)

    receiver.receive = receive  # type: ignore[method-assign]


# --- raw round-trip times from receiver reports -----------------------------
#
# aiortc smooths each sender's round-trip time (an average that gives a new
# report 15 %) before getStats() shows it, so a queue building up on the kit's
# uplink shows there only after several reports. The kit's photo uploads
# (edge/uploader.py) yield to its call by each report's own round trip.


SENDER_REPORTS_KEPT = 16  # a report may answer any of our last this many sender reports


def follow_round_trips(sender: RTCRtpSender, on_rtt: Callable[[float], None]) -> None:
    """Call ``on_rtt(seconds)`` for every receiver report about ``sender``'s stream that answers
    one of its recent sender reports (RFC 3550 6.4.1: arrival − that SR's send time − DLSR); aiortc
    still gets every RTCP packet as before.

    aiortc remembers only its latest SR, and a report that answers an earlier one gives it no
    round trip. Once the uplink's queue holds more than the time between two SRs (0.5–1.5 s),
    or an SR is lost, every report answers an earlier one: aiortc then never sees the queue,
    so the send times of the last few SRs are kept here.
    """
    for name in ("_RTCRtpSender__lsr", "_RTCRtpSender__lsr_time", "_ssrc", "_send_rtcp"):
        if not hasattr(sender, name):
            raise RuntimeError(f"aiortc changed: RTCRtpSender has no {name}")
    import time  # aiortc stamps its sender reports with time.time()

    sent: dict[int, float] = {}  # LSR of each recent SR -> when it was sent
    original_send = sender._send_rtcp

    async def send_rtcp(packets: list[AnyRtcpPacket]) -> None:
        await original_send(packets)
        if any(isinstance(p, RtcpSrPacket) for p in packets):
            lsr, sent_at = sender._RTCRtpSender__lsr, sender._RTCRtpSender__lsr_time  # type: ignore[attr-defined]
            if lsr is not None and sent_at is not None:
                sent[lsr] = sent_at
                while len(sent) > SENDER_REPORTS_KEPT:
                    del sent[next(iter(sent))]

    original = sender._handle_rtcp_packet

    async def handle_rtcp_packet(packet: AnyRtcpPacket) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                sent_at = sent.get(report.lsr)
                if report.ssrc == sender._ssrc and report.dlsr and sent_at is not None:
                    on_rtt(time.time() - sent_at - report.dlsr / 65536)
        await original(packet)

    sender._send_rtcp = send_rtcp  # type: ignore[method-assign]
    sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]


# --- what a publisher's uplink lost, for IT staff's figures -------------------
#
# aiortc counts every inbound stream for its receiver reports, but getStats()
# files all of a receiver's streams under one id, so a video's retransmission
# stream hides its media stream there. Its per-stream counters are read here.


def inbound_packets(receiver: RTCRtpReceiver) -> tuple[int, int]:
    """(packets expected, packets lost) on the media streams ``receiver`` has received so far.

    Retransmissions come on a stream of their own (RTX), left out here: a packet repaired
    by one still counts as lost, so this is what the publisher's uplink itself lost. Reading
    it changes nothing (a receiver report's loss fraction is computed elsewhere).
    """
    streams = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    retransmissions = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    expected = lost = 0
    for ssrc, stream in list(streams.items()):
        if ssrc in retransmissions or stream.max_seq is None:
            continue
        expected += int(stream.packets_expected)
        lost += max(int(stream.packets_lost), 0)
    return expected, lost


# --- UDP port range for the SFU's ICE ------------------------------------------
#
# aioice binds each host candidate's socket to port 0 (any ephemeral port) and
# 0.13 takes no port range. aiortc builds every ICE connection from the name
# ``Connection`` in aiortc.rtcicetransport, so a subclass set there binds host
# sockets inside the configured range; server-reflexive and relayed candidates
# are still gathered by aioice itself.


class MediaPortsExhausted(CodedError):
    """Every UDP port of the configured range is taken on a media address."""

    def __init__(self, address: str, low: int, high: int) -> None:
        super().__init__(
            "media_ports_exhausted",
            f"The server has no free media port ({low}-{high} on {address} are all in use); "
            "it is full, try again later.",
        )


_original_ice_connection = aiortc.rtcicetransport.Connection  # type: ignore[attr-defined]
_port_range: tuple[int, int] | None = None
_next_port: int | None = None


def restrict_port_range(low: int | None, high: int | None) -> None:
    """Bind the host candidates of every ICE connection created afterwards in this process to a UDP port
    from ``low`` to ``high`` inclusive (None and None: any ephemeral port, aioice's own way).

    Each peer connection (bundled: all its media on one transport) takes one port per host address.
    """
    global _port_range, _next_port
    if low is None or high is None:
        _port_range = None
        aiortc.rtcicetransport.Connection = _original_ice_connection  # type: ignore[attr-defined]
        return
    _port_range, _next_port = (low, high), low
    aiortc.rtcicetransport.Connection = _RangedConnection  # type: ignore[attr-defined]


def _bind_in_range(address: str, low: int, high: int) -> socket.socket:
    """A UDP socket bound to ``address`` on a free port of the range, tried from where the last one left off."""
    global _next_port
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    start = _next_port if _next_port is not None and low <= _next_port <= high else low
    count = high - low + 1
    for i in range(count):
        port = low + (start - low + i) % count
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((address, port))
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        _next_port = low + (port - low + 1) % count
        return sock
    raise MediaPortsExhausted(address, low, high)


class _RangedConnection(aioice.ice.Connection):
    async def get_component_candidates(
        self, component: int, addresses: list[str], timeout: int = 5
    ) -> list[aioice.Candidate]:
        if _port_range is None:
            return await super().get_component_candidates(component, addresses, timeout)
        low, high = _port_range
        loop = asyncio.get_running_loop()
        sockets: list[socket.socket] = []
        try:
            for address in addresses:
                sockets.append(_bind_in_range(address, low, high))
        except MediaPortsExhausted:
            for sock in sockets:
                sock.close()
            raise
        protocols: list[aioice.ice.StunProtocol] = []
        for sock in sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, aioice.turn.UDP_SOCKET_BUFFER_SIZE)
            _, protocol = await loop.create_datagram_endpoint(lambda: aioice.ice.StunProtocol(self), sock=sock)
            host, port = sock.getsockname()[:2]
            protocol.local_candidate = aioice.Candidate(
                foundation=aioice.candidate.candidate_foundation("host", "udp", host),
                component=component, transport="udp",
                priority=aioice.candidate.candidate_priority(component, "host"),
                host=host, port=port, type="host",
            )
            protocols.append(protocol)
        self._protocols += protocols
        candidates = [p.local_candidate for p in protocols]
        if self.stun_server is not None:
            candidates += await self._reflexive_candidates(protocols, self.stun_server, timeout)
        # aioice itself for the rest (a TURN allocation, on a socket of its own); no host addresses left to bind.
        return candidates + await super().get_component_candidates(component, [], timeout)

    async def _reflexive_candidates(self, protocols: list[aioice.ice.StunProtocol], stun_server: tuple[str, int],
                                    timeout: int) -> list[aioice.Candidate]:
        tasks = [asyncio.create_task(aioice.ice.server_reflexive_candidate(p, stun_server))
                 for p in protocols if ":" not in p.local_candidate.host]
        if not tasks:
            return []
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        return [task.result()[0] for task in done if task.exception() is None]


# --- the lean forwarding path: arrival stamps and direct sends -----------------
#
# Profiles of the SFU under load (docs/benchmarks.md, issue 9) put most of a
# forwarded copy's cost in aiortc's general send path, not in the work a copy
# needs: an RtpPacket object built and serialised through the header extension
# map, aiortc's NTP clock read through datetime, then three coroutines
# (RTCDtlsTransport._send_rtp, aioice's Connection.sendto and
# StunProtocol.send_data) around one SRTP protect and one sendto. A copy only
# needs its header rewritten, so ``direct_send``:
#
# * keeps, per outbound stream, a header laid out once by aiortc's own
#   serialiser (MID, abs-send-time, audio level: the extensions it would
#   write), and patches sequence number, timestamp, marker, abs-send-time and
#   audio level into it in place;
# * joins it to the shared payload bytes (one allocation), protects it with
#   the transport's SRTP session and hands it to the nominated pair's datagram
#   transport, synchronously: no coroutine, no await, no task;
# * keeps the counters aiortc's sender reports and getStats() read.
#
# It declines (returns False) where aiortc's path must run: a pair relayed
# through TURN (whose send may wait for a channel binding), or a packet with
# padding. Arrival stamps: aioice queues each datagram for the DTLS transport;
# ``stamp_arrivals`` notes the time each one was queued, so the forwarding
# delay counts that queue too.

import struct  # noqa: E402
import time  # noqa: E402

from aiortc.rtcdtlstransport import State as _DtlsState  # noqa: E402

from .forwarding_delay import DelayHistogram  # noqa: E402

_NTP_OFFSET = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)
SRTP_TAG = 10  # bytes of SRTP authentication tag on each packet
PACKET_SIZE_AROUND_PAYLOAD = 32  # RTP header, its extensions and the SRTP tag, about (a send history's sizes)
_SEQ_TS = struct.Struct("!HL")


# While ``watch_socket_waits`` watches: the kernel's stamp of the datagram being handed to aioice now, on the
# monotonic clock (0: none). Its arrival stamp is then that, not the time it was read.
_kernel_arrival_ns = 0


class _ArrivalStamps:
    """When each datagram in one ICE connection's queue arrived (read from its socket, or, while socket waits
    are watched, stamped by the kernel as it reached the socket); ``last_ns``: the one taken last."""

    def __init__(self, queue: asyncio.Queue[Any]) -> None:
        self.last_ns = 0
        stamps: deque[int] = deque([0] * queue.qsize())  # (queued before stamping began: unknown)
        put, get = queue._put, queue._get
        clock = time.monotonic_ns

        def stamped_put(item: Any) -> None:
            stamps.append(_kernel_arrival_ns or clock())
            put(item)

        def stamped_get() -> Any:
            self.last_ns = stamps.popleft() if stamps else 0
            return get()

        queue._put = stamped_put  # type: ignore[method-assign]
        queue._get = stamped_get  # type: ignore[method-assign]


def stamp_arrivals(receiver: RTCRtpReceiver) -> _ArrivalStamps | None:
    """The arrival stamps of ``receiver``'s ICE connection, stamping from now on (None: no connection yet)."""
    try:
        queue = receiver.transport.transport._connection._queue
    except AttributeError:
        return None
    stamps: _ArrivalStamps | None = getattr(queue, "nara_arrivals", None)
    if stamps is None:
        stamps = _ArrivalStamps(queue)
        queue.nara_arrivals = stamps  # type: ignore[attr-defined]
    return stamps


class _HeaderTemplate:
    """One outbound stream's RTP header, laid out by aiortc, with the offsets of what changes per packet."""

    __slots__ = ("buffer", "payload_type", "abs_send_time_at", "audio_level_at", "transport_cc_at")

    def __init__(self, port: OutboundPort, audio_level: bool) -> None:
        extensions_map = port._sender._RTCRtpSender__rtp_header_extensions_map  # type: ignore[attr-defined]
        ids = extensions_map._HeaderExtensionsMap__ids
        packet = RtpPacket(payload_type=port.payload_type or 0, sequence_number=0, timestamp=0, ssrc=port.ssrc)
        packet.extensions.mid = port.mid
        packet.extensions.abs_send_time = 0
        packet.extensions.audio_level = (False, 0) if audio_level else None
        packet.extensions.transport_sequence_number = 0 if ids.transport_sequence_number else None
        header = packet.serialize(extensions_map)
        self.buffer = bytearray(header)
        self.payload_type = header[1] & 0x7F
        self.abs_send_time_at = 0
        self.audio_level_at = 0
        self.transport_cc_at = 0
        if len(header) == 12:
            return
        if header[12:14] != b"\xbe\xde":
            raise ValueError("not a one-byte header extension block")
        at, end = 16, len(header)
        while at < end:  # RFC 8285 one-byte elements: id << 4 | (length - 1), then the value
            if header[at] == 0:
                at += 1  # padding
                continue
            element_id, length = header[at] >> 4, (header[at] & 0x0F) + 1
            if element_id == ids.abs_send_time and length == 3:
                self.abs_send_time_at = at + 1
            elif element_id == ids.audio_level and length == 1:
                self.audio_level_at = at + 1
            elif element_id == ids.transport_sequence_number and length == 2:
                self.transport_cc_at = at + 1
            at += 1 + length


class _Route:
    """Where one outbound stream's packets go while its DTLS transport and ICE pair stay the same
    (looked up once, not through aiortc's properties for every packet)."""

    __slots__ = ("dtls", "nominated", "pair", "sendto", "address", "history")

    def __init__(self, dtls: Any, nominated: dict[int, Any], pair: Any) -> None:
        self.dtls = dtls
        self.history = transport_history(dtls)
        self.nominated = nominated
        self.pair = pair
        self.sendto = pair.protocol.transport.sendto
        self.address = pair.remote_addr


def _find_route(sender: Any) -> _Route | None:
    dtls = sender._RTCRtpSender__transport
    nominated = dtls._transport._connection._nominated
    pair = nominated.get(1)
    if pair is None or type(pair.protocol) is not aioice.ice.StunProtocol or not sender._RTCRtpSender__started:
        return None  # (relayed through TURN, or its header extensions not known yet: aiortc's own path)
    return _Route(dtls, nominated, pair)


def direct_send(port: OutboundPort, payload: bytes, sequence_number: int, timestamp: int, marker: int,
                audio_level: tuple[bool, int] | None, arrival_ns: int, delays: DelayHistogram,
                resend: bool = False) -> bool:
    """Send one forwarded packet on ``port``'s stream straight to the socket; False: use ``port.send``.

    ``arrival_ns``: when the packet it copies reached the server (``time.monotonic_ns``; 0 if
    unknown); its forwarding delay is recorded in ``delays``. ``resend``: a packet sent before, asked
    for again (a copy to the send history, ``SendHistory.take``). Raises ConnectionError (SendFailed for SRTP
    refusals) when the packet cannot go out.
    """
    sender: Any = port._sender
    route = port._route
    if route is None or route.dtls is not sender._RTCRtpSender__transport or route.nominated.get(1) is not route.pair:
        if sender._RTCRtpSender__transport._state is not _DtlsState.CONNECTED:
            raise ConnectionError("outbound stream not connected")
        route = port._route = _find_route(sender)
        if route is None or port.payload_type is None:
            return False
    dtls = route.dtls
    if dtls._state is not _DtlsState.CONNECTED:
        raise ConnectionError("outbound stream not connected")
    templates = port._templates
    template = templates[audio_level is not None]
    if template is None:
        template = templates[audio_level is not None] = _HeaderTemplate(port, audio_level is not None)
    buffer = template.buffer
    buffer[1] = (marker << 7) | template.payload_type
    _SEQ_TS.pack_into(buffer, 2, sequence_number, timestamp)
    now = time.time() + _NTP_OFFSET
    ntp = int(now * 4294967296.0)
    at = template.abs_send_time_at
    if at:
        abs_send_time = (ntp >> 14) & 0xFFFFFF
        buffer[at] = abs_send_time >> 16
        buffer[at + 1] = (abs_send_time >> 8) & 0xFF
        buffer[at + 2] = abs_send_time & 0xFF
    if audio_level is not None and template.audio_level_at:
        buffer[template.audio_level_at] = (0x80 if audio_level[0] else 0) | (audio_level[1] & 0x7F)
    at = template.transport_cc_at
    if at:
        transport_sequence = route.history.take(time.monotonic(), len(buffer) + len(payload) + SRTP_TAG, resend)
        buffer[at] = transport_sequence >> 8
        buffer[at + 1] = transport_sequence & 0xFF
    try:
        data = dtls._tx_srtp.protect(b"".join((buffer, payload)))
    except pylibsrtp.Error as exc:
        raise SendFailed(f"SRTP refused the packet: {exc}") from exc
    route.sendto(data, route.address)
    if arrival_ns:
        delays.record(time.monotonic_ns() - arrival_ns)
    # What aiortc's own path would have counted: its sender reports and getStats() read these.
    dtls._RTCDtlsTransport__tx_bytes += len(data)
    dtls._RTCDtlsTransport__tx_packets += 1
    sender._RTCRtpSender__ntp_timestamp = ntp
    sender._RTCRtpSender__rtp_timestamp = timestamp
    sender._RTCRtpSender__octet_count += len(payload)
    sender._RTCRtpSender__packet_count += 1
    return True


# --- load generators' receivers: RTP counted by its clear header ----------------
#
# A benchmark's subscribers must cost far less than the server they load, or
# they, not the server, are what is measured. SRTP leaves the RTP header in
# the clear, so ``count_rtp_headers`` takes each inbound RTP datagram as the
# socket delivers it, reads sequence number, timestamp and marker, and drops
# it: no queue, SRTP, parsing, bandwidth estimation or NACKs. Everything else
# (DTLS, SRTCP, so the sender reports) still reaches aiortc, and each
# receiver's statistics are fed as aiortc's own path would, so its receiver
# reports still tell the server what arrived, with jitter and round trips.


class _HeaderFields:
    """The fields of one RTP header aiortc's receive statistics read (one reused object)."""

    __slots__ = ("sequence_number", "timestamp")

    def __init__(self) -> None:
        self.sequence_number = 0
        self.timestamp = 0


RtpHeaderHandler = Callable[[int, int, int, bool, int], None]  # ssrc, sequence number, timestamp, marker, size


def count_rtp_headers(pc: Any, on_header: RtpHeaderHandler) -> None:
    """From now on, hand each inbound RTP datagram of ``pc`` (a connected, bundled peer connection)
    to ``on_header`` instead of aiortc's receive path; ``size`` is the whole encrypted datagram's."""
    from aiortc.rtcrtpreceiver import StreamStatistics

    transport = dtls_transport(pc)
    if transport is None:
        raise ConnectionError("the peer connection has no transport yet")
    connection = transport.transport._connection
    router = transport._rtp_router
    original = connection.data_received
    fields = _HeaderFields()
    unpack = struct.Struct("!BBHLL").unpack_from

    def data_received(data: bytes, component: int) -> None:
        if len(data) < 12 or not 127 < data[0] < 192 or 192 <= data[1] <= 223:
            original(data, component)  # DTLS, STUN, RTCP: aiortc's as before
            return
        _, second, seq, ts, ssrc = unpack(data)
        on_header(ssrc, seq, ts, second >= 128, len(data))
        receiver = router.ssrc_table.get(ssrc)
        if receiver is not None:
            streams = receiver._RTCRtpReceiver__remote_streams
            stream = streams.get(ssrc)
            if stream is None:
                clock_rate = 90000 if receiver._RTCRtpReceiver__kind == "video" else 48000
                stream = streams[ssrc] = StreamStatistics(clock_rate)
            fields.sequence_number, fields.timestamp = seq, ts
            stream.add(fields)

    connection.data_received = data_received


# --- transport-wide congestion control: negotiation, stamping, feedback ---------
#
# aiortc parses and writes the transport-wide sequence number header extension
# but neither negotiates it nor sends or reads transport feedback (RTCP RTPFB
# FMT 15). Nära offers it on every m-line the server sends on (the offer is
# trimmed for the rest by mediaserver/sdp.py), stamps every packet sent toward
# a subscriber with the connection's next number (``OutboundPort.send`` and
# ``direct_send``, through ``transport_history``), reads the subscriber's
# feedback from the connection's raw RTCP (``follow_transport_feedback``), and
# sends feedback from Nära's receive path (``send_transport_feedback``). The
# packet format and the records are in mediaserver/twcc.py.

import random  # noqa: E402

import aiortc.codecs  # noqa: E402
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpHeaderExtensionParameters  # noqa: E402

from .twcc import TRANSPORT_CC_URI, FeedbackRecorder, SendHistory, TransportFeedback, transport_feedbacks  # noqa: E402

TRANSPORT_CC_ID = 5  # the header extension's id, the same on every m-line of a bundle
FEEDBACK_INTERVAL = 0.075  # seconds between a receiver's transport feedback packets


def negotiate_transport_cc() -> None:
    """Offer and accept the transport-wide sequence number extension and ``transport-cc`` feedback
    on every audio and video codec (once per process; aiortc's tables are module globals)."""
    for kind in ("audio", "video"):
        extensions = aiortc.codecs.HEADER_EXTENSIONS[kind]
        if not any(e.uri == TRANSPORT_CC_URI for e in extensions):
            extensions.append(RTCRtpHeaderExtensionParameters(id=TRANSPORT_CC_ID, uri=TRANSPORT_CC_URI))
        for codec in aiortc.codecs.CODECS[kind]:
            if codec.mimeType.lower().endswith("/rtx"):
                continue
            if not any(f.type == "transport-cc" for f in codec.rtcpFeedback):
                codec.rtcpFeedback.append(RTCRtcpFeedback(type="transport-cc"))


negotiate_transport_cc()


def transport_history(dtls: Any) -> SendHistory:
    """The transport-wide sequence numbers sent on one DTLS transport (one connection, bundled)."""
    history: SendHistory | None = getattr(dtls, "nara_sent", None)
    if history is None:
        history = dtls.nara_sent = SendHistory()
    return history


def stamps_transport_cc(sender: RTCRtpSender) -> bool:
    """Whether ``sender``'s stream negotiated the transport-wide sequence number."""
    extensions_map = sender._RTCRtpSender__rtp_header_extensions_map  # type: ignore[attr-defined]
    return bool(extensions_map._HeaderExtensionsMap__ids.transport_sequence_number)


def stamp_sent_packets(sender: RTCRtpSender) -> None:
    """Stamp every RTP packet aiortc's own send loop makes for ``sender`` (media and resends alike) with
    its connection's next transport-wide sequence number once the stream has negotiated the extension,
    and record each in the connection's send history (``transport_history``): what a sender whose
    packets aiortc builds needs to read the receiver's transport feedback (``follow_transport_feedback``).
    aiortc serialises each packet's header extensions through the sender's map just before sending it,
    so the number is taken there. A resend gets a number of its own, as the feedback's format wants
    (aiortc's RTX packet shares its original's extensions). Sizes are not known there: recorded as 0."""
    extensions_map = sender._RTCRtpSender__rtp_header_extensions_map  # type: ignore[attr-defined]
    if getattr(extensions_map, "nara_stamped", False):
        return
    if not hasattr(extensions_map, "set") or not hasattr(sender, "transport"):
        raise RuntimeError("aiortc changed: RTCRtpSender's header extension map has no set()")
    original = extensions_map.set
    clock = time.monotonic

    def set_extensions(values: Any) -> Any:
        if stamps_transport_cc(sender):
            values.transport_sequence_number = transport_history(sender.transport).take(clock(), 0)
        return original(values)

    extensions_map.set = set_extensions
    extensions_map.nara_stamped = True


def follow_transport_feedback(pc: Any, on_feedback: Callable[[TransportFeedback], None]) -> SendHistory | None:
    """Call ``on_feedback`` for each transport feedback packet ``pc``'s remote side sends (read from
    the raw RTCP before aiortc parses it; aiortc still gets every packet). The connection's send
    history, or None before it has a transport."""
    dtls = dtls_transport(pc)
    if dtls is None:
        return None
    history = transport_history(dtls)
    if getattr(dtls, "nara_feedback_followed", False):
        return history
    if not hasattr(dtls, "_handle_rtcp_data"):
        raise RuntimeError("aiortc changed: RTCDtlsTransport has no _handle_rtcp_data")
    original = dtls._handle_rtcp_data

    async def handle_rtcp_data(data: bytes) -> None:
        for feedback in transport_feedbacks(data):
            on_feedback(feedback)
        await original(data)

    dtls._handle_rtcp_data = handle_rtcp_data
    dtls.nara_feedback_followed = True
    return history


def send_transport_feedback(receiver: RTCRtpReceiver) -> None:
    """Send transport feedback for everything ``receiver``'s connection receives, every 75 ms while
    packets come (once per connection, however many receivers share it)."""
    dtls: Any = receiver.transport
    if getattr(dtls, "nara_feedback", None) is not None:
        return
    router = dtls._rtp_router
    if not hasattr(router, "route_rtp"):
        raise RuntimeError("aiortc changed: RtpRouter has no route_rtp")
    recorder = dtls.nara_feedback = FeedbackRecorder(random.getrandbits(32))
    original = router.route_rtp
    clock = time.monotonic_ns

    def route_rtp(packet: RtpPacket) -> Any:
        sequence = packet.extensions.transport_sequence_number
        if sequence is not None:
            recorder.on_packet(sequence, clock() // 1000, packet.ssrc)
        return original(packet)

    router.route_rtp = route_rtp

    async def send_feedback() -> None:
        while dtls.state not in ("closed", "failed"):
            await asyncio.sleep(getattr(dtls, "nara_feedback_interval", None) or FEEDBACK_INTERVAL)
            packet = recorder.feedback() if dtls.state == "connected" else None
            if packet is not None:
                try:
                    await dtls._send_rtp(packet)
                except (ConnectionError, pylibsrtp.Error):
                    return

    _keep_running(send_feedback())


# --- ICE consent that a busy media worker does not lose ---------------------------
#
# aioice checks consent to send (RFC 7675) every 5 s with one request it waits
# 0.5 s for, and closes the connection after six unanswered in a row. On a media
# worker near its limit a publisher's socket holds a queue of its media: the
# answer to a check waits behind it, is read after 0.5 s and thrown away, and in
# nara bench forward 25 publishers' healthy connections were closed this way near
# 0.9 of a worker's core (only publishers: a subscriber's socket receives little,
# so its answers never queue). RFC 7675 lets consent expire 30 s after the last
# answer and has checks retransmitted; so here each check is a transaction with
# retransmissions (an answer up to 7.5 s late still counts), checks keep their own
# pace whether or not the one before was answered, time the loop was too busy to
# look at all does not count, and the connection closes once nothing has answered
# for CONSENT_TIMEOUT. The pace stays aioice's ``CONSENT_INTERVAL``.

import aioice.stun  # noqa: E402

CONSENT_TIMEOUT = 30.0  # seconds without an answer to any check before consent expires (RFC 7675)
CONSENT_RETRANSMISSIONS = 3  # a check is sent again after 0.5, 1.5 and 3.5 s and given up after 7.5 s


async def _query_consent(self: aioice.ice.Connection) -> None:
    assert self.remote_password is not None
    loop = asyncio.get_running_loop()
    key = self.remote_password.encode("utf8")
    answered_at = loop.time()
    checks: set[asyncio.Future[None]] = set()

    async def check(pair: Any) -> None:
        nonlocal answered_at
        try:
            await pair.protocol.request(self.build_request(pair, nominate=False), pair.remote_addr,
                                        integrity_key=key, retransmissions=CONSENT_RETRANSMISSIONS)
        except aioice.stun.TransactionError:
            return
        answered_at = max(answered_at, loop.time())

    try:
        while True:
            pause = aioice.ice.CONSENT_INTERVAL * (0.8 + 0.4 * random.random())
            due = loop.time() + pause
            await asyncio.sleep(pause)
            answered_at += max(loop.time() - due, 0.0)  # the loop was busy elsewhere: answers may be queued unread
            if loop.time() - answered_at > CONSENT_TIMEOUT:
                logger.info("ICE consent expired: no answer to a consent check for %.0f s", CONSENT_TIMEOUT)
                self._query_consent_task = None
                await self.close()
                return
            for pair in self._nominated.values():
                task = asyncio.ensure_future(check(pair))
                checks.add(task)
                task.add_done_callback(checks.discard)
    finally:
        for pending in list(checks):
            pending.cancel()


aioice.ice.Connection.query_consent = _query_consent  # type: ignore[method-assign]


# --- transport feedback paced for a thin uplink --------------------------------------
#
# Nära's receive path sends transport feedback every FEEDBACK_INTERVAL (75 ms):
# about 13 packets a second of some 80 bytes with their headers, 8 kbit/s, a
# thirtieth of a 256 kbit/s uplink (nara bench upload: 22 of the home kit's 38
# UDP packets a second beside a photo upload were not its audio). Each feedback
# packet covers every packet since the last, so a longer interval loses nothing
# but timeliness; libwebrtc itself spaces its feedback up to 250 ms apart on slow
# links. The home kit asks for THIN_FEEDBACK_INTERVAL while its uplink is thin.

THIN_FEEDBACK_INTERVAL = 0.25  # seconds between a thin uplink's transport feedback packets


def set_transport_feedback_interval(pc: Any, interval: float | None) -> bool:
    """Space the transport feedback ``pc`` sends ``interval`` seconds apart from its next packet on (None: the
    usual FEEDBACK_INTERVAL). False before ``pc`` has a transport (call it again once it has)."""
    dtls = dtls_transport(pc)
    if dtls is None:
        return False
    dtls.nara_feedback_interval = interval
    return True


# --- how long a datagram waited in its socket (a bench instrument) -----------------
#
# The forwarding delay (forwarding_delay.py) starts when aioice takes a datagram
# from its socket. Before that, the datagram waits in the socket's receive queue
# for the loop's next select, and asyncio reads one datagram per ready socket
# per turn of the loop: behind a long turn, or behind the rest of a keyframe's
# burst in the same socket, a datagram waits there unseen. With the loop watch on
# (loop_watch.py), the media worker asks the kernel when each datagram reached
# its socket (SIOCGSTAMPNS, right after the read: CLOCK_REALTIME, as
# ``time.time_ns``) and counts the difference in a histogram. It costs one
# ioctl per datagram read, which is why it is not left on.

import fcntl  # noqa: E402

SIOCGSTAMPNS = 0x8907  # Linux: the last datagram's arrival at this socket, as a struct timespec
SO_TIMESTAMP = 29  # Linux (asm-generic): stamp datagrams arriving at this socket
_TIMESPEC = struct.Struct("@qq")


def watch_socket_waits(waits: DelayHistogram) -> Callable[[], None]:
    """Count how long every SRTP/SRTCP datagram any ICE connection of this process reads had waited in its
    socket, into ``waits``, from now on; returns what stops it. Meanwhile each datagram's arrival stamp (what
    the forwarding delay is counted from) is the kernel's: the forwarding delay is then a copy's whole time in
    the server, from the datagram reaching its socket to the copy's ``sendto``."""
    plain = aioice.ice.StunProtocol.datagram_received
    empty = bytes(_TIMESPEC.size)
    # The kernel stamps arriving datagrams only while some socket wants stamps, and begins a moment after the
    # first asks (a datagram it did not stamp reads as arriving at the ioctl: no wait). This socket asks from now
    # on, so the media sockets' datagrams are all stamped by the time they flow.
    stamping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stamping.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)

    def timed(self: aioice.ice.StunProtocol, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if isinstance(data, bytes) and data and 127 < data[0] < 192:  # (RTP and RTCP, not STUN or DTLS)
            try:
                fd = self.nara_socket_fd  # type: ignore[attr-defined]
            except AttributeError:
                fd = self.nara_socket_fd = self.transport.get_extra_info("socket").fileno()  # type: ignore[attr-defined]
            try:
                seconds, nanoseconds = _TIMESPEC.unpack(fcntl.ioctl(fd, SIOCGSTAMPNS, empty))
            except OSError:
                pass  # (ENOENT: the socket's first datagram, before the kernel stamped any)
            else:
                waited = max(time.time_ns() - seconds * 1_000_000_000 - nanoseconds, 1)  # (the stamp is wall time)
                waits.record(waited)
                global _kernel_arrival_ns
                _kernel_arrival_ns = time.monotonic_ns() - waited
                try:
                    plain(self, data, addr)
                finally:
                    _kernel_arrival_ns = 0
                return
        plain(self, data, addr)

    aioice.ice.StunProtocol.datagram_received = timed  # type: ignore[method-assign]

    def stop() -> None:
        aioice.ice.StunProtocol.datagram_received = plain  # type: ignore[method-assign]
        stamping.close()

    return stop


# --- several datagrams per ready socket per turn of the loop ---------------------------
#
# asyncio reads one datagram from a ready socket per turn of the loop, and aioice
# hands each to aiortc's receive task, which runs in the next turn. A keyframe
# arrives as a burst of datagrams in one socket: its last one waited in the
# socket for as many turns as the burst had datagrams (the loop watch's socket
# waits, docs/benchmarks.md, issue 9), each turn also paying a select and a task
# wake-up per datagram. Read up to READS_PER_TURN of them at once instead: the
# receive task then takes them from its queue in one step. (One run at 144
# subscribers, 0.78 of the worker's core: the socket waits' p95 9-16 ms against
# 17-500 ms without; the media worker turns it on at its start: worker.py.)

import asyncio.selector_events  # noqa: E402

READS_PER_TURN = 16


def read_datagrams_in_batches(reads: int = READS_PER_TURN) -> Callable[[], None]:
    """From now on, every datagram transport asyncio makes in this process reads up to ``reads`` datagrams when
    its socket is ready (a media worker's are all ICE connections'); returns what restores asyncio's own."""
    transport: Any = asyncio.selector_events._SelectorDatagramTransport  # type: ignore[attr-defined]
    plain = transport._read_ready

    def read_ready(self: Any) -> None:
        for _ in range(reads):
            if self._conn_lost:
                return
            try:
                data, addr = self._sock.recvfrom(self.max_size)
            except (BlockingIOError, InterruptedError):
                return  # (drained)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal read error on datagram transport")
                return
            self._protocol.datagram_received(data, addr)

    transport._read_ready = read_ready

    def restore() -> None:
        transport._read_ready = plain

    return restore


# --- receivers' rate windows, kept out of the collector's walks -------------------------
#
# Every video receiver aiortc makes (a subscriber's too, whose receiver never gets
# a packet) holds a bitrate estimator whose rate counter keeps a second in 1000
# bucket objects. In a media worker at 180 subscribers those were 168,000 of the
# 257,000 objects the garbage collector tracks, and each of its full passes walks
# every one while the loop, and every packet, waits: 100-200 ms (docs/benchmarks.md,
# issue 9). ``RateWindow`` counts the same in two arrays, which the collector does
# not track, and gives the same rates; ``aiortc.rate`` looks its ``RateCounter`` up
# when an estimator is made, so the swap applies to every receiver made afterwards.

from array import array  # noqa: E402

import aiortc.rate  # noqa: E402

AIORTC_RATE_COUNTER: Any = getattr(aiortc.rate, "RateCounter", None)  # (aiortc's own, for the tests' comparison)


class RateWindow:
    """aiortc's ``RateCounter`` (what arrived in the last ``window_size`` ms, in 1 ms buckets) without an
    object per bucket."""

    __slots__ = ("_counts", "_values", "_origin_index", "_origin_ms", "_scale", "_window_size", "_total_count",
                 "_total_value")

    def __init__(self, window_size: int, scale: int = 8000) -> None:
        self._scale = scale
        self._window_size = window_size
        self._origin_ms: int | None = None
        self.reset()

    def add(self, value: int, now_ms: int) -> None:
        if self._origin_ms is None:
            self._origin_ms = now_ms
        else:
            self._erase_old(now_ms)
        index = (self._origin_index + now_ms - self._origin_ms) % self._window_size
        self._counts[index] += 1
        self._values[index] += value
        self._total_count += 1
        self._total_value += value

    def rate(self, now_ms: int) -> int | None:
        if self._origin_ms is not None:
            self._erase_old(now_ms)
            active_window_size = now_ms - self._origin_ms + 1
            if self._total_count > 0 and active_window_size > 1:
                return round(self._scale * self._total_value / active_window_size)
        return None

    def reset(self) -> None:
        self._empty()
        self._origin_index = 0
        self._origin_ms = None

    def _empty(self) -> None:
        self._counts = array("q", bytes(8 * self._window_size))
        self._values = array("q", bytes(8 * self._window_size))
        self._total_count = self._total_value = 0

    def _erase_old(self, now_ms: int) -> None:
        assert self._origin_ms is not None
        new_origin_ms = now_ms - self._window_size + 1
        if new_origin_ms - self._origin_ms >= self._window_size:
            # (the whole window has passed: every bucket empties, and the origin moves as it would a ms at a time)
            self._origin_index = (self._origin_index + new_origin_ms - self._origin_ms) % self._window_size
            self._origin_ms = new_origin_ms
            self._empty()
            return
        counts, values, size = self._counts, self._values, self._window_size
        while self._origin_ms < new_origin_ms:
            index = self._origin_index
            self._total_count -= counts[index]
            self._total_value -= values[index]
            counts[index] = values[index] = 0
            self._origin_index = (index + 1) % size
            self._origin_ms += 1


def compact_rate_windows() -> None:
    """Make every receive bitrate estimator aiortc makes from now on (in this process) count in a ``RateWindow``."""
    if not hasattr(aiortc.rate, "RateCounter") or not hasattr(aiortc.rate, "RemoteBitrateEstimator"):
        raise RuntimeError("aiortc changed: aiortc.rate has no RateCounter for its receive estimator")
    aiortc.rate.RateCounter = RateWindow  # type: ignore[misc,assignment]


compact_rate_windows()
