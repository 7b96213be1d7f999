"""200 join/leave cycles leave nothing behind: tasks, threads, sockets, subscriptions."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from signalling.client import ConsultationClient

from .conftest import RunningServer
from .media_helpers import Watcher, join_publisher, receiving_from

CYCLES = 200


def resources() -> dict[str, int]:
    gc.collect()
    return {
        "tasks": len([t for t in asyncio.all_tasks() if not t.done()]),
        # The default executor's workers are one bounded pool shared by every
        # encoder in the process, not a per-participant resource.
        "threads": len([t for t in threading.enumerate() if not t.name.startswith("asyncio_")
                        and not t.name.startswith("ThreadPoolExecutor")]),
        "fds": len(os.listdir("/proc/self/fd")),
    }


async def one_cycle(server: RunningServer, host: ConsultationClient, room: str, n: int) -> None:
    client = ConsultationClient(
        server.url, room, server.token(room, f"Visitor {n}", "relative", participant_id="visitor"),
        video=StampedVideoTrack(9, 160, 120, 15), audio=ToneAudioTrack(300),
    )
    await client.join()
    connected = asyncio.Event()
    assert client.pc is not None

    @client.pc.on("connectionstatechange")
    def _() -> None:
        if client.pc is not None and client.pc.connectionState == "connected":
            connected.set()

    await asyncio.wait_for(connected.wait(), 10)
    await host.wait_for(lambda: ("visitor", "video") in host.owners.values())
    if n % 10 == 5:
        # Vanish: the connection drops without a word; the server must notice by itself.
        client.abort_connection()
        await host.wait_for(lambda: not host.owners)
    await client.close()
    # the host sees the visitor's tracks go: the server has closed and renegotiated
    await host.wait_for(lambda: not host.owners)


async def test_join_leave_cycles_release_everything(forwarding_server: RunningServer) -> None:
    server = forwarding_server
    room = server.consultation()
    host, _ = await join_publisher(server, room, 1)
    watcher = Watcher(host)
    try:
        await one_cycle(server, host, room, 0)  # warm up lazily created pools
        baseline = resources()
        host_peer = server.hub.media.rooms[room].peers["p1"]
        for n in range(1, CYCLES + 1):
            await one_cycle(server, host, room, n)
        after = resources()
        assert after == baseline, f"before {baseline}, after {CYCLES} cycles {after}"
        assert list(server.hub.media.rooms[room].peers) == ["p1"]
        assert len(server.hub.sessions) == 1
        assert not host.errors, "the host was never refused anything"
        assert all(not p.subscriptions for p in host_peer.publications.values())
        # and the room still works: a new participant sees the host
        guest, _ = await join_publisher(server, room, 2)
        await receiving_from(guest, {"p1"})
        guest_watcher = Watcher(guest)
        guest_watcher.follow()
        await guest_watcher.wait_for(lambda: len(guest_watcher.frames[1]) >= 5)
        await guest_watcher.stop()
        await guest.close()
    finally:
        await watcher.stop()
        await host.close()
