"""One participant's WebSocket: validation, rate limiting, and the room's events.

A connection must send ``join`` first; after that it answers offers, reports
mute state and sends heartbeats. A malformed message gets an error reply and
changes nothing; a connection that floods is throttled and then closed; a
connection that falls silent past the heartbeat deadline is closed and its
participant leaves. None of this touches anyone else in the room.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from mediaserver.aiortc_adapter import MediaPortsExhausted
from mediaserver.errors import CodedError
from mediaserver.peer import ParticipantInfo
from mediaserver.pool import WORKER_LOST
from mediaserver.service import MediaPeer, MediaService

from .config import ServerConfig
from .protocol import (
    PROTOCOL_VERSION,
    Answer,
    ClientMessage,
    Join,
    Leave,
    Mute,
    Ping,
    ProtocolError,
    RequestPhoto,
    error_message,
    parse_client_message,
)
from .ratelimit import TokenBucket
from .store import ConsultationStore
from .tokens import TokenAuthority, TokenError
from .turn import ice_servers_for

if TYPE_CHECKING:
    from .cluster import ClusterNode
    from .devices import HomeKits

logger = logging.getLogger(__name__)

# aiohttp closes a connection outright (1009) past this size; between
# protocol.MAX_MESSAGE_BYTES and this, the sender gets an error reply instead.
WS_MAX_FRAME = 1024 * 1024
JOIN_DEADLINE = 10.0
MESSAGES_PER_SECOND = 20.0
MESSAGE_BURST = 40.0
DROPPED_BEFORE_CLOSE = 200

CLOSE_REFUSED = 4001  # token or permission refused
CLOSE_REPLACED = 4002  # the same participant joined from elsewhere
CLOSE_REVOKED = 4403  # a home kit IT staff revoked
CLOSE_POLICY = 1008
CLOSE_REDIRECT = 4307  # the consultation is on another node of the cluster: join there
CLOSE_RESTART = 1012  # the media process of the call stopped: join again (clients reconnect on any close)
CLOSE_TRY_AGAIN = 1013  # no media process is up right now
DISCONNECT_WAIT = 2.0  # seconds a revocation waits for the kit's connections to close
PHOTO_REQUESTERS = frozenset({"clinician", "nurse"})


@dataclass
class SignallingHub:
    """What every WebSocket of this server shares."""

    config: ServerConfig
    authority: TokenAuthority
    store: ConsultationStore
    media: MediaService  # a MediaServer in this process, or the WorkerPool of worker processes
    sessions: dict[tuple[str, str], ParticipantSocket] = field(default_factory=dict)
    devices: HomeKits | None = None
    cluster: ClusterNode | None = None  # one node of several sharing a Redis registry (cluster.py)
    draining: bool = False  # joins only to consultations live here (ops.py)
    _closing: set[asyncio.Future[None]] = field(default_factory=set)

    def connected(self, participant_id: str) -> bool:
        """Is this participant in any consultation right now?"""
        return any(pid == participant_id for _, pid in self.sessions)

    async def notify(self, room_id: str, message: dict[str, Any], roles: frozenset[str] | None = None) -> int:
        """Send an event to everyone joined to ``room_id`` (only ``roles``, when given); to how many."""
        found = [
            session for (room, _), session in self.sessions.items()
            if room == room_id and session.peer is not None and (roles is None or session.peer.info.role in roles)
        ]
        sent = 0
        for session in found:
            try:
                await session.signal(message)
                sent += 1
            except (ConnectionError, RuntimeError) as exc:  # the connection is closing: it will leave
                logger.info("could not send %s to a participant of %s: %s", message.get("type"), room_id, exc)
        return sent

    async def disconnect(self, participant_id: str, role: str, code: str, message: str, close_code: int) -> int:
        """Send ``code`` to every live connection of this participant in ``role`` and close it; how many."""
        found = [
            session for (_, pid), session in self.sessions.items()
            if pid == participant_id and session.peer is not None and session.peer.info.role == role
        ]
        # A dead link would hold a close for aiohttp's close timeout: do not hold the caller that long.
        closing = [asyncio.ensure_future(session.refuse(code, message, close_code)) for session in found]
        self._closing.update(closing)
        for task in closing:
            task.add_done_callback(self._closing.discard)
        if closing:
            await asyncio.wait(closing, timeout=DISCONNECT_WAIT)
        return len(found)


class ParticipantSocket:
    def __init__(self, hub: SignallingHub, ws: web.WebSocketResponse, remote: str | None) -> None:
        self.hub = hub
        self.ws = ws
        self.remote = remote
        self.peer: MediaPeer | None = None
        self.room_id: str | None = None
        self.bucket = TokenBucket(MESSAGES_PER_SECOND, MESSAGE_BURST)
        self.dropped = 0
        # What the media side signals while this participant is being joined (another participant's
        # track, an offer) waits here, so the client always reads "joined" first.
        self._held: list[dict[str, Any]] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message, ensure_ascii=False))

    async def signal(self, message: dict[str, Any]) -> None:
        """A message from the media side: held until "joined" has gone out, then sent in order."""
        if self._held is not None:
            self._held.append(message)
        else:
            await self.send(message)

    async def _release_held(self) -> None:
        while self._held:
            await self.send(self._held.pop(0))
        self._held = None  # (no wait between the last check and this: nothing can slip past the order)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.ws.closed:
            await self.ws.close(code=code, message=reason.encode()[:120])

    async def refuse(self, code: str, message: str, close_code: int = CLOSE_REFUSED) -> None:
        await self.send(error_message(code, message))
        await self.close(close_code, code)

    async def run(self) -> None:
        try:
            while not self.ws.closed:
                timeout = self.hub.config.heartbeat_timeout if self.peer else JOIN_DEADLINE
                try:
                    msg = await self.ws.receive(timeout=timeout)
                except TimeoutError:
                    await self.refuse(
                        "heartbeat_timeout",
                        "Nothing was heard from this connection in time; it was closed.",
                        CLOSE_POLICY,
                    )
                    break
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                if not await self.admit(msg.data):
                    break
        finally:
            await self.leave()

    async def admit(self, raw: str | bytes) -> bool:
        """Validate, rate-limit and act on one message; False when the connection must end."""
        message: ClientMessage | None = None
        error: ProtocolError | None = None
        try:
            message = parse_client_message(raw)
        except ProtocolError as exc:
            error = exc
        # An answer to the server's own outstanding offer is bounded by the
        # server and never costs the client its budget; everything else does.
        expected = isinstance(message, Answer) and self.peer is not None and self.peer.awaiting_answer
        if not expected and not self.bucket.take():
            self.dropped += 1
            if self.dropped > DROPPED_BEFORE_CLOSE:
                await self.refuse("rate_limited", "Too many messages; connection closed.", CLOSE_POLICY)
                return False
            if self.dropped % 20 == 1:
                await self.send(error_message("rate_limited", "Too many messages; some were dropped."))
            return True
        try:
            if error is not None:
                raise error
            assert message is not None
            await self.dispatch(message)
        except CodedError as exc:
            await self.send(error_message(exc.code, exc.message))
        return True

    async def dispatch(self, message: ClientMessage) -> None:
        if isinstance(message, Join):
            await self.join(message)
            return
        if isinstance(message, Ping):
            await self.send({"type": "pong", "id": message.id})
            return
        if self.peer is None or self.room_id is None:
            raise ProtocolError("not_joined", "Send 'join' before anything else.")
        if isinstance(message, Answer):
            await self.peer.handle_answer(message.sdp)
        elif isinstance(message, Mute):
            await self.hub.media.mute(self.room_id, self.peer, message.kind, message.muted)
        elif isinstance(message, Leave):
            await self.close(1000, "left")
        elif isinstance(message, RequestPhoto):
            await self.request_photo(message)

    async def request_photo(self, message: RequestPhoto) -> None:
        assert self.peer is not None and self.room_id is not None
        if self.peer.info.role not in PHOTO_REQUESTERS:
            raise ProtocolError("photo_not_allowed", "Only a clinician or nurse may ask for a photo.")
        logger.info("participant %s asked for a photo in %s", self.peer.info.id, self.room_id)
        await self.hub.notify(self.room_id, {
            "type": "photo-requested",
            "by": self.peer.info.public(),
            "body_site": message.body_site,
            "note": message.note,
        })

    async def join(self, message: Join) -> None:
        if self.peer is not None:
            raise ProtocolError("already_joined", "This connection has already joined.")
        consultation = self.hub.store.get(message.room)
        if consultation is None and self.hub.cluster is not None:
            await self.redirect(message)
            return
        if consultation is None or consultation.status != "open":
            await self.refuse("room_not_found", "There is no open consultation with this id.")
            return
        try:
            claims = self.hub.authority.verify(message.token, message.room)
        except TokenError as exc:
            logger.info("join refused from %s: %s", self.remote, exc.code)
            await self.refuse(exc.code, exc.message)
            return
        if claims.role == "kit" and self.hub.devices is not None:
            try:
                self.hub.devices.check_not_revoked(claims.participant_id)
            except CodedError as exc:
                logger.info("join refused from %s: kit %s: %s", self.remote, claims.participant_id, exc.code)
                await self.refuse(exc.code, exc.message, CLOSE_REVOKED)
                return
        if message.publish and not claims.may_publish:
            await self.refuse(
                "publish_not_allowed",
                f"The role {claims.role} may not publish; join with publish set to false.",
            )
            return
        if self.hub.draining and not self.hub.media.is_live(message.room):
            await self.refuse("draining", "This server is restarting and starts no new calls; join again shortly.")
            return
        key = (message.room, claims.participant_id)
        previous = self.hub.sessions.get(key)
        if previous is not None and previous is not self:
            await previous.refuse("replaced", "You joined from another connection.", CLOSE_REPLACED)
        info = ParticipantInfo(claims.participant_id, claims.name, claims.role, message.publish,
                               uplink_feedback=message.uplink_feedback and message.publish)
        self._held = []
        try:
            self.peer = await self.hub.media.join(message.room, info, self.signal, self._media_failed)
            self.room_id = message.room
            self.hub.sessions[key] = self
            participants = await self.hub.media.participants(message.room)
        except CodedError as exc:  # no media worker is up, or it stopped meanwhile: the client joins again
            logger.warning("participant %s not joined to %s: %s", info.id, message.room, exc.code)
            self._held = None
            await self.refuse(exc.code, exc.message, CLOSE_RESTART if exc.code == WORKER_LOST else CLOSE_TRY_AGAIN)
            return
        logger.info("participant %s (%s) joined %s", info.id, info.role, message.room)
        await self.send(
            {
                "type": "joined",
                "protocol": PROTOCOL_VERSION,
                "participant": info.public(),
                "room": {"id": consultation.id, "title": consultation.title},
                "participants": [p for p in participants if p["id"] != info.id],
                "ice_servers": ice_servers_for(self.hub.config, info.id, time.time()),
                "ice_transport_policy": self.hub.config.ice_transport_policy,
                "heartbeat_interval": self.hub.config.heartbeat_interval,
                "heartbeat_timeout": self.hub.config.heartbeat_timeout,
            }
        )
        await self._release_held()
        try:
            await self.peer.negotiate()
        except MediaPortsExhausted as exc:
            logger.warning("participant %s refused in %s: no free media port", info.id, message.room)
            await self.refuse(exc.code, exc.message)  # the socket closes and the participant leaves the room
        except CodedError as exc:  # its media worker stopped or did not answer: the client joins again
            logger.warning("participant %s of %s: no first offer: %s", info.id, message.room, exc.code)
            await self.refuse(exc.code, exc.message, CLOSE_RESTART if exc.code == WORKER_LOST else CLOSE_TRY_AGAIN)

    async def redirect(self, message: Join) -> None:
        """Send a join for a consultation held by another node of the cluster there (docs/protocol.md)."""
        assert self.hub.cluster is not None
        try:
            self.hub.authority.verify(message.token, message.room)  # only its participants learn where it is
            owner = await self.hub.cluster.owner(message.room)
        except TokenError as exc:
            logger.info("join refused from %s: %s", self.remote, exc.code)
            await self.refuse(exc.code, exc.message)
            return
        except CodedError as exc:  # the registry or the owner cannot be reached: the client tries again
            await self.refuse(exc.code, exc.message, CLOSE_POLICY)
            return
        if owner is None:
            await self.refuse("room_not_found", "There is no open consultation with this id.")
            return
        logger.info("join for %s from %s sent to node %s", message.room, self.remote, owner.id)
        await self.send({
            "type": "redirect", "code": "consultation_elsewhere", "url": owner.url, "node": owner.id,
            "message": "This consultation is held by another server; join there.",
        })
        await self.close(CLOSE_REDIRECT, "consultation_elsewhere")

    async def _media_failed(self, peer: MediaPeer, code: str) -> None:
        if peer is not self.peer:
            return
        if code == WORKER_LOST:
            logger.warning("participant %s of %s: its media worker stopped; told to join again", peer.info.id,
                           self.room_id)
            await self.refuse(code, "The server's media process for this call stopped; join again.", CLOSE_RESTART)
        else:
            await self.refuse(code, "The media connection failed; join again.", CLOSE_POLICY)

    async def leave(self) -> None:
        peer, room_id = self.peer, self.room_id
        self.peer = None
        await self.close()
        if peer is None or room_id is None:
            return
        key = (room_id, peer.info.id)
        if self.hub.sessions.get(key) is self:
            del self.hub.sessions[key]
        await self.hub.media.leave(room_id, peer.info.id, peer)
        logger.info("participant %s left %s", peer.info.id, room_id)


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    hub: SignallingHub = request.app[HUB]
    ws = web.WebSocketResponse(max_msg_size=WS_MAX_FRAME, autoping=True)
    await ws.prepare(request)
    await ParticipantSocket(hub, ws, request.remote).run()
    return ws


HUB: web.AppKey[SignallingHub] = web.AppKey("hub", SignallingHub)
