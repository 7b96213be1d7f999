"""A media worker near its limit: healthy calls are not dropped, and joins in a storm are paced.

Unit tests of the pacing policy on a fake clock; real aiortc participants on a
real server (in this process) for what a participant notices.
"""

from __future__ import annotations

import asyncio

from mediaserver.ladder import StartPacer
from signalling.client import ConsultationClient

from .conftest import RunningServer
from .media_helpers import join_publisher


async def test_a_participant_whose_media_connection_was_closed_from_its_end_is_told_and_not_kept(
        server: RunningServer) -> None:
    room = server.consultation()
    client, _ = await join_publisher(server, room, 1, fps=5)
    try:
        await client.wait_for(lambda: client.pc is not None and client.pc.connectionState == "connected", 15)
        assert client.pc is not None
        await client.pc.close()  # (DTLS close_notify: the server's connection closes itself, without failing)
        await client.wait_for(lambda: client.ended, 15)
        assert [e["code"] for e in client.errors] == ["media_failed"]
        media = server.hub.media
        await media.wait_until(lambda: not media.is_live(room), 10)
    finally:
        await client.close()


# --- join storms: ladders start paced, worker-wide ---------------------------------------------


def test_a_storm_of_ladder_starts_is_spread_at_the_pace_after_a_first_burst() -> None:
    pacer = StartPacer(rate=1.0, burst=3)
    assert [pacer.take(100.0) for _ in range(5)] == [True, True, True, False, False]
    assert not pacer.take(100.5)  # half a start's time
    assert pacer.take(101.0) and not pacer.take(101.0)
    assert pacer.take(102.0) and pacer.refused == 4
    # a quiet while fills the burst again, no further
    assert [pacer.take(200.0) for _ in range(4)] == [True, True, True, False]


def test_a_clock_that_steps_back_gives_no_starts_away() -> None:
    pacer = StartPacer(rate=1.0, burst=1)
    assert pacer.take(50.0) and not pacer.take(10.0) and not pacer.take(10.5)
    assert pacer.take(11.5)


async def test_in_a_storm_a_second_consultations_subscriber_waits_starting_then_gets_its_video(
        server: RunningServer) -> None:
    media = server.hub.media
    media.ladder_starts = StartPacer(rate=0.5, burst=1)  # (one start now, the next two seconds on)
    rooms = [server.consultation("A"), server.consultation("B")]
    clients = []
    try:
        for tag, room in enumerate(rooms, 1):
            publisher, _ = await join_publisher(server, room, tag, fps=10)
            clients.append(publisher)
        await media.wait_until(lambda: all("video" in media.rooms[r].peers[f"p{t}"].publications
                                           for t, r in enumerate(rooms, 1)), 15)
        for room in rooms:
            subscriber = ConsultationClient(server.url, room, server.token(room, "Dr", participant_id="dr"),
                                            publish=False)
            await subscriber.join()
            clients.append(subscriber)

        def levels() -> list[str | None]:
            found = []
            for room in rooms:
                peer = media.rooms[room].peers.get("dr")
                subs = [s.subscription for s in peer.slots if s.kind == "video" and s.subscription is not None] \
                    if peer is not None else []
                found.append(subs[0].publication.level_name(subs[0].level) if subs else None)
            return found

        receiving_since: dict[int, float] = {}  # consultation -> when its subscriber first had a layer
        waiting_seen = []  # levels when one had video and the other was told "starting"

        def both_receiving() -> bool:
            now, found = asyncio.get_running_loop().time(), levels()
            for index, level in enumerate(found):
                if level not in (None, "starting"):
                    receiving_since.setdefault(index, now)
            if "starting" in found and len(receiving_since) == 1:
                waiting_seen.append(found)
            return len(receiving_since) == 2

        await media.wait_until(both_receiving, 20)
        assert waiting_seen
        first, second = sorted(receiving_since.values())
        assert second - first >= 1.5  # the pace: two seconds a start, less the first subscriber's join
        assert media.ladder_starts.refused >= 1
    finally:
        for client in clients:
            await client.close()
