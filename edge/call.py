"""One call: the kit joins its consultation, publishes, and watches the link until the call ends.

A dead link is noticed within about three seconds, by either of two signs:

* signalling: a ping goes out every second; no pong for ``heartbeat_dead``
  seconds means the connection is gone (TCP may take minutes to say so) —
  once the call is connected, only while no datagram has come either for
  ``media_quiet`` seconds: on a thin, lossy uplink a pong can wait seconds
  behind a photo's bytes and TCP's repairs while the call's media still flows,
  and rebuilding the call then cost 3–5 s of audio for nothing. A
  signalling connection silent for ``heartbeat_limit`` ends the call whatever
  the media does;
* media: once connected, the server sends RTCP (receiver reports, REMB) at
  least every 1.5 s and usually other participants' media too; no datagram at
  all for ``media_dead`` seconds means the path is gone (aiortc would wait for
  its ICE consent to fail, about 30 s).

The call then ends with the reason, and the agent builds a new peer
connection from scratch (aiortc has no ICE restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiortc import RTCIceServer, RTCPeerConnection

from mediaserver.aiortc_adapter import (
    follow_round_trips,
    follow_transport_feedback,
    set_transport_feedback_interval,
    stamp_sent_packets,
)
from mediaserver.twcc import SendHistory, TransportFeedback
from signalling.client import ConsultationClient, JoinRefused

from .config import TurnRelay
from .device_api import Assignment, classify
from .media import KitMedia
from .pacing import RttSample
from .reconnect import Failure
from .remote import RemoteMedia
from .uplink import QueueSample, UplinkQueue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallTimings:
    ping_interval: float = 1.0
    heartbeat_dead: float = 2.8
    media_quiet: float = 1.5  # with no pong for heartbeat_dead, no datagram for this long either: the link is dead
    heartbeat_limit: float = 10.0  # no pong for this long: the signalling is dead, whatever the media does
    media_dead: float = 3.0
    check_interval: float = 0.25
    join_timeout: float = 8.0
    connect_timeout: float = 10.0  # from joined to media flowing
    teardown_timeout: float = 3.0


@dataclass(frozen=True)
class CallEnd:
    failure: Failure
    detail: str
    revoked: bool = False
    connected_for: float = 0.0


class KitCall:
    def __init__(
        self,
        server: str,
        assignment: Assignment,
        media: KitMedia,
        remote: RemoteMedia,
        *,
        turn: TurnRelay | None = None,
        timings: CallTimings | None = None,
        on_connected: Callable[[], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.server = server
        self.assignment = assignment
        self.media = media
        self.remote = remote
        self.turn = turn
        self.timings = timings or CallTimings()
        self.on_connected = on_connected
        self.on_event = on_event  # server events for the agent, e.g. photo-requested
        self._events_seen = 0
        self._attached: set[int] = set()
        self._timed: set[int] = set()
        self.rtt: RttSample | None = None  # the latest round trip a receiver report told, for photo uploads
        # The queue standing in the uplink, from the server's transport feedback on what the kit sends (finer
        # than the reports' round trips: edge/uplink.py), for photo uploads; per media connection.
        self.uplink: QueueSample | None = None
        self._uplink_queue: UplinkQueue | None = None
        self._sent: SendHistory | None = None
        self.feedback_interval: float | None = None  # seconds between its transport feedback (None: the usual)
        self._pc: RTCPeerConnection | None = None  # the media connection, once answered
        self._loop = asyncio.get_running_loop()

    async def run(self) -> CallEnd:
        """Join and stay until the link dies, the server ends the call, or the task is cancelled."""
        audio, video = self.media.call_tracks()
        ice_servers = None
        if self.turn is not None:
            ice_servers = [RTCIceServer(urls=self.turn.url, username=self.turn.username,
                                        credential=self.turn.credential)]
        client = ConsultationClient(
            self.server, self.assignment.consultation_id, self.assignment.token, audio=audio, video=video,
            ice_servers=ice_servers, relay_only=self.turn is not None, nara_receive=True,
            on_answered=self._answered, heartbeat_interval=self.timings.ping_interval, uplink_feedback=True,
        )
        self._client = client
        try:
            try:
                await asyncio.wait_for(client.join(timeout=self.timings.join_timeout), self.timings.join_timeout)
            except JoinRefused as exc:
                return self._refused(exc.code, exc.message)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                unreachable = classify(exc)
                return CallEnd(unreachable.failure, unreachable.detail)
            return await self._watch(client)
        finally:
            await self._teardown(client)
            for track in (audio, video):
                if track is not None:
                    track.stop()

    def _refused(self, code: str, message: str) -> CallEnd:
        if code == "device_revoked":
            return CallEnd(Failure.REFUSED, message, revoked=True)
        if code == "connection_closed":
            return CallEnd(Failure.UNREACHABLE, "the server closed the connection while joining")
        return CallEnd(Failure.REFUSED, f"{code}: {message}")

    async def _watch(self, client: ConsultationClient) -> CallEnd:
        t = self.timings
        joined_at = self._loop.time()
        connected_at: float | None = None
        packets = -1
        heard_at = joined_at
        while True:
            await asyncio.sleep(t.check_interval)  # the watch's own pace, not a wait for an event
            now = self._loop.time()
            self._hand_on_events(client)
            if client.ended:
                error = client.errors[-1] if client.errors else None
                if error is not None and error.get("code") == "device_revoked":
                    return CallEnd(Failure.REFUSED, str(error.get("message", "")), revoked=True)
                detail = f"the server ended the call ({error['code']})" if error else "the signalling connection closed"
                return self._end(Failure.CLOSED, detail, connected_at, now)
            silent = now - client.last_pong if client.last_pong is not None else 0.0
            if silent > t.heartbeat_dead and (connected_at is None or silent > t.heartbeat_limit):
                return self._end(Failure.HEARTBEAT, f"no pong for {silent:.1f} s", connected_at, now)
            pc = client.pc
            if pc is None:
                continue
            if pc.connectionState in ("failed", "closed"):
                return self._end(Failure.MEDIA, f"the media connection {pc.connectionState}", connected_at, now)
            received = await _packets_received(pc)
            if received != packets:
                packets, heard_at = received, now
            if connected_at is not None and silent > t.heartbeat_dead and now - heard_at > t.media_quiet:
                return self._end(Failure.HEARTBEAT, f"no pong for {silent:.1f} s and no media for "
                                 f"{now - heard_at:.1f} s", connected_at, now)
            if connected_at is None:
                if pc.connectionState == "connected" and received > 0:
                    connected_at = now
                    if self.on_connected is not None:
                        self.on_connected()
                elif now - joined_at > t.connect_timeout:
                    return self._end(Failure.MEDIA, "the media connection did not come up", None, now)
            elif now - heard_at > t.media_dead:
                return self._end(Failure.MEDIA, f"no media from the server for {now - heard_at:.1f} s",
                                 connected_at, now)

    def _hand_on_events(self, client: ConsultationClient) -> None:
        """Give the agent the server's events that arrived since the last look (within a check interval)."""
        events = client.events[self._events_seen:]
        self._events_seen += len(events)
        if self.on_event is not None:
            for event in events:
                if event.get("type") == "photo-requested":
                    self.on_event(event)

    def _end(self, failure: Failure, detail: str, connected_at: float | None, now: float) -> CallEnd:
        return CallEnd(failure, detail, connected_for=0.0 if connected_at is None else now - connected_at)

    def pace_feedback(self, interval: float | None) -> None:
        """Space the call's transport feedback ``interval`` seconds apart (None: the usual), now and on
        the connection it makes (a thin uplink: see ``mediaserver.aiortc_adapter``)."""
        self.feedback_interval = interval
        if self._pc is not None:
            set_transport_feedback_interval(self._pc, interval)

    def _answered(self, pc: RTCPeerConnection) -> None:
        self._pc = pc
        set_transport_feedback_interval(pc, self.feedback_interval)
        for transceiver in pc.getTransceivers():
            sender, sent = transceiver.sender, transceiver.sender.track
            attach = getattr(sent, "attach", None)
            if attach is not None and id(sender) not in self._attached:
                self._attached.add(id(sender))
                attach(sender)  # Nära's VP8 follows the REMB and keyframe requests this sender gets
            if sent is not None and id(sender) not in self._timed:
                self._timed.add(id(sender))
                follow_round_trips(sender, self._round_trip)
                stamp_sent_packets(sender)
        if self._sent is None:
            self._uplink_queue = UplinkQueue()
            self._sent = follow_transport_feedback(pc, self._transport_feedback)
        for mid, track in self._client.remote_tracks.items():
            self.remote.follow(mid, track, functools.partial(self._owner, mid))

    def _round_trip(self, rtt: float) -> None:
        self.rtt = RttSample(rtt, self._loop.time())

    def _transport_feedback(self, feedback: TransportFeedback) -> None:
        if self._sent is None or self._uplink_queue is None:
            return
        results = self._sent.results(feedback)
        self.uplink = self._uplink_queue.on_arrivals(((r.sent, r.arrival) for r in results), self._loop.time())

    def _owner(self, mid: str) -> str | None:
        owner = self._client.owners.get(mid)
        if owner is None:
            return None
        participant = self._client.participants.get(owner[0])
        return str(participant.get("name", owner[0])) if participant else owner[0]

    async def _teardown(self, client: ConsultationClient) -> None:
        """Close everything of this call promptly, even over a dead network."""
        self.remote.forget_all()
        with contextlib.suppress(AttributeError):  # no connection left to abort
            client.abort_connection()  # no goodbye over a link that may be dead: it could wait for minutes
        try:
            await asyncio.wait_for(client.close(), self.timings.teardown_timeout)
        except (TimeoutError, Exception):
            logger.warning("the call's connections did not close cleanly")
            if client.pc is not None:
                with contextlib.suppress(Exception):
                    await client.pc.close()


async def _packets_received(pc: RTCPeerConnection) -> int:
    """Datagrams the peer connection's transport has received (RTP, RTCP and DTLS)."""
    report = await pc.getStats()
    return sum(int(getattr(s, "packetsReceived", 0)) for s in report.values() if s.type == "transport")
