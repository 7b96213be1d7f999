"""The aiortc internals Nära relies on. These fail loudly when aiortc changes.

If one of these fails after an aiortc upgrade, read
mediaserver/aiortc_adapter.py's module docstring before changing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

import aioice.ice
import aiortc
import pytest
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCDtlsTransport,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
)

from mediaserver import aiortc_adapter
from mediaserver.aiortc_adapter import (
    InboundTap,
    OutboundPort,
    ParkedTrack,
    RtcpFeedback,
    RtpPacket,
    SendFailed,
    negotiated_payload_type,
    prefer_codec,
    restrict_host_addresses,
)


def test_pinned_minor_version() -> None:
    assert aiortc.__version__.startswith("1.16."), (
        f"aiortc {aiortc.__version__}: the adapter is tested against 1.16 only"
    )


def test_internal_hook_points_exist_with_expected_signatures() -> None:
    assert list(inspect.signature(RTCRtpReceiver._handle_rtp_packet).parameters) == [
        "self", "packet", "arrival_time_ms"]
    assert list(inspect.signature(RTCRtpSender._handle_rtcp_packet).parameters) == ["self", "packet"]
    assert list(inspect.signature(RTCRtpReceiver._send_rtcp_pli).parameters) == ["self", "media_ssrc"]
    assert list(inspect.signature(RTCRtpReceiver._send_rtcp_nack).parameters) == [
        "self", "media_ssrc", "lost"]
    assert list(inspect.signature(aioice.ice.get_host_addresses).parameters) == ["use_ipv4", "use_ipv6"]
    source = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    assert "self.__jitter_buffer.add(packet)" in source
    assert "unwrap_rtx" in source and "nack_generator" in source
    assert "self.transport._recv()" in inspect.getsource(RTCDtlsTransport._recv_next)
    sender_source = inspect.getsource(RTCRtpSender._run_rtcp)
    for name in ("__ntp_timestamp", "__rtp_timestamp", "__packet_count", "__octet_count"):
        assert f"self.{name}" in sender_source


Pair = tuple[
    RTCPeerConnection, RTCPeerConnection, OutboundPort, list[RtpPacket], list[RtcpFeedback], InboundTap
]


async def connected_pair() -> Pair:
    config = RTCConfiguration(bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    sender_pc, receiver_pc = RTCPeerConnection(config), RTCPeerConnection(config)
    send_t = sender_pc.addTransceiver(ParkedTrack("video"), direction="sendonly")
    prefer_codec(send_t, "video/VP8", with_rtx=False)
    feedback: list[RtcpFeedback] = []

    async def on_feedback(f: RtcpFeedback) -> None:
        feedback.append(f)
        arrived.set()

    port = OutboundPort(send_t.sender, on_feedback)
    await sender_pc.setLocalDescription(await sender_pc.createOffer())
    await receiver_pc.setRemoteDescription(sender_pc.localDescription)
    received: list[RtpPacket] = []

    async def on_packet(p: RtpPacket) -> None:
        received.append(p)
        arrived.set()

    recv_t = receiver_pc.getTransceivers()[0]
    tap = InboundTap(recv_t.receiver, on_packet)
    await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
    await sender_pc.setRemoteDescription(receiver_pc.localDescription)
    connected = asyncio.Event()

    @sender_pc.on("connectionstatechange")
    def _() -> None:
        if sender_pc.connectionState == "connected":
            connected.set()

    await asyncio.wait_for(connected.wait(), 10)
    pt = negotiated_payload_type(send_t, "video/VP8")
    assert pt is not None
    port.configure(pt, send_t.mid)
    assert port.connected
    return sender_pc, receiver_pc, port, received, feedback, tap


async def test_packets_pass_untouched_from_port_to_tap_and_feedback_comes_back() -> None:
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc, port, received, feedback, tap = await connected_pair()
    try:
        payloads = [bytes([0x10, 0x00]) + bytes([i]) * 200 for i in range(5)]
        for i, payload in enumerate(payloads):
            await port.send(payload, sequence_number=10000 + i, timestamp=9000 + i * 3000, marker=1)
        await asyncio.wait_for(_until(lambda: len(received) == 5), 5)
        assert [p.payload for p in received] == payloads
        assert [p.sequence_number for p in received] == list(range(10000, 10005))
        assert [p.timestamp for p in received] == [9000 + i * 3000 for i in range(5)]
        assert {p.ssrc for p in received} == {port.ssrc}
        # SRTP refuses a sequence number far behind the last one: that surfaces as SendFailed
        with pytest.raises(SendFailed):
            await port.send(payloads[0], sequence_number=10004 - 3000, timestamp=0, marker=1)
        # the receiver's side asks for a keyframe and a retransmission: both reach the port
        await tap.request_keyframe(port.ssrc)
        await tap.request_retransmission(port.ssrc, [10002, 10003])
        await asyncio.wait_for(_until(lambda: {f.kind for f in feedback} >= {"keyframe", "nack"}), 5)
        nack = next(f for f in feedback if f.kind == "nack")
        assert nack.lost == [10002, 10003]
        # nothing was decoded: the remote track never yields a frame
        track = receiver_pc.getTransceivers()[0].receiver.track
        assert track._queue.empty()  # type: ignore[attr-defined]
    finally:
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)


arrived = asyncio.Event()  # set whenever a packet or feedback arrives


async def _until(predicate) -> None:  # type: ignore[no-untyped-def]
    while not predicate():
        arrived.clear()
        await arrived.wait()


def test_host_addresses_are_restricted_and_restored() -> None:
    restrict_host_addresses(["127.0.0.1", "::1"])
    try:
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1", "::1"]
    finally:
        restrict_host_addresses(None)
    assert aioice.ice.get_host_addresses is aiortc_adapter._original_get_host_addresses


# --- feedback for senders whose track hands aiortc finished packets -----------


def test_sender_feedback_assumptions_hold() -> None:
    from aiortc import RTCRtpReceiver, RTCRtpSender

    handler = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    assert "self._retransmit(seq)" in handler  # NACK: aiortc retransmits from its history
    assert "self._send_keyframe()" in handler and "target_bitrate" in handler  # what it does for its own encoders
    assert "self.__encoder.pack(data)" in inspect.getsource(RTCRtpSender._next_encoded_frame)
    assert list(inspect.signature(RTCRtpReceiver._send_rtcp).parameters) == ["self", "packet"]
    assert "self.__rtcp_ssrc" in inspect.getsource(RTCRtpReceiver)


async def test_sender_feedback_reaches_nara_and_reports_still_reach_aiortc() -> None:
    from aiortc.mediastreams import VideoStreamTrack

    from mediaserver.aiortc_adapter import follow_sender_feedback, send_bitrate_cap, send_keyframe_request

    restrict_host_addresses(["127.0.0.1"])
    publisher, subscriber = RTCPeerConnection(), RTCPeerConnection()
    rembs: list[int] = []
    keyframe_requests: list[None] = []
    try:
        transceiver = publisher.addTransceiver(VideoStreamTrack(), direction="sendonly")
        follow_sender_feedback(transceiver.sender, rembs.append, lambda: keyframe_requests.append(None))
        await publisher.setLocalDescription(await publisher.createOffer())
        await subscriber.setRemoteDescription(publisher.localDescription)
        await subscriber.setLocalDescription(await subscriber.createAnswer())
        await publisher.setRemoteDescription(subscriber.localDescription)
        receiver = subscriber.getTransceivers()[0].receiver
        remote = receiver.track
        await asyncio.wait_for(remote.recv(), 10)
        stats = await transceiver.sender.getStats()
        ssrc = next(s.ssrc for s in stats.values() if s.type == "outbound-rtp")

        await send_bitrate_cap(receiver, 123_456, [ssrc])
        await send_bitrate_cap(receiver, 7_000, [ssrc + 1])  # for another stream: not ours
        await send_keyframe_request(receiver, ssrc)

        async def frames_until(predicate) -> None:  # type: ignore[no-untyped-def]
            while not predicate():
                await remote.recv()

        await asyncio.wait_for(frames_until(lambda: 123_456 in rembs and keyframe_requests), 10)
        assert 7_000 not in rembs

        async def round_trip_known() -> bool:
            stats = await transceiver.sender.getStats()
            return any(s.type == "remote-inbound-rtp" for s in stats.values())

        async def reports_reach_aiortc() -> None:
            while not await round_trip_known():  # receiver reports go to aiortc as before
                await remote.recv()

        await asyncio.wait_for(reports_reach_aiortc(), 10)
    finally:
        await publisher.close()
        await subscriber.close()
        restrict_host_addresses(None)


# --- Nära's receive path: nara_receive_track, route_retransmissions -----------------


def test_receive_path_hook_points_exist() -> None:
    from aiortc.rtcdtlstransport import RtpRouter
    from aiortc.rtcrtpreceiver import decoder_worker

    assert list(inspect.signature(RTCRtpReceiver.receive).parameters) == ["self", "parameters"]
    assert "self.__rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc" in inspect.getsource(RTCRtpReceiver.receive)
    route = inspect.getsource(RtpRouter.route_rtp)
    assert "self.ssrc_table.get(packet.ssrc)" in route and "len(pt_receivers) == 1" in route
    # aiortc still registers media SSRCs only; once it registers RTX SSRCs, route_retransmissions can go
    register = inspect.getsource(RTCDtlsTransport._register_rtp_receiver)
    assert "encoding.ssrc" in register and "rtx" not in register
    # a stopped receiver ends its remote track through the decoder queue: that is how Nära's track ends
    assert "output_q.put(None)" in inspect.getsource(decoder_worker)
    # filter_outbound_rtcp: every RTCP datagram still leaves through _send_rtp, in the clear until it protects it
    assert list(inspect.signature(RTCDtlsTransport._send_rtp).parameters) == ["self", "data"]
    assert "protect_rtcp(data)" in inspect.getsource(RTCDtlsTransport._send_rtp)
    assert "self.transport._send_rtp(" in inspect.getsource(RTCRtpReceiver._send_rtcp)


async def test_nara_receive_track_keeps_aiortcs_feedback_and_gets_its_retransmissions() -> None:
    from aiortc.mediastreams import MediaStreamError
    from aiortc.rtp import RtcpPsfbPacket, RtcpRrPacket, RtcpRtpfbPacket

    from bench.synthetic import StampedVideoTrack
    from mediaserver.aiortc_adapter import dtls_transport, filter_inbound_rtp, nara_receive_track
    from mediaserver.receive_track import ReceivedVideoTrack

    restrict_host_addresses(["127.0.0.1"])
    config = RTCConfiguration(bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    publisher, subscriber = RTCPeerConnection(config), RTCPeerConnection(config)
    # two videos in one bundle share the RTX payload type: aiortc alone would drop every retransmission
    for tag in (1, 2):
        publisher.addTransceiver(StampedVideoTrack(tag, 320, 240, 15), direction="sendonly")
    sender = publisher.getTransceivers()[0].sender
    feedback: list[str] = []
    original = sender._handle_rtcp_packet

    async def handle_rtcp_packet(packet: object) -> None:
        if isinstance(packet, RtcpRtpfbPacket):
            feedback.append("nack")
        elif isinstance(packet, RtcpPsfbPacket):
            feedback.append("remb" if packet.fmt == 15 else "pli")
        elif isinstance(packet, RtcpRrPacket):
            feedback.append("report")
        await original(packet)  # type: ignore[arg-type]

    sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]
    seen = 0

    def keep(data: bytes) -> bool:  # lose the 40th packet of the first video, once
        nonlocal seen
        if int.from_bytes(data[8:12], "big") == sender._ssrc:
            seen += 1
            return seen != 40
        return True

    try:
        await publisher.setLocalDescription(await publisher.createOffer())
        await subscriber.setRemoteDescription(publisher.localDescription)
        tracks = [nara_receive_track(t.receiver, "video") for t in subscriber.getTransceivers()]
        receivers = [t.receiver for t in subscriber.getTransceivers()]
        assert all("_send_rtcp" not in r.__dict__ for r in receivers)  # aiortc's own REMB goes out again
        await subscriber.setLocalDescription(await subscriber.createAnswer())
        await publisher.setRemoteDescription(subscriber.localDescription)
        filter_inbound_rtp(dtls_transport(subscriber), keep)
        track = tracks[0]
        assert isinstance(track, ReceivedVideoTrack)

        async def pictures_until(predicate) -> None:  # type: ignore[no-untyped-def]
            while not predicate():
                await track.recv()

        await asyncio.wait_for(pictures_until(
            lambda: seen > 60 and {"nack", "remb", "report"} <= set(feedback)), 15)
        assert track.counters.frames_dropped == 0  # the lost packet came back as a retransmission
        assert track.counters.keyframes_requested == 0 and "pli" not in feedback
    finally:
        await publisher.close()
        await subscriber.close()
        restrict_host_addresses(None)
    with pytest.raises(MediaStreamError):  # the track ends with its receiver
        await asyncio.wait_for(track.recv(), 5)


# --- raw round-trip times from receiver reports -----------------------------


def test_round_trip_assumptions_hold() -> None:
    handler = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    assert "self.__lsr == report.lsr and report.dlsr" in handler
    assert "time.time() - self.__lsr_time - (report.dlsr / 65536)" in handler
    assert "self.__lsr_time = time.time()" in inspect.getsource(RTCRtpSender._run_rtcp)


@contextlib.asynccontextmanager
async def audio_call_following_round_trips(
        round_trips: list[float]) -> AsyncIterator[tuple[RTCRtpTransceiver, RTCRtpReceiver]]:
    """An aiortc audio call on loopback whose sender hands each receiver report's round trip to ``round_trips``."""
    from aiortc.mediastreams import AudioStreamTrack

    from mediaserver.aiortc_adapter import follow_round_trips

    restrict_host_addresses(["127.0.0.1"])
    publisher, subscriber = RTCPeerConnection(), RTCPeerConnection()
    try:
        transceiver = publisher.addTransceiver(AudioStreamTrack(), direction="sendonly")
        follow_round_trips(transceiver.sender, round_trips.append)
        await publisher.setLocalDescription(await publisher.createOffer())
        await subscriber.setRemoteDescription(publisher.localDescription)
        await subscriber.setLocalDescription(await subscriber.createAnswer())
        await publisher.setRemoteDescription(subscriber.localDescription)
        yield transceiver, subscriber.getTransceivers()[0].receiver
    finally:
        await publisher.close()
        await subscriber.close()
        restrict_host_addresses(None)


async def test_each_receiver_report_gives_its_round_trip_and_aiortc_still_gets_it() -> None:
    round_trips: list[float] = []
    async with audio_call_following_round_trips(round_trips) as (transceiver, receiver):
        remote = receiver.track

        async def frames_until_two_reports() -> None:
            while len(round_trips) < 2:
                await remote.recv()

        await asyncio.wait_for(frames_until_two_reports(), 15)
        assert all(0.0 <= rtt < 0.2 for rtt in round_trips), round_trips  # loopback
        stats = await transceiver.sender.getStats()
        smoothed = [s.roundTripTime for s in stats.values() if s.type == "remote-inbound-rtp"]
        assert smoothed and smoothed[0] is not None and 0.0 <= smoothed[0] < 0.2


# --- round trips longer than the time between sender reports ----------------


def test_a_sender_keeps_only_its_latest_report_and_sends_through_send_rtcp() -> None:
    assert "await self._send_rtcp(packets)" in inspect.getsource(RTCRtpSender._run_rtcp)
    assert "self.__lsr = ((self.__ntp_timestamp) >> 16) & 0xFFFFFFFF" in inspect.getsource(RTCRtpSender._run_rtcp)


async def test_a_queue_longer_than_the_time_between_sender_reports_still_shows_in_the_round_trips() -> None:
    round_trips: list[float] = []
    async with audio_call_following_round_trips(round_trips) as (_, receiver):
        send_now = receiver._send_rtcp

        async def held_in_a_queue(packet: object) -> None:  # every report waits 1.7 s, as behind a full uplink
            await asyncio.sleep(1.7)  # the emulated queue, not a wait for an event
            await send_now(packet)

        receiver._send_rtcp = held_in_a_queue  # type: ignore[method-assign]

        async def frames_until_two_reports() -> None:
            while len(round_trips) < 2:
                await receiver.track.recv()

        await asyncio.wait_for(frames_until_two_reports(), 20)
        # By the time each report arrives the publisher has sent a newer sender report; the round trip
        # is still measured from the one each report answers.
        assert all(1.6 < rtt < 2.2 for rtt in round_trips), round_trips


# --- what a publisher's uplink lost, for IT staff's figures -------------------


async def test_inbound_packets_counts_the_uplinks_own_loss_even_when_retransmissions_repair_it() -> None:
    from bench.synthetic import StampedVideoTrack
    from mediaserver.aiortc_adapter import dtls_transport, filter_inbound_rtp, inbound_packets

    restrict_host_addresses(["127.0.0.1"])
    publisher, subscriber = RTCPeerConnection(), RTCPeerConnection()
    publisher.addTransceiver(StampedVideoTrack(1, 320, 240, 15), direction="sendonly")
    sender = publisher.getTransceivers()[0].sender
    seen = dropped = 0

    def keep(data: bytes) -> bool:  # lose every tenth packet of the video itself (not of its retransmissions)
        nonlocal seen, dropped
        if int.from_bytes(data[8:12], "big") != sender._ssrc:
            return True
        seen += 1
        dropped += seen % 10 == 0
        return seen % 10 != 0

    try:
        await publisher.setLocalDescription(await publisher.createOffer())
        await subscriber.setRemoteDescription(publisher.localDescription)
        await subscriber.setLocalDescription(await subscriber.createAnswer())
        await publisher.setRemoteDescription(subscriber.localDescription)
        filter_inbound_rtp(dtls_transport(subscriber), keep)
        receiver = subscriber.getTransceivers()[0].receiver

        async def frames_until_enough() -> None:
            while seen < 200:
                await receiver.track.recv()

        await asyncio.wait_for(frames_until_enough(), 20)
        expected, lost = inbound_packets(receiver)
        assert len(receiver._RTCRtpReceiver__remote_streams) == 2  # the video and its retransmissions
        assert expected >= 190 and abs(lost - dropped) <= 2, (expected, lost, dropped)
        assert inbound_packets(receiver) == (expected, lost)  # reading changes nothing
    finally:
        await publisher.close()
        await subscriber.close()
        restrict_host_addresses(None)


# --- UDP port range for the SFU's ICE ------------------------------------------


def test_aiortc_builds_ice_connections_from_aioice_whose_host_binding_the_port_range_replaces() -> None:
    import aioice.turn
    import aiortc.rtcicetransport

    assert aiortc_adapter._original_ice_connection is aioice.ice.Connection
    assert "Connection(" in inspect.getsource(aiortc.rtcicetransport.RTCIceGatherer.__init__)
    assert "ephemeral_ports" not in inspect.signature(aioice.ice.Connection).parameters, (
        "aioice takes a port range of its own now: pass it instead of replacing host gathering")
    gather = aioice.ice.Connection.get_component_candidates
    assert list(inspect.signature(gather).parameters) == ["self", "component", "addresses", "timeout"]
    assert "local_addr=(address, 0)" in inspect.getsource(gather), "the bind the range replaces"
    assert "self.get_component_candidates(" in inspect.getsource(aioice.ice.Connection.gather_candidates)
    assert list(inspect.signature(aioice.ice.server_reflexive_candidate).parameters) == ["protocol", "stun_server"]
    assert isinstance(aioice.turn.UDP_SOCKET_BUFFER_SIZE, int)




async def _host_port(pc: RTCPeerConnection) -> int:
    pc.addTransceiver("audio")
    pc.addTransceiver("video")
    await pc.setLocalDescription(await pc.createOffer())
    ports = {int(line.split()[5]) for line in pc.localDescription.sdp.splitlines() if line.startswith("a=candidate:")}
    assert len(ports) == 1, ports  # bundled: one port for all of a peer connection's media
    return ports.pop()


async def test_port_range_binds_each_peer_connection_inside_it_and_refuses_clearly_when_full() -> None:
    from mediaserver.aiortc_adapter import MediaPortsExhausted, restrict_port_range

    from .ports import free_udp_pair

    def bundled() -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))

    low = free_udp_pair(47000)
    first, second, third, fourth = bundled(), bundled(), bundled(), bundled()
    restrict_host_addresses(["127.0.0.1"])  # one host address: one port per peer connection
    restrict_port_range(low, low + 1)
    try:
        ports = {await _host_port(first), await _host_port(second)}
        assert ports == {low, low + 1}
        with pytest.raises(MediaPortsExhausted) as refused:
            await _host_port(third)
        assert refused.value.code == "media_ports_exhausted" and f"{low}-{low + 1}" in refused.value.message
        await first.close()
        assert low <= await _host_port(fourth) <= low + 1, "a closed connection's port is free again"
    finally:
        restrict_port_range(None, None)
        for pc in (first, second, third, fourth):
            await pc.close()
    anywhere = bundled()
    try:
        assert not low <= await _host_port(anywhere) <= low + 1  # no range: an ephemeral port, aioice's own way
    finally:
        await anywhere.close()


# --- the lean forwarding path: arrival stamps and direct sends ------------------


def test_direct_send_assumptions_hold() -> None:
    from aiortc.rtp import HeaderExtensionsMap

    # aiortc's own send path is what direct_send replaces: one SRTP protect, then the ICE connection's
    # sendto, which for a host or server-reflexive pair is the datagram transport's sendto.
    send_rtp = inspect.getsource(RTCDtlsTransport._send_rtp)
    assert "self._tx_srtp.protect(data)" in send_rtp and "await self.transport._send(data)" in send_rtp
    assert "self.__tx_bytes += len(data)" in send_rtp and "self.__tx_packets += 1" in send_rtp
    assert "active_pair.protocol.send_data(data, active_pair.remote_addr)" in inspect.getsource(
        aioice.ice.Connection.sendto)
    assert inspect.getsource(aioice.ice.StunProtocol.send_data).strip().endswith("self.transport.sendto(data, addr)")
    assert "self.__started = True" in inspect.getsource(RTCRtpSender.send)
    assert hasattr(HeaderExtensionsMap(), "_HeaderExtensionsMap__ids")
    # arrival stamps: aioice queues each datagram for the DTLS transport through asyncio.Queue's _put/_get
    assert "self._queue.put_nowait((data, component))" in inspect.getsource(aioice.ice.Connection.data_received)
    queue_source = inspect.getsource(asyncio.Queue)
    assert "self._put(item)" in queue_source and "item = self._get()" in queue_source


async def test_direct_send_writes_what_aiortcs_own_path_writes_and_stamps_arrivals() -> None:
    import time

    from mediaserver.aiortc_adapter import direct_send
    from mediaserver.forwarding_delay import DelayHistogram

    global arrived
    arrived = asyncio.Event()  # (this test's loop: the module's event may belong to an earlier test's)
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc, port, received, feedback, tap = await connected_pair()
    dtls = port._sender.transport
    protected: list[bytes] = []  # what each path hands SRTP: the plain RTP packet
    session = dtls._tx_srtp

    class Recording:
        def protect(self, data: bytes) -> bytes:
            protected.append(data)
            return session.protect(data)

        def protect_rtcp(self, data: bytes) -> bytes:
            return session.protect_rtcp(data)

    dtls._tx_srtp = Recording()
    try:
        payload = bytes([0x10, 0x00]) + bytes(range(200))
        await port.send(payload, sequence_number=500, timestamp=90000, marker=1)
        delays = DelayHistogram()
        assert direct_send(port, payload, 501, 93000, 0, None, time.monotonic_ns(), delays)
        assert direct_send(port, payload, 502, 96000, 1, None, 0, delays)  # (arrival unknown: not counted)
        assert delays.snapshot().total == 1
        await asyncio.wait_for(_until(lambda: len(received) == 3), 5)
        assert [(p.sequence_number, p.timestamp, p.marker, p.payload) for p in received] == [
            (500, 90000, 1, payload), (501, 93000, 0, payload), (502, 96000, 1, payload)]
        # byte for byte what aiortc writes, but for sequence number, timestamp, marker and abs-send-time
        slow, fast = protected[0], protected[2]
        header = len(slow) - len(payload)
        assert len(fast) == len(slow) and header > 12 and fast[header:] == payload
        assert fast[0] == slow[0] and fast[1] == slow[1] and fast[8:12] == slow[8:12]
        abs_at = port._templates[0].abs_send_time_at  # type: ignore[union-attr]
        assert abs_at > 12
        # (and the transport-wide sequence number, consecutive across both paths)
        twcc_at = port._templates[0].transport_cc_at  # type: ignore[union-attr]
        assert twcc_at > abs_at
        assert [int.from_bytes(p[twcc_at:twcc_at + 2], "big") for p in protected] == [0, 1, 2]
        assert fast[12:abs_at] == slow[12:abs_at] and fast[abs_at + 3:twcc_at] == slow[abs_at + 3:twcc_at]
        assert fast[twcc_at + 2:header] == slow[twcc_at + 2:header]
        assert all(p.extensions.abs_send_time is not None for p in received)
        assert all(p.extensions.mid == port.mid for p in received)
        # the sender's reports count every packet, as aiortc's own path does
        assert port.sent == (3, 3 * len(payload))
        # arrival stamps: the first packet on a connection has none (stamping starts with it), later ones do
        assert 0 < tap.arrival_ns <= time.monotonic_ns()
        assert time.monotonic_ns() - tap.arrival_ns < 5_000_000_000
    finally:
        dtls._tx_srtp = session
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)


async def test_rtp_counted_at_the_socket_by_its_header_still_shows_in_receiver_reports() -> None:
    from mediaserver.aiortc_adapter import count_rtp_headers

    global arrived
    arrived = asyncio.Event()  # (this test's loop: the module's event may belong to an earlier test's)
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc, port, received, feedback, tap = await connected_pair()
    headers: list[tuple[int, int, int, bool]] = []
    try:
        payload = bytes([0x10, 0x00]) + bytes(300)
        await port.send(payload, sequence_number=700, timestamp=1000, marker=1)
        await asyncio.wait_for(_until(lambda: len(received) == 1), 5)  # (routed once by aiortc: its SSRC is known)
        count_rtp_headers(receiver_pc, lambda ssrc, seq, ts, marker, size: headers.append((ssrc, seq, ts, marker)))
        for i in range(1, 6):
            await port.send(payload, sequence_number=700 + i, timestamp=1000 + 3000 * i, marker=i % 2)
        # aiortc's receive path sees none of them; the counter sees each header, as sent
        await asyncio.wait_for(_until(lambda: any(f.kind == "report" and f.highest_sequence % 65536 == 705
                                                  for f in feedback)), 5)
        assert headers == [(port.ssrc, 700 + i, 1000 + 3000 * i, bool(i % 2)) for i in range(1, 6)]
        assert len(received) == 1
        report = next(f for f in feedback if f.kind == "report" and f.highest_sequence % 65536 == 705)
        assert report.packets_lost == 0
    finally:
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)


# --- transport-wide congestion control: negotiation, stamping, feedback ---------


def test_aiortc_still_has_what_transport_wide_congestion_control_relies_on() -> None:
    import inspect

    import aiortc.codecs
    from aiortc.rtcdtlstransport import RTCDtlsTransport, RtpRouter
    from aiortc.rtp import HeaderExtensionsMap

    from mediaserver.twcc import TRANSPORT_CC_URI

    # negotiation: aiortc offers and answers from these module tables
    source = inspect.getsource(aiortc.rtcpeerconnection.RTCPeerConnection)
    assert "HEADER_EXTENSIONS[transceiver.kind][:]" in source and "HEADER_EXTENSIONS[media.kind]" in source
    for kind in ("audio", "video"):
        assert any(e.uri == TRANSPORT_CC_URI for e in aiortc.codecs.HEADER_EXTENSIONS[kind])
        assert all(any(f.type == "transport-cc" for f in c.rtcpFeedback)
                   for c in aiortc.codecs.CODECS[kind] if not c.mimeType.lower().endswith("/rtx"))
    # stamping: aiortc's map knows the extension and writes it
    assert hasattr(HeaderExtensionsMap()._HeaderExtensionsMap__ids, "transport_sequence_number")  # type: ignore[attr-defined]
    # feedback: raw RTCP passes _handle_rtcp_data, every RTP packet RtpRouter.route_rtp, and RTCP
    # handed to _send_rtp is protected as RTCP
    assert "RtcpPacket.parse(data)" in inspect.getsource(RTCDtlsTransport._handle_rtcp_data)
    assert "self._rtp_router.route_rtp(packet)" in inspect.getsource(RTCDtlsTransport._handle_rtp_data)
    assert "route_rtp" in RtpRouter.__dict__
    assert "protect_rtcp(data)" in inspect.getsource(RTCDtlsTransport._send_rtp)


async def test_two_aiortc_peers_negotiate_stamp_and_feed_back_transport_wide_sequence_numbers() -> None:
    from mediaserver.aiortc_adapter import follow_transport_feedback, send_transport_feedback
    from mediaserver.twcc import TRANSPORT_CC_URI, TransportFeedback

    global arrived
    arrived = asyncio.Event()  # (this test's loop: the module's event may belong to an earlier test's)
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc, port, received, feedback, tap = await connected_pair()
    feedbacks: list[TransportFeedback] = []
    try:
        assert TRANSPORT_CC_URI in sender_pc.remoteDescription.sdp  # (the answer accepted it)
        history = follow_transport_feedback(sender_pc, feedbacks.append)
        assert history is not None
        send_transport_feedback(receiver_pc.getTransceivers()[0].receiver)
        payload = bytes([0x10, 0x00]) + bytes(300)
        for i in range(10):
            await port.send(payload, sequence_number=100 + i, timestamp=3000 * i, marker=1, probe=(i == 9))
        await asyncio.wait_for(_until(lambda: len(received) == 10), 5)
        assert [p.extensions.transport_sequence_number for p in received] == list(range(10))
        await asyncio.wait_for(_until(lambda: sum(len(f.arrivals) for f in feedbacks) >= 10), 5)
        results = [r for f in feedbacks for r in history.results(f)]
        assert [r.sequence for r in results] == list(range(10))
        assert all(r.arrival is not None for r in results) and [r.copy for r in results] == [False] * 9 + [True]
    finally:
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)


def test_aiortcs_own_sender_still_serialises_its_packets_through_its_extension_map() -> None:
    from aiortc.rtp import RtpPacket

    # stamp_sent_packets takes the number where aiortc's map writes a packet's extensions, for media and
    # resends alike, just before the packet is sent
    assert "extensions_map.set(self.extensions)" in inspect.getsource(RtpPacket.serialize)
    for method in (RTCRtpSender._run_rtp, RTCRtpSender._retransmit):
        assert "packet.serialize(self.__rtp_header_extensions_map)" in inspect.getsource(method)


async def test_a_sender_aiortc_drives_stamps_every_packet_and_reads_the_feedback_on_them() -> None:
    """The home kit's case: its audio goes through aiortc's own send loop, not Nära's port."""
    from aiortc.mediastreams import AudioStreamTrack

    from mediaserver.aiortc_adapter import follow_transport_feedback, send_transport_feedback, stamp_sent_packets
    from mediaserver.twcc import TransportFeedback

    global arrived
    arrived = asyncio.Event()  # (this test's loop)
    restrict_host_addresses(["127.0.0.1"])
    publisher, subscriber = RTCPeerConnection(), RTCPeerConnection()
    feedbacks: list[TransportFeedback] = []
    stamped: list[int | None] = []

    def on_feedback(feedback: TransportFeedback) -> None:
        feedbacks.append(feedback)
        arrived.set()

    try:
        transceiver = publisher.addTransceiver(AudioStreamTrack(), direction="sendonly")
        await publisher.setLocalDescription(await publisher.createOffer())
        await subscriber.setRemoteDescription(publisher.localDescription)
        await subscriber.setLocalDescription(await subscriber.createAnswer())
        await publisher.setRemoteDescription(subscriber.localDescription)
        stamp_sent_packets(transceiver.sender)
        stamp_sent_packets(transceiver.sender)  # (twice is once)
        history = follow_transport_feedback(publisher, on_feedback)
        assert history is not None
        receiver = subscriber.getTransceivers()[0].receiver
        send_transport_feedback(receiver)
        router = receiver.transport._rtp_router
        original = router.route_rtp

        def route_rtp(packet: Any) -> Any:
            stamped.append(packet.extensions.transport_sequence_number)
            return original(packet)

        router.route_rtp = route_rtp
        await asyncio.wait_for(_until(lambda: sum(len(f.arrivals) for f in feedbacks) >= 20), 10)
        numbers = [n for n in stamped if n is not None]
        assert len(numbers) == len(stamped) >= 20  # every packet stamped ...
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # ... with the next number
        results = [r for f in feedbacks for r in history.results(f)]
        assert len(results) >= 20 and all(r.arrival is not None for r in results)
    finally:
        await publisher.close()
        await subscriber.close()
        restrict_host_addresses(None)


# --- ICE consent that a busy media worker does not lose -----------------------------


def _socket_of(pc: RTCPeerConnection) -> asyncio.DatagramTransport:
    """The datagram transport of ``pc``'s nominated ICE pair (where its media and consent answers queue)."""
    connection = pc.getTransceivers()[0].receiver.transport.transport._connection
    pair = connection._nominated[1]
    transport: asyncio.DatagramTransport = pair.protocol.transport
    return transport


async def test_consent_answers_queued_for_seconds_do_not_close_a_healthy_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert aioice.ice.Connection.query_consent is aiortc_adapter._query_consent
    source = inspect.getsource(aioice.ice.Connection.connect)
    assert "self.query_consent()" in source and "_query_consent_task" in source
    assert "self._query_consent_task" in inspect.getsource(aioice.ice.Connection.close)
    assert list(inspect.signature(aioice.ice.Connection.build_request).parameters) == ["self", "pair", "nominate"]
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.05)  # (aioice's own checks: 6 misses in 3.4 s)
    global arrived
    arrived = asyncio.Event()  # (this test's loop: the module's event may belong to an earlier test's)
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc, port, received, feedback, tap = await connected_pair()
    try:
        # The receiver's socket is not read for 5 s, as a busy worker's publisher socket holds its queue:
        # every consent check the sender makes meanwhile is answered seconds late.
        stalled = _socket_of(receiver_pc)
        resumed = asyncio.Event()
        stalled.pause_reading()
        asyncio.get_running_loop().call_later(5.0, lambda: (stalled.resume_reading(), resumed.set()))
        await asyncio.wait_for(resumed.wait(), 10)
        await port.send(bytes([0x10, 0x00]) + bytes(200), sequence_number=1, timestamp=0, marker=1)
        await asyncio.wait_for(_until(lambda: len(received) >= 1), 5)
        assert sender_pc.connectionState == "connected" and receiver_pc.connectionState == "connected"
        # consent still expires when nothing answers at all
        monkeypatch.setattr(aiortc_adapter, "CONSENT_TIMEOUT", 1.0)
        ended = asyncio.Event()
        sender_pc.on("connectionstatechange",
                     lambda: ended.set() if sender_pc.connectionState in ("failed", "closed") else None)
        stalled.pause_reading()
        await asyncio.wait_for(ended.wait(), 10)
    finally:
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)


# --- transport feedback paced for a thin uplink --------------------------------------


async def test_a_thin_uplinks_transport_feedback_comes_a_quarter_second_apart_and_misses_nothing() -> None:
    from mediaserver.aiortc_adapter import (
        THIN_FEEDBACK_INTERVAL,
        follow_transport_feedback,
        send_transport_feedback,
        set_transport_feedback_interval,
    )
    from mediaserver.twcc import TransportFeedback

    assert "await asyncio.sleep(getattr(dtls, \"nara_feedback_interval\", None) or FEEDBACK_INTERVAL)" in \
        inspect.getsource(send_transport_feedback)
    global arrived
    arrived = asyncio.Event()  # (this test's loop: the module's event may belong to an earlier test's)
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc, port, received, feedback, tap = await connected_pair()
    loop = asyncio.get_running_loop()
    feedbacks: list[tuple[float, TransportFeedback]] = []
    try:
        history = follow_transport_feedback(sender_pc, lambda f: feedbacks.append((loop.time(), f)))
        assert history is not None
        assert set_transport_feedback_interval(receiver_pc, THIN_FEEDBACK_INTERVAL)
        send_transport_feedback(receiver_pc.getTransceivers()[0].receiver)
        payload = bytes([0x10, 0x00]) + bytes(100)
        for i in range(50):  # a second of packets, 20 ms apart
            await port.send(payload, sequence_number=100 + i, timestamp=1800 * i, marker=1)
            await asyncio.sleep(0.02)  # the sender's own pace
        await asyncio.wait_for(_until(lambda: sum(len(f.arrivals) for _, f in feedbacks) >= 50), 5)
        gaps = [b - a for (a, _), (b, _) in zip(feedbacks, feedbacks[1:], strict=False)]
        assert gaps and min(gaps) > 0.8 * THIN_FEEDBACK_INTERVAL, gaps  # not every 75 ms
        assert len(feedbacks) <= 6  # about four a second, not thirteen
        results = [r for _, f in feedbacks for r in history.results(f)]
        assert [r.sequence for r in results] == list(range(50)) and all(r.arrival is not None for r in results)
    finally:
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)


async def test_socket_waits_count_the_time_a_datagram_sat_in_its_socket() -> None:
    """The bench instrument over aioice's StunProtocol.datagram_received: every SRTP datagram read is counted,
    and a datagram the loop got to late shows the time it waited in its socket (the kernel's stamp)."""
    import time

    from mediaserver.aiortc_adapter import watch_socket_waits
    from mediaserver.forwarding_delay import DelayHistogram

    global arrived
    arrived = asyncio.Event()  # (this test's loop)
    waits = DelayHistogram()
    stop = watch_socket_waits(waits)
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc, port, received, _, tap = await connected_pair()
    arrivals: list[int] = []  # the arrival stamp each packet was handed on with (the forwarding delay's start)
    handed_on = tap._on_packet

    async def stamped(packet: RtpPacket) -> None:
        arrivals.append(tap.arrival_ns)
        await handed_on(packet)

    tap._on_packet = stamped
    try:
        payload = bytes([0x10, 0x00]) + bytes(100)
        for i in range(10):
            await port.send(payload, sequence_number=200 + i, timestamp=3000 * i, marker=1)
        await asyncio.wait_for(_until(lambda: len(received) >= 10), 5)
        counted = waits.snapshot()
        assert counted.total >= 9  # (the socket's very first datagram may precede the kernel's stamping)
        sent_ns = time.monotonic_ns()
        await port.send(payload, sequence_number=210, timestamp=30000, marker=1)  # (in the receiver's socket now)
        time.sleep(0.03)  # noqa: ASYNC251 -- the loop held by a 30 ms callback: the datagram waits in its socket
        await asyncio.wait_for(_until(lambda: len(received) >= 11), 5)
        late = waits.snapshot().since(counted)
        assert late.total >= 1 and (late.quantile(1.0) or 0.0) >= 0.025
        # and the forwarding delay counts from when it reached the socket, not from when it was read
        assert sent_ns <= arrivals[-1] < sent_ns + 15_000_000
    finally:
        stop()
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)
    assert aioice.ice.StunProtocol.datagram_received.__name__ == "datagram_received"  # (stopped: aioice's own)


async def test_a_burst_in_one_socket_is_read_in_a_few_turns_of_the_loop() -> None:
    """asyncio's datagram transport, patched (``read_datagrams_in_batches``): a keyframe's burst of ten datagrams
    in one socket reaches aiortc's receive path in a turn or two of the loop, not ten."""
    from mediaserver.aiortc_adapter import read_datagrams_in_batches
    from mediaserver.loop_watch import LoopWatch

    global arrived
    arrived = asyncio.Event()  # (this test's loop)
    restore = read_datagrams_in_batches()  # (before the pair's sockets are made: each binds its reader then)
    restrict_host_addresses(["127.0.0.1"])
    try:
        sender_pc, receiver_pc, port, received, _, _ = await connected_pair()
    finally:
        restore()
    from pathlib import Path

    watch = LoopWatch(Path("/nonexistent"))
    try:
        payload = bytes([0x10, 0x00]) + bytes(1000)
        watch.install()
        for i in range(10):  # (port.send never yields to the loop: all ten are in the socket before it turns)
            await port.send(payload, sequence_number=300 + i, timestamp=9000, marker=int(i == 9))
        await asyncio.wait_for(_until(lambda: len(received) >= 10), 5)
        watch.uninstall()
        assert sum(int(t[0]) for t in watch.turns) <= 4
    finally:
        watch.uninstall()
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses(None)


def test_receive_estimators_count_in_rate_windows_that_give_aiortcs_rates() -> None:
    """Each video receiver's rate counter held 1000 objects the collector walks at each full pass; Nära's
    window counts in two arrays and must give exactly the rates aiortc's counter gives."""
    import gc
    import random

    import aiortc.rate

    original = aiortc_adapter.AIORTC_RATE_COUNTER
    assert original is not None and original is not aiortc_adapter.RateWindow
    gc.collect()
    before = len(gc.get_objects())
    estimators = [aiortc.rate.RemoteBitrateEstimator() for _ in range(10)]
    assert all(isinstance(e.incoming_bitrate, aiortc_adapter.RateWindow) for e in estimators)
    assert (len(gc.get_objects()) - before) / len(estimators) < 100  # (aiortc's own counter: over 1000 each)

    rng = random.Random(5)
    theirs, ours = original(1000, 8000), aiortc_adapter.RateWindow(1000, 8000)
    now = 10_000
    for step in range(20_000):
        # packets 0-30 ms apart, now and then an outage longer than the window, and a reset
        now += rng.choice((0, 0, 1, 2, 5, 30)) if step % 3000 else rng.choice((999, 1000, 1001, 4321))
        if step % 7919 == 0:
            theirs.reset()
            ours.reset()
        assert ours.rate(now) == theirs.rate(now)
        size = rng.randrange(50, 1300)
        theirs.add(size, now)
        ours.add(size, now)
        assert ours.rate(now) == theirs.rate(now)
