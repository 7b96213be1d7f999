"""The kit reads the queue standing in its uplink from the server's transport feedback on what it sends.

A home kit's photo upload yields to the call by the queue in front of the call's packets (edge/pacing.py).
A receiver report a second gives one packet's round trip, and on a thin uplink one packet that came behind
one or two of the photo's reads as a queue while the link is far from full. With every packet the kit sends
stamped and the server telling it when each arrived, the kit reads what every packet of the last half
second met: the queue that stands.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.link import LinkProfile
from bench.profiles import NamedProfile
from bench.turn import ImpairingTurnServer
from edge.config import TurnRelay
from edge.uplink import UplinkQueue
from mediaserver.peer import Peer
from signalling.protocol import Join, ProtocolError, parse_client_message

from .conftest import RunningServer
from .edge_helpers import KitWatcher, admin, agent_running, enrolled_kit, kit_config

OPEN = LinkProfile(rate_bps=2_000_000, queue_ms=1000, delay_ms=20)
THIN = 40_000  # bit/s: under what the kit's call sends (audio and the lowest video)


# --- the standing queue, from arrivals --------------------------------------------


def test_a_packet_behind_one_of_the_photos_is_no_standing_queue() -> None:
    queue = UplinkQueue(window=0.5)
    # 16 packets a second; every third one came behind a full packet of the photo (47 ms at 256 kbit/s).
    for k in range(64):
        sent = k / 16
        wait = 0.047 if k % 3 == 0 else 0.004 * (k % 2)
        sample = queue.on_arrivals([(sent, 100.0 + sent + 0.050 + wait)], now=sent + 0.1)
    assert sample is not None and sample.queue < 0.005


def test_a_queue_every_packet_meets_stands_and_is_read_above_the_base() -> None:
    queue = UplinkQueue(window=0.5)
    arrivals = [(k / 16, 7.0 + k / 16 + 0.030) for k in range(32)]  # 30 ms one way, nothing queued
    queue.on_arrivals(arrivals, now=2.0)
    growing = [(2 + k / 16, 7.0 + 2 + k / 16 + 0.030 + 0.010 * k) for k in range(16)]  # the queue grows
    sample = queue.on_arrivals(growing, now=3.0)
    assert sample is not None
    # the least of the packets sent in the half second up to the newest (nine of them, 70-150 ms of queue)
    assert sample.queue == pytest.approx(0.070, abs=1e-9)
    assert sample.at == 3.0 and sample.packets == 16


def test_lost_packets_and_late_feedback_leave_the_reading_alone() -> None:
    queue = UplinkQueue(window=0.5)
    queue.on_arrivals([(k / 16, k / 16 + 0.1) for k in range(16)], now=1.0)
    standing = queue.on_arrivals([(1 + k / 16, 1 + k / 16 + 0.2) for k in range(16)], now=2.0)
    assert standing is not None and standing.queue == pytest.approx(0.1)
    # only lost packets: nothing new to read
    assert queue.on_arrivals([(2.1, None), (2.2, None)], now=2.3) is standing
    # a feedback that came late, about packets from a second ago that met no queue: the standing queue
    # of the last half second is still 0.1 s
    late = queue.on_arrivals([(0.5 + k / 32, 0.5 + k / 32 + 0.1) for k in range(4)], now=2.4)
    assert late is not None and late.queue == pytest.approx(0.1)


def test_the_base_is_the_least_delay_of_the_base_window() -> None:
    queue = UplinkQueue(window=0.5, base_window=10.0)
    queue.on_arrivals([(0.0, 0.010)], now=0.0)  # the least, long ago
    queue.on_arrivals([(k * 0.5, k * 0.5 + 0.050) for k in range(1, 30)], now=15.0)
    sample = queue.on_arrivals([(15.0, 15.050)], now=15.0)
    assert sample is not None and sample.queue == pytest.approx(0.0)  # 0.010 is out of the window


# --- the join asks for it; others are not offered it ------------------------------


def test_the_join_asks_for_uplink_feedback_with_a_boolean() -> None:
    join = parse_client_message(json.dumps({"type": "join", "room": "r", "token": "t", "uplink_feedback": True}))
    assert isinstance(join, Join) and join.uplink_feedback
    plain = parse_client_message(json.dumps({"type": "join", "room": "r", "token": "t"}))
    assert isinstance(plain, Join) and not plain.uplink_feedback
    with pytest.raises(ProtocolError) as refused:
        parse_client_message(json.dumps({"type": "join", "room": "r", "token": "t", "uplink_feedback": "yes"}))
    assert refused.value.code == "message_invalid"


# --- a real kit over a link that thins -------------------------------------------


@pytest.fixture
async def relay() -> AsyncIterator[ImpairingTurnServer]:
    server = ImpairingTurnServer(seed=3, profiles=lambda _: NamedProfile("open", OPEN, OPEN, "test link"))
    await server.start()
    yield server
    server.close()


async def test_the_kit_reads_its_uplinks_queue_stand_when_the_link_thins(
    server: RunningServer, relay: ImpairingTurnServer, tmp_path: Path
) -> None:
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation()
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
    clinician = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
    config = kit_config(server.url, credential, turn=TurnRelay(relay.url, "open/kit", relay.password))
    try:
        async with agent_running(config) as agent:
            await clinician.wait_for(clinician.sees_kit, 20)
            peers: dict[str, Peer] = server.hub.media.rooms[room].peers
            assert peers[kit_id].info.uplink_feedback  # (a browser's join does not ask: see above)

            def readings() -> int:
                call = agent.call
                return 0 if call is None or call.uplink is None else call.uplink.packets

            # The feedback comes for the kit's packets, and on the open link no queue stands.
            await clinician.wait_for(lambda: readings() > 0, 10)
            call = agent.call
            assert call is not None and call.uplink is not None
            assert call.uplink.queue < 0.030, call.uplink
            # The uplink thins under what the call sends: a queue builds and every packet meets it.
            (allocation,) = [a for a in relay.allocations.values() if a.username == "open/kit"]
            allocation.uplink.profile = dataclasses.replace(OPEN, rate_bps=THIN)
            await clinician.wait_for(lambda: call.uplink is not None and call.uplink.queue > 0.200, 15)
            # ... and once the link is open again the queue drains, and the reading follows it down.
            allocation.uplink.profile = OPEN
            await clinician.wait_for(lambda: call.uplink is not None and call.uplink.queue < 0.030, 15)
    finally:
        await clinician.close()
