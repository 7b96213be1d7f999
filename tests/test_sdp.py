"""SDP edits: Opus in-band FEC is asked for in every offer the server makes."""

from __future__ import annotations

from mediaserver.sdp import with_opus_fec

from .conftest import RunningServer
from .media_helpers import join_publisher

AUDIO = "\r\n".join([
    "v=0", "m=audio 9 UDP/TLS/RTP/SAVPF 96 0", "a=rtpmap:96 opus/48000/2", "a=rtpmap:0 PCMU/8000",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111", "a=rtpmap:111 opus/48000/2", "a=fmtp:111 minptime=10", "",
])


def test_fec_is_added_once_to_every_opus_payload_type_and_nothing_else() -> None:
    edited = with_opus_fec(AUDIO)
    assert "a=fmtp:96 minptime=10;useinbandfec=1" in edited
    assert "a=fmtp:111 minptime=10;useinbandfec=1" in edited
    assert "fmtp:0" not in edited
    assert with_opus_fec(edited) == edited, "applying it twice changes nothing"


async def test_the_server_offers_opus_with_fec(server: RunningServer) -> None:
    room = server.consultation()
    client, _ = await join_publisher(server, room, 1)
    try:
        await client.wait_for(lambda: client.answers_sent >= 1)
        assert client.pc is not None and client.pc.remoteDescription is not None
        assert "useinbandfec=1" in client.pc.remoteDescription.sdp
    finally:
        await client.close()


async def test_opus_at_24_kbits_with_fec_carries_the_tone(server: RunningServer) -> None:
    import asyncio

    import numpy as np
    import pytest

    from bench.synthetic import ToneAudioTrack
    from mediaserver.encoders import OpusTrack
    from signalling.client import ConsultationClient

    from .media_helpers import Watcher, receiving_from

    room = server.consultation()
    speaker = ConsultationClient(server.url, room, server.token(room, "Kit", "kit", participant_id="kit"),
                                 audio=OpusTrack(ToneAudioTrack(660), bitrate=24_000))
    await speaker.join()
    listener, _ = await join_publisher(server, room, 2)
    watcher = Watcher(listener)
    try:
        await receiving_from(listener, {"kit"})
        watcher.follow()
        await watcher.wait_for(lambda: len(watcher.tones["kit"]) >= 50)
        publication = server.hub.media.rooms[room].peers["kit"].publications["audio"]
        start = publication.stats.bytes
        await asyncio.sleep(3)  # measurement window
        kbps = (publication.stats.bytes - start) * 8 / 3 / 1000
        assert 16 <= kbps <= 32, f"{kbps:.1f} kbit/s of Opus payload"
        assert np.median(watcher.tones["kit"][-50:]) == pytest.approx(660, abs=30)
    finally:
        await watcher.stop()
        await speaker.close()
        await listener.close()


def test_transport_wide_congestion_control_is_offered_only_where_the_server_sends() -> None:
    from mediaserver.sdp import transport_cc_toward_subscribers

    uri = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
    offer = "\r\n".join([
        "v=0",
        "m=video 9 UDP/TLS/RTP/SAVPF 97", "a=recvonly", f"a=extmap:5 {uri}", "a=rtcp-fb:97 nack",
        "a=rtcp-fb:97 transport-cc",
        "m=video 9 UDP/TLS/RTP/SAVPF 97", "a=sendonly", f"a=extmap:5 {uri}", "a=rtcp-fb:97 transport-cc", "",
    ])
    publishing, subscribing = transport_cc_toward_subscribers(offer).split("m=video")[1:]
    # a browser publishing to the server keeps its own control: nothing would answer its feedback
    assert uri not in publishing and "transport-cc" not in publishing and "a=rtcp-fb:97 nack" in publishing
    assert f"a=extmap:5 {uri}" in subscribing and "a=rtcp-fb:97 transport-cc" in subscribing
