"""End to end: real server on loopback, three aiortc participants see and hear each other."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from mediaserver.forwarding_delay import DelaySnapshot

from .conftest import RunningServer
from .media_helpers import TONES, Watcher, join_publisher, receiving_from


async def test_three_participants_see_and_hear_each_other(forwarding_server: RunningServer) -> None:
    server = forwarding_server
    room = server.consultation()
    joined = [await join_publisher(server, room, tag) for tag in (1, 2, 3)]
    clients = {tag: c for tag, (c, _) in zip((1, 2, 3), joined, strict=False)}
    videos = {tag: v for tag, (_, v) in zip((1, 2, 3), joined, strict=False)}
    watchers = {tag: Watcher(c) for tag, c in clients.items()}
    try:
        for tag, client in clients.items():
            await receiving_from(client, {f"p{t}" for t in clients if t != tag})
            watchers[tag].follow()
        for tag, watcher in watchers.items():
            await watcher.wait_for(lambda w=watcher, me=tag: all(
                len(w.frames[t]) >= 30 for t in clients if t != me))
        # Measure a window: frames sent by each publisher against frames decoded by each receiver.
        sent_before = {tag: v.frames_sent for tag, v in videos.items()}
        seen_before = {tag: {t: set(w.frames[t]) for t in clients} for tag, w in watchers.items()}
        await asyncio.sleep(4)  # the measurement window itself, not synchronisation
        for tag, watcher in watchers.items():
            assert not watcher.frames[tag], "a participant must not receive itself"
            for publisher in clients:
                if publisher == tag:
                    continue
                window = set(range(sent_before[publisher], videos[publisher].frames_sent - 5))
                got = watcher.frames[publisher] - seen_before[tag][publisher]
                ratio = len(got & window) / len(window)
                assert ratio >= 0.9, f"p{tag} decoded {ratio:.0%} of p{publisher}'s frames"
                heard = watcher.tones[f"p{publisher}"][-50:]
                assert heard, f"p{tag} heard nothing from p{publisher}"
                assert np.median(heard) == pytest.approx(TONES[publisher], abs=30)
        # The server says how long it held what it forwarded: nearly every copy sent is counted
        # (the lean path serves a steady flow; only the first packets and probes go the general way).
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
            async with http.get(f"{server.url}/api/stats") as response:
                participants = (await response.json())["rooms"][room]
        for who, figures in participants.items():
            for kind, published in figures["published"].items():
                sent = sum(r["packets"] for p in participants.values() for r in p["received"]
                           if r["from"] == f"{who}/{kind}")
                held = DelaySnapshot.from_json(published["forwarding_delay"])
                assert sent > 0 and held.total >= 0.8 * sent, f"{who}/{kind}: {held.total} of {sent} copies timed"
    finally:
        for w in watchers.values():
            await w.stop()
        for c in clients.values():
            await c.close()
