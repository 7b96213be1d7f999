"""Per-packet delay feedback through the real SFU: Nära's receive path tells the server when each packet
arrived, and the server's estimate follows a link that drops within a fraction of the time reports take."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from bench.link import LinkProfile
from bench.profiles import NamedProfile
from bench.turn import ImpairingTurnServer
from mediaserver.peer import Peer

from .conftest import RunningServer
from .media_helpers import Watcher, join_over_link, receiving_from

DROP_AT = 16.0  # seconds after the relay starts
LOW_RATE = 250_000
STEP = LinkProfile(rate_bps=1_500_000, queue_ms=400, delay_ms=20, rate_steps=((DROP_AT, LOW_RATE),))


@pytest.fixture
async def relay() -> AsyncIterator[ImpairingTurnServer]:
    server = ImpairingTurnServer(seed=5, profiles=lambda _: NamedProfile("step", STEP, STEP, "test link"))
    await server.start()
    yield server
    server.close()




async def test_nara_receivers_send_per_packet_feedback_and_the_estimate_cuts_at_once_when_the_link_drops(
    server: RunningServer, relay: ImpairingTurnServer
) -> None:
    room = server.consultation()
    kit = await join_over_link(server, room, "kit", publish=True)
    direct = await join_over_link(server, room, "direct")  # (the forwarding hot path's direct sends)
    stepped = await join_over_link(server, room, "stepped", relay, "step")  # (aiortc's own send path: through TURN)
    watchers = {c: Watcher(c) for c in (direct, stepped)}
    try:
        for client, watcher in watchers.items():
            await receiving_from(client, {"kit"})
            watcher.follow()
        peers: dict[str, Peer] = server.hub.media.rooms[room].peers

        def per_packet(who: str) -> bool:
            peer = peers[who]
            return peer.transport_feedbacks >= 20 and peer.bandwidth.per_packet(time.monotonic())

        # Both subscribers' feedback comes back and is matched to what the server sent them.
        await watchers[direct].wait_for(lambda: per_packet("direct") and per_packet("stepped"), timeout=30)
        bandwidth = peers["stepped"].bandwidth
        # What the server reads as acknowledged is what went out toward the subscriber, not a guess.
        await watchers[direct].wait_for(lambda: bandwidth.acked is not None and bandwidth.acked > 50_000)
        # The link drops from 1.5 Mbit/s to 250 kbit/s: the estimate is cut for the delay it sees grow,
        # to within the new capacity, long before the receiver reports of a second could show it.
        await watchers[direct].wait_for(lambda: time.monotonic() - relay.epoch >= DROP_AT, timeout=DROP_AT + 5)
        dropped_at = time.monotonic()
        cuts = bandwidth.overuse_cuts
        await watchers[direct].wait_for(
            lambda: bandwidth.overuse_cuts > cuts and bandwidth.estimate <= LOW_RATE * 1.1, timeout=10)
        print(f"estimate within the new capacity {time.monotonic() - dropped_at:.2f} s after the drop")
        assert time.monotonic() - dropped_at < 3.0
    finally:
        for watcher in watchers.values():
            await watcher.stop()
        for client in (stepped, direct, kit):
            await client.close()
