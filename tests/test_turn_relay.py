"""aiortc participants reaching the SFU only through the impairing TURN relay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aioice import stun
from aiortc import RTCIceServer

from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from bench.turn import ImpairingTurnServer
from mediaserver.aiortc_adapter import selected_local_candidate_type
from signalling.client import ConsultationClient

from .conftest import RunningServer
from .media_helpers import Watcher, receiving_from


@pytest.fixture
async def relay() -> AsyncIterator[ImpairingTurnServer]:
    server = ImpairingTurnServer(seed=1)
    await server.start()
    yield server
    server.close()


def through(relay: ImpairingTurnServer, label: str) -> list[RTCIceServer]:
    return [RTCIceServer(urls=relay.url, username=label, credential=relay.password)]


async def relayed_publisher(server: RunningServer, room: str, relay: ImpairingTurnServer, tag: int,
                            profile: str = "loopback") -> tuple[ConsultationClient, StampedVideoTrack]:
    video = StampedVideoTrack(tag, 320, 240, 15)
    client = ConsultationClient(
        server.url, room, server.token(room, f"P{tag}", participant_id=f"p{tag}"),
        video=video, audio=ToneAudioTrack(440 * tag),
        ice_servers=through(relay, f"{profile}/p{tag}"), relay_only=True)
    await client.join()
    return client, video


async def test_media_flows_through_the_relay_and_stops_and_resumes_with_an_outage(
    forwarding_server: RunningServer, relay: ImpairingTurnServer
) -> None:
    server = forwarding_server
    room = server.consultation()
    p1, v1 = await relayed_publisher(server, room, relay, 1)
    p2, _ = await relayed_publisher(server, room, relay, 2)
    watcher = Watcher(p2)
    try:
        await receiving_from(p2, {"p1"})
        watcher.follow()
        await watcher.wait_for(lambda: len(watcher.frames[1]) >= 20)
        # every media packet went through the relay, as relayed candidates
        assert {label for label, _, _ in relay.links()} == {"loopback/p1", "loopback/p2"}
        assert all(up.counters.delivered > 50 and down.counters.delivered > 50
                   for _, up, down in relay.links())
        assert p2.pc is not None
        assert selected_local_candidate_type(p2.pc) == "relay"

        relay.down = True  # a 100 % outage
        outage_started = len(watcher.frames[1])
        await asyncio.sleep(2)  # the outage itself
        assert len(watcher.frames[1]) <= outage_started + 3, "frames in flight at the cut only"
        relay.down = False
        resumed_from = len(watcher.frames[1])
        await watcher.wait_for(lambda: len(watcher.frames[1]) >= resumed_from + 15, timeout=15)
        assert max(watcher.frames[1]) > v1.frames_sent - 40, "the picture is current again"
    finally:
        await watcher.stop()
        await p1.close()
        await p2.close()


async def test_relay_demands_long_term_credentials(relay: ImpairingTurnServer) -> None:
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[stun.Message] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            replies.put_nowait(stun.parse_message(data))

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(relay.host, relay.port))
    try:
        request = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST,
                               attributes={"REQUESTED-TRANSPORT": 17 << 24})
        transport.sendto(bytes(request))
        challenge = await asyncio.wait_for(replies.get(), 5)
        assert challenge.error_code == 401 and "NONCE" in challenge.attributes
        signed = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes={
            "REQUESTED-TRANSPORT": 17 << 24, "USERNAME": "loopback/x", "REALM": relay.realm,
            "NONCE": challenge.attributes["NONCE"]})
        signed.add_message_integrity(b"wrong key wrong key")
        transport.sendto(bytes(signed))
        assert (await asyncio.wait_for(replies.get(), 5)).error_code == 401
        assert not relay.allocations
    finally:
        transport.close()


async def test_the_publisher_is_capped_at_what_its_subscriber_can_take(
    server: RunningServer, relay: ImpairingTurnServer
) -> None:
    room = server.consultation()
    publisher = ConsultationClient(server.url, room, server.token(room, "Kit", "kit", participant_id="kit"),
                                   video=StampedVideoTrack(1, 640, 480, 15), audio=ToneAudioTrack(440))
    await publisher.join()
    media = server.hub.media
    await media.wait_until(lambda: "video" in media.rooms[room].peers["kit"].publications)
    publication = media.rooms[room].peers["kit"].publications["video"]
    start = publication.stats.bytes
    await asyncio.sleep(3)  # measure what the kit sends while no subscriber limits it
    before = (publication.stats.bytes - start) * 8 / 3
    thin, _ = await relayed_publisher(server, room, relay, 2, profile="webrtc-150k")
    try:
        await receiving_from(thin, {"kit"})
        # The subscriber's reports show heavy loss; its estimate falls and the kit is told.
        watcher = Watcher(thin)
        watcher.follow()  # every decoded audio or video frame wakes the check below
        await watcher.wait_for(lambda: (publication.rate_cap or 10**9) <= 100_000, timeout=20)
        await watcher.stop()
        start = publication.stats.bytes
        await asyncio.sleep(3)  # measurement window
        after = (publication.stats.bytes - start) * 8 / 3
        # The estimate sits near the link's capacity (a probe may overshoot it briefly), not far above.
        assert media.rooms[room].peers["p2"].bandwidth.estimate < 150_000 * 1.5
        # aiortc's own VP8 encoder will not go under 250 kbit/s; the cap takes it there.
        assert after < 0.75 * before, f"kit sent {before / 1000:.0f} kbit/s, then {after / 1000:.0f}"
    finally:
        await thin.close()
        await publisher.close()
