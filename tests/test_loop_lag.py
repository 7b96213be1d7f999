"""A media worker whose loop is behind: it knows it, and sheds resends before any media.

The lag's smoothing on a fake clock; a real loop held by work; and a real
server (in this process) with real aiortc participants: far behind, the server
sends a lossy subscriber no resends, and sends them again once it has caught up;
behind, it starts no layer for a new subscriber, who waits "starting" until it
has caught up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mediaserver.aiortc_adapter import dtls_transport, filter_inbound_rtp, negotiated_payload_type
from mediaserver.loop_lag import BUSY_LAG, SHED_LAG, TICK, LoopLag
from signalling.client import ConsultationClient

from .conftest import RunningServer
from .media_helpers import Watcher, join_publisher, receiving_from


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    """Look every 0.1 s until ``predicate`` holds (what it reads changes without telling anyone), bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.1)  # the pace of looking, not a wait for the event


def _ticks(lag: LoopLag, start: float, seconds: float, late: float) -> float:
    """Ticks every TICK for ``seconds`` from ``start``, each ``late`` seconds late; the time after the last."""
    now = start
    while now < start + seconds:
        now += TICK + late
        lag.note(late, now)
    return now


def test_a_loop_late_for_a_while_is_behind_and_a_single_stall_is_not() -> None:
    lag = LoopLag()
    now = _ticks(lag, 0.0, 1.0, 0.0)
    assert not lag.busy and lag.lag == 0.0
    # one collector's pass of 30 ms among on-time ticks: not behind
    now += TICK + 0.030
    lag.note(0.030, now)
    assert not lag.busy
    now = _ticks(lag, now, 0.5, 0.0)
    assert lag.lag < 0.002
    # every tick 20 ms late for half a second: behind
    now = _ticks(lag, now, 0.5, 0.020)
    assert lag.busy and not lag.shedding and 0.015 < lag.lag <= 0.020
    # 80 ms late, a whole loop's worth of queue: far behind
    now = _ticks(lag, now, 0.5, 0.080)
    assert lag.shedding
    # on time again: caught up within half a second
    _ticks(lag, now, 0.5, 0.0)
    assert not lag.busy


async def test_a_real_loop_held_by_work_most_of_the_time_reads_as_behind_then_catches_up() -> None:
    lag = LoopLag()
    lag.start()
    loop = asyncio.get_running_loop()
    holding = True

    def hold() -> None:  # work that holds the loop 40 ms at a time, as a worker past its core's capacity
        until = time.perf_counter() + 0.040
        while time.perf_counter() < until:
            pass
        if holding:
            loop.call_soon(hold)

    try:
        loop.call_soon(hold)
        deadline = loop.time() + 5.0
        while not lag.busy and loop.time() < deadline:
            await asyncio.sleep(TICK)  # (the pace of looking; hold() keeps the loop busy meanwhile)
        assert lag.busy and lag.lag >= BUSY_LAG
        holding = False
        deadline = loop.time() + 5.0
        while lag.busy and loop.time() < deadline:
            await asyncio.sleep(TICK)
        assert not lag.busy
    finally:
        holding = False
        await lag.stop()


async def test_a_server_far_behind_sends_no_resends_and_sends_them_again_once_caught_up(
        forwarding_server: RunningServer) -> None:
    server = forwarding_server
    media = server.hub.media
    behind = media.loop_lag = LoopLag(busy_lag=1e9, shed_lag=1e9)  # (not behind, until the test says so)
    room = server.consultation()
    p1, _ = await join_publisher(server, room, 1, width=320, height=240, fps=15)
    p2, _ = await join_publisher(server, room, 2)
    await receiving_from(p2, {"p1"})
    assert p2.pc is not None
    video = next(t for t in p2.pc.getTransceivers() if p2.owners.get(t.mid or "") == ("p1", "video"))
    video_pt = negotiated_payload_type(video, "video/VP8")
    counter = 0

    def keep(data: bytes) -> bool:  # one video packet in 25 lost on the way to p2, its resends let through
        nonlocal counter
        if data[1] & 0x7F != video_pt:
            return True
        counter += 1
        return counter % 25 != 0

    filter_inbound_rtp(dtls_transport(p2.pc), keep)
    w2 = Watcher(p2)
    w2.follow()
    try:
        await w2.wait_for(lambda: len(w2.frames[1]) >= 15, timeout=15)
        subscription = next(s.subscription for s in media.rooms[room].peers["p2"].slots
                            if s.subscription is not None and s.kind == "video")
        await w2.wait_for(lambda: subscription.stats.retransmitted >= 1, timeout=15)
        # the server falls far behind (any lateness of its loop now counts as far behind)
        behind.busy_lag = behind.shed_lag = 0.0
        await w2.wait_for(lambda: behind.shedding, timeout=5)
        resent = subscription.stats.retransmitted
        await w2.wait_for(lambda: subscription.stats.resends_shed >= 3, timeout=15)
        assert subscription.stats.retransmitted - resent <= 1  # (one asked for before the server fell behind)
        # caught up: resends again
        behind.busy_lag, behind.shed_lag = BUSY_LAG, SHED_LAG
        resent = subscription.stats.retransmitted
        await w2.wait_for(lambda: subscription.stats.retransmitted >= resent + 3, timeout=15)
        assert not behind.shedding
    finally:
        await w2.stop()
        await p1.close()
        await p2.close()


async def test_a_server_behind_starts_no_layer_the_new_subscriber_waits_starting_then_gets_video(
        server: RunningServer) -> None:
    media = server.hub.media
    behind = media.loop_lag = LoopLag(busy_lag=0.0)  # (any lateness counts: behind from its first tick on)
    behind.note(0.001, 0.0)  # (and before it: the first decision may come first)
    room = server.consultation()
    publisher, _ = await join_publisher(server, room, 1, fps=10)
    subscriber = ConsultationClient(server.url, room, server.token(room, "Dr", participant_id="dr"), publish=False)
    try:
        await media.wait_until(lambda: "video" in media.rooms[room].peers["p1"].publications, 15)
        ladder = media.rooms[room].peers["p1"].publications["video"].ladder
        assert ladder is not None
        await subscriber.join()

        def level() -> str | None:
            peer = media.rooms[room].peers.get("dr")
            subs = [s.subscription for s in peer.slots if s.kind == "video" and s.subscription is not None] \
                if peer is not None else []
            return subs[0].publication.level_name(subs[0].level) if subs else None

        # a new subscriber starts on a layer made on the server: while the server is behind, none starts
        await _until(lambda: ladder.start_put_off and level() == "starting", 15)
        assert behind.busy and not ladder.layers
        # caught up: the layer starts and the subscriber has video
        behind.busy_lag = BUSY_LAG
        await _until(lambda: level() not in (None, "starting"), 15)
        assert ladder.layers or level() == "original"
    finally:
        await subscriber.close()
        await publisher.close()


class _LinkWithRoom:
    """A subscriber's link that would take more: it probes whenever it is asked to."""

    def __init__(self) -> None:
        self.asked = 0

    def video_budget(self) -> float | None:
        return 300_000.0

    def rise_budget(self) -> float | None:
        return None

    def probe(self, now: float, wanted: float) -> float | None:
        self.asked += 1
        return wanted

    def padding(self, now: float) -> bool:
        return self.asked > 0

    def lost_packets(self, now: float, packets: int = 1) -> None:
        pass

    def own_loss(self) -> float:
        return 0.0

    def transit(self) -> float | None:
        return None


async def test_behind_no_new_probe_starts_and_once_caught_up_one_does() -> None:
    from typing import Any, cast

    from mediaserver.forwarder import Publication, Subscription
    from mediaserver.rewriter import StreamRewriter

    publication = Publication("kit", "video", cast(Any, None), clock=lambda: 10.0)
    lag = publication.loop_lag = LoopLag()
    link = _LinkWithRoom()
    subscription = Subscription(publication, cast(Any, None), StreamRewriter(90000), link)
    subscription.level = 0  # on the lower of two levels, the link with room for the upper one
    levels = [(0, 150_000.0), (1, 500_000.0)]
    lag.note(0.030, 10.0)  # behind
    assert lag.busy
    await subscription.decide(10.0, levels, cap_limited=False)
    assert link.asked == 0 and subscription.probe_factor == 0.0
    lag.note(0.0, 11.0)  # caught up
    await subscription.decide(11.0, levels, cap_limited=False)
    assert link.asked == 1 and subscription.probe_factor > 1.0
    # a probe under way when the worker falls behind runs its course (a short cluster)
    lag.note(0.050, 11.1)
    assert lag.busy
    await subscription.decide(11.1, levels, cap_limited=False)
    assert link.asked == 2 and subscription.probe_factor > 1.0
