"""Six participants in one consultation, with another consultation beside it."""

from __future__ import annotations

from .conftest import RunningServer
from .media_helpers import Watcher, join_publisher, receiving_from


async def test_six_participants_and_a_second_consultation(forwarding_server: RunningServer) -> None:
    server = forwarding_server
    room_a, room_b = server.consultation("A"), server.consultation("B")
    tags_a = [1, 2, 3, 4, 5, 6]
    clients = {}
    for tag in tags_a:
        clients[tag], _ = await join_publisher(server, room_a, tag, width=160, height=120, fps=10)
    # Consultation B reuses participant ids of A on purpose: rooms are separate namespaces.
    b_first, _ = await join_publisher(server, room_b, 7, width=160, height=120, fps=10)
    b_second, _ = await join_publisher(server, room_b, 8, width=160, height=120, fps=10, participant_id="p1")
    watchers = {tag: Watcher(c) for tag, c in clients.items()}
    b_watcher = Watcher(b_first)
    try:
        for tag, client in clients.items():
            await receiving_from(client, {f"p{t}" for t in tags_a if t != tag}, timeout=30)
            watchers[tag].follow()
        await receiving_from(b_first, {"p1"})
        b_watcher.follow()
        for tag, watcher in watchers.items():
            await watcher.wait_for(
                lambda w=watcher, me=tag: all(len(w.frames[t]) >= 10 for t in tags_a if t != me), timeout=30)
            # A frame the decoder mangled can read as any tag, once; a stream crossing over brings many.
            assert len(watcher.frames.get(7, ())) < 3, "nothing crosses from consultation B into A"
            assert {p for p, _ in clients[tag].owners.values()} <= {f"p{t}" for t in tags_a}
        # B's "p1" publishes tag 8; A's p1 publishes tag 1: only B's frames may arrive.
        await b_watcher.wait_for(lambda: len(b_watcher.frames[8]) >= 10)
        assert all(len(frames) < 3 for t, frames in b_watcher.frames.items() if t != 8)
        assert {p for p, _ in b_first.owners.values()} == {"p1"}
        counts = server.hub.media.counts()
        assert counts == {"rooms": 2, "participants": 8}
    finally:
        for w in [*watchers.values(), b_watcher]:
            await w.stop()
        for c in [*clients.values(), b_first, b_second]:
            await c.close()
