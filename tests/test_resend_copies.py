"""A resend of a packet the subscriber already has is not a loss on its link.

A receiver that plays audio on time asks for packets that are only late, and
the server sends them again with the same stream and sequence number. Where
the original came, the receiver's SRTP refuses the copy as a replay before it
notes its arrival, so its transport feedback reads the copy as lost. Counted
as loss, those copies read as a queue overflowing and cut the estimate on a
link that lost nothing (nara bench adapt's layer-cpu: every loss its relatives'
feedback showed was such a copy; docs/benchmarks.md, issue 5).

Through the real SFU: a listener asks again for every fourth audio packet as
soon as it arrives.
"""

from __future__ import annotations

import asyncio
import struct

from mediaserver.aiortc_adapter import dtls_transport, filter_inbound_rtp
from mediaserver.encoders import OpusTrack
from mediaserver.peer import Peer
from mediaserver.receive_track import ReceivedAudioTrack
from signalling.client import ConsultationClient

from .conftest import RunningServer
from .media_helpers import receiving_from
from .test_receive_path import SpeechTrack

ASK_EVERY = 4  # the listener asks again for one packet in this many, once it has it


async def test_resends_of_packets_the_subscriber_has_are_not_read_as_loss(server: RunningServer) -> None:
    room = server.consultation()
    speech = SpeechTrack()
    publisher = ConsultationClient(server.url, room, server.token(room, "Nurse", participant_id="kit"),
                                   audio=OpusTrack(speech))
    listener = ConsultationClient(server.url, room, server.token(room, "Doctor", participant_id="doctor"),
                                  publish=False, nara_receive=True)
    try:
        await listener.join()
        await publisher.join()
        await receiving_from(listener, {"kit"})
        (track,) = listener.remote_tracks.values()
        assert isinstance(track, ReceivedAudioTrack)
        ask = track.playout.on_missing
        assert ask is not None
        seen: set[int] = set()
        loop = asyncio.get_running_loop()

        def keep(data: bytes) -> bool:
            (seq,) = struct.unpack_from("!H", data, 2)
            if seq not in seen:
                seen.add(seq)
                if len(seen) % ASK_EVERY == 0:
                    loop.call_soon(ask, [seq])  # (after this packet is in: a copy of one it has)
            return True

        assert listener.pc is not None
        filter_inbound_rtp(dtls_transport(listener.pc), keep)
        await asyncio.wait_for(speech.reached(speech.sent + 250).wait(), 15)  # five seconds of speech
        peer: Peer = server.hub.media.rooms[room].peers["doctor"]
        (subscription,) = peer.subscriptions()
        resent = subscription.stats.retransmitted
        feedbacks = peer.transport_feedbacks
    finally:
        for client in (listener, publisher):
            await client.close()
    assert resent >= 30, resent  # (the server did send the copies: about 60 were asked for)
    assert feedbacks >= 30, feedbacks  # (and heard how each went)
    assert peer.delay.lost_share == 0.0
    assert peer.bandwidth.overuse_cuts == 0
