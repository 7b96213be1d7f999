"""A Python participant: joins a consultation over the signalling protocol.

Used by the home kit's agent, the benchmark's synthetic participants and the
tests. It answers the server's offers, publishes the tracks it is given into
the transceivers the server set aside for them, keeps the heartbeat, and keeps
track of which remote track belongs to which participant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtptransceiver import RTCRtpTransceiver

from mediaserver.aiortc_adapter import nara_receive_track

logger = logging.getLogger(__name__)


class JoinRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Redirected(Exception):
    """The server holds no such consultation and named the one of its cluster that does."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class ConsultationClient:
    def __init__(
        self,
        base_url: str,
        room: str,
        token: str,
        *,
        audio: MediaStreamTrack | None = None,
        video: MediaStreamTrack | None = None,
        publish: bool = True,
        configure_peer: Callable[[RTCPeerConnection], None] | None = None,
        on_new_transceiver: Callable[[RTCRtpTransceiver], None] | None = None,
        ice_servers: list[RTCIceServer] | None = None,
        relay_only: bool = False,
        on_answered: Callable[[RTCPeerConnection], object] | None = None,
        nara_receive: bool = False,
        heartbeat_interval: float | None = None,
        uplink_feedback: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.room = room
        self.token = token
        self.local = {k: t for k, t in (("audio", audio), ("video", video)) if t is not None}
        self.publish = publish
        self.configure_peer = configure_peer
        self.on_new_transceiver = on_new_transceiver
        self.ice_servers = ice_servers  # instead of the server's, e.g. a TURN relay
        self.relay_only = relay_only
        self.on_answered = on_answered
        self.nara_receive = nara_receive  # play remote media through Nära's receive path (FEC, no stalls)
        # Ask the server for transport feedback on what this client sends (docs/protocol.md, "join").
        self.uplink_feedback = uplink_feedback
        # Seconds between pings; None: the interval the server asks for in 'joined'.
        self.heartbeat_interval = heartbeat_interval
        self.last_pong: float | None = None  # event-loop time of the last pong
        self.ended = False  # the signalling connection is gone
        self._nara_tracks: dict[RTCRtpReceiver, MediaStreamTrack] = {}
        self._seen_transceivers: set[int] = set()
        self.pc: RTCPeerConnection | None = None
        self.participant: dict[str, Any] | None = None
        self.participants: dict[str, dict[str, Any]] = {}
        self.owners: dict[str, tuple[str, str]] = {}  # mid -> (participant id, kind)
        self.remote_tracks: dict[str, MediaStreamTrack] = {}  # mid -> track
        self.events: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.answers_sent = 0
        self.changed = asyncio.Condition()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._joined: asyncio.Future[dict[str, Any]] | None = None

    # --- life cycle ----------------------------------------------------------

    async def join(self, timeout: float = 10.0) -> dict[str, Any]:
        """Connect and join; raises JoinRefused with the server's code on refusal.

        A server of a cluster that does not hold the consultation answers ``redirect``
        with the one that does: the join goes there, once (docs/protocol.md).
        """
        self._http = aiohttp.ClientSession()
        try:
            return await self._join_at(timeout)
        except Redirected as first:
            await self._drop_connection()
            self.base_url = first.url
            logger.info("consultation %s is held by %s: joining there", self.room, first.url)
        try:
            return await self._join_at(timeout)
        except Redirected:
            await self._drop_connection()
            raise JoinRefused("redirect_loop", "The server sent the join elsewhere a second time.") from None

    async def _join_at(self, timeout: float) -> dict[str, Any]:
        assert self._http is not None
        self.ended = False
        self._ws = await self._http.ws_connect(f"{self.base_url}/ws", heartbeat=None)
        self._joined = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.ensure_future(self._read()))
        join: dict[str, Any] = {"type": "join", "room": self.room, "token": self.token, "publish": self.publish}
        if self.uplink_feedback:
            join["uplink_feedback"] = True
        await self.send(join)
        return await asyncio.wait_for(asyncio.shield(self._joined), timeout)

    async def _drop_connection(self) -> None:
        """Close the signalling connection a redirect ended, and its reader."""
        if self._ws is not None:
            await self._ws.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self.send({"type": "leave"})
            await self._ws.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.pc is not None:
            await self.pc.close()
        if self._http is not None:
            await self._http.close()

    def abort_connection(self) -> None:
        """Drop the signalling connection without a word, as a dying network would."""
        if self._ws is not None:
            transport = self._ws._response.connection.transport  # type: ignore[union-attr]
            if transport is not None:
                transport.abort()

    async def send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(message))

    async def send_raw(self, raw: str) -> None:
        assert self._ws is not None
        await self._ws.send_str(raw)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; it is checked whenever a message arrives."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    # --- protocol --------------------------------------------------------------

    async def _read(self) -> None:
        assert self._ws is not None and self._joined is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    await self._handle(json.loads(msg.data))
                except (ConnectionError, aiohttp.ClientConnectionResetError):
                    break  # the server went away while we were answering
                except Exception:
                    logger.exception("could not handle a %s message", msg.data[:40])
                    raise
                async with self.changed:
                    self.changed.notify_all()
        finally:
            self.ended = True
            if not self._joined.done():
                self._joined.set_exception(
                    JoinRefused("connection_closed", "The server closed the connection.")
                )
            async with self.changed:
                self.changed.notify_all()

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        assert self._joined is not None
        if kind == "joined":
            self.participant = message["participant"]
            self.participants = {p["id"]: p for p in message["participants"]}
            servers = self.ice_servers
            if servers is None:
                servers = [RTCIceServer(**s) for s in message.get("ice_servers", [])]
            relay = self.relay_only or message.get("ice_transport_policy") == "relay"
            policy = RTCIceTransportPolicy.RELAY if relay else RTCIceTransportPolicy.ALL
            self.pc = RTCPeerConnection(
                RTCConfiguration(iceServers=servers, bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
                                 iceTransportPolicy=policy)
            )
            self.pc.on("track", self._on_track)
            if self.configure_peer is not None:
                self.configure_peer(self.pc)
            self.last_pong = asyncio.get_running_loop().time()
            interval = self.heartbeat_interval or message["heartbeat_interval"]
            self._tasks.append(asyncio.ensure_future(self._heartbeat(interval)))
            self._joined.set_result(message)
        elif kind == "offer":
            await self._answer(message)
        elif kind == "pong":
            self.last_pong = asyncio.get_running_loop().time()
        elif kind == "redirect" and not self._joined.done():
            url = message.get("url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                self._joined.set_exception(JoinRefused("redirect_invalid", "The server's redirect has no valid URL."))
            else:
                self._joined.set_exception(Redirected(url.rstrip("/")))
        elif kind == "error":
            self.errors.append(message)
            if not self._joined.done():
                self._joined.set_exception(JoinRefused(message["code"], message["message"]))
        else:
            self.events.append(message)
            if kind == "participant-joined":
                self.participants[message["participant"]["id"]] = message["participant"]
            elif kind == "participant-left":
                self.participants.pop(message["participant_id"], None)

    async def _answer(self, offer: dict[str, Any]) -> None:
        assert self.pc is not None
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        if self.on_new_transceiver is not None:
            for transceiver in self.pc.getTransceivers():
                if id(transceiver) not in self._seen_transceivers:
                    self._seen_transceivers.add(id(transceiver))
                    self.on_new_transceiver(transceiver)
        publish_mids = offer.get("publish", {})
        for transceiver in self.pc.getTransceivers():
            for kind, mid in publish_mids.items():
                track = self.local.get(kind)
                if transceiver.mid == mid and track is not None and transceiver.sender.track is None:
                    transceiver.sender.replaceTrack(track)
                    transceiver.direction = "sendonly"
        self.owners = {t["mid"]: (t["participant_id"], t["kind"]) for t in offer.get("tracks", [])}
        for transceiver in self.pc.getTransceivers():
            receiver = transceiver.receiver
            if self.nara_receive and receiver.track is not None and receiver not in self._nara_tracks:
                self._nara_tracks[receiver] = nara_receive_track(receiver, transceiver.kind)
            if transceiver.mid is not None and receiver in self._nara_tracks:
                self.remote_tracks[transceiver.mid] = self._nara_tracks[receiver]
            elif transceiver.mid is not None and receiver.track is not None:
                self.remote_tracks.setdefault(transceiver.mid, receiver.track)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        await self.send({"type": "answer", "sdp": self.pc.localDescription.sdp})
        self.answers_sent += 1
        if self.on_answered is not None:
            self.on_answered(self.pc)

    def _on_track(self, track: MediaStreamTrack) -> None:
        assert self.pc is not None
        for transceiver in self.pc.getTransceivers():
            if transceiver.receiver.track is track and transceiver.mid is not None:
                self.remote_tracks[transceiver.mid] = self._nara_tracks.get(transceiver.receiver, track)

    async def _heartbeat(self, interval: float) -> None:
        n = 0
        while True:
            await asyncio.sleep(interval)
            n += 1
            try:
                await self.send({"type": "ping", "id": n})
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                return
