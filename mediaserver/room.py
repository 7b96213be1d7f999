"""A consultation's media: who is in it, what they publish, who receives what."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiortc import RTCIceServer

from .aiortc_adapter import restrict_host_addresses, restrict_port_range
from .forwarder import Publication, Subscription
from .forwarding_delay import DelaySnapshot, DelayTotal
from .ladder import StartPacer
from .loop_lag import NEVER_BUSY, LoopLag
from .peer import ParticipantInfo, Peer, Signal

if TYPE_CHECKING:
    from .figures import ConsultationFigures
    from .service import MediaPeer

logger = logging.getLogger(__name__)

FailureHandler = Callable[[Peer, str], Awaitable[None]]
IN_PROCESS = "main"  # the worker label of consultations run in the main process (no media workers)


class Room:
    def __init__(self, room_id: str, ice_servers: list[RTCIceServer], adaptation: bool = True,
                 on_change: Callable[[], None] = lambda: None, delays: DelayTotal | None = None) -> None:
        self.id = room_id
        self.on_change = on_change  # media state changed (levels, layers): wakes MediaServer.wait_until
        self.delays = delays or DelayTotal()  # the process's forwarding delay: a publication's joins it as it ends
        self.ice_servers = ice_servers
        self.adaptation = adaptation  # the quality ladder and per-subscriber levels
        self.ladder_starts = StartPacer()  # the media server's, shared by all its rooms (MediaServer.room)
        self.loop_lag = NEVER_BUSY  # the media server's (MediaServer.room)
        self.peers: dict[str, Peer] = {}
        self.started_at = time.time()  # wall clock: when its first participant joined

    def publications_for(self, participant_id: str) -> list[Publication]:
        """Every live publication a participant should receive (all but its own)."""
        return [
            publication
            for peer in self.peers.values()
            if peer.info.id != participant_id and not peer.closed
            for publication in peer.publications.values()
            if not publication.closed
        ]

    def participants(self) -> list[dict[str, Any]]:
        return [
            {
                **peer.info.public(),
                "tracks": [
                    {"kind": p.kind, "muted": p.muted} for p in peer.publications.values()
                ],
                "muted": dict(peer.muted),
                # Whose video this participant's link cannot take right now.
                "video_paused_from": [
                    slot.subscription.publication.participant_id for slot in peer.slots
                    if slot.subscription is not None and slot.subscription.announced_pause
                ],
            }
            for peer in self.peers.values()
        ]

    async def add(self, info: ParticipantInfo, signal: Signal, on_failed: FailureHandler) -> Peer:
        """Add a participant; a second session of the same participant replaces the first."""
        if info.id in self.peers:
            await self.remove(info.id)
        peer = Peer(self, info, signal, self.ice_servers, on_failed)
        if info.can_publish:
            peer.open_publishing()
        self.peers[info.id] = peer
        await self.broadcast({"type": "participant-joined", "participant": info.public()}, exclude=info.id)
        return peer

    async def remove(self, participant_id: str) -> None:
        peer = self.peers.pop(participant_id, None)
        if peer is None:
            return
        publications = list(peer.publications.values())
        await peer.close()
        for publication in publications:
            await self.broadcast(
                {"type": "track-unpublished", "participant_id": participant_id, "kind": publication.kind}
            )
        await self.broadcast({"type": "participant-left", "participant_id": participant_id})
        await self._renegotiate_all()

    async def publish(self, publication: Publication) -> None:
        publication.on_video_state = self._video_state
        publication.on_change = self.on_change
        publication.on_close = lambda ended: self.delays.retire(ended.delays)
        self.on_change()
        await self.broadcast(
            {
                "type": "track-published",
                "participant_id": publication.participant_id,
                "kind": publication.kind,
                "muted": publication.muted,
            },
            exclude=publication.participant_id,
        )
        await self._renegotiate_all(exclude=publication.participant_id)

    async def _video_state(self, subscription: Subscription, paused: bool) -> None:
        """Tell everyone when a subscriber's link can no longer take a video, and when it can again."""
        logger.info("video %s to %s %s", subscription.publication.id, subscription.subscriber_id,
                    "paused: weak connection" if paused else "resumed")
        await self.broadcast({
            "type": "video-paused" if paused else "video-resumed",
            "participant_id": subscription.publication.participant_id,
            "subscriber_id": subscription.subscriber_id,
            "reason": "weak_connection",
        })

    async def set_muted(self, peer: Peer, kind: str, muted: bool) -> None:
        peer.set_muted(kind, muted)
        await self.broadcast(
            {"type": "mute", "participant_id": peer.info.id, "kind": kind, "muted": muted},
            exclude=peer.info.id,
        )

    async def notify_error(self, peer: Peer, code: str, message: str) -> None:
        await self._send(peer, {"type": "error", "code": code, "message": message})

    async def broadcast(self, message: dict[str, Any], exclude: str | None = None) -> None:
        await asyncio.gather(
            *(self._send(p, message) for p in list(self.peers.values()) if p.info.id != exclude)
        )

    async def _send(self, peer: Peer, message: dict[str, Any]) -> None:
        try:
            await peer.signal(message)
        except Exception as exc:  # one broken connection must not stop the others
            logger.info("could not signal participant %s: %s", peer.info.id, exc)

    async def _renegotiate_all(self, exclude: str | None = None) -> None:
        peers = [p for p in list(self.peers.values()) if p.info.id != exclude]
        results = await asyncio.gather(*(p.negotiate() for p in peers), return_exceptions=True)
        for peer, result in zip(peers, results, strict=False):
            if isinstance(result, BaseException):
                logger.warning("renegotiation with %s failed: %r", peer.info.id, result)

    async def close(self) -> None:
        for participant_id in list(self.peers):
            await self.remove(participant_id)


class MediaServer:
    """All rooms of this process."""

    def __init__(
        self,
        ice_servers: Iterable[RTCIceServer] = (),
        host_addresses: Iterable[str] | None = None,
        adaptation: bool = True,
        port_range: tuple[int, int] | None = None,
    ) -> None:
        restrict_host_addresses(host_addresses)
        restrict_port_range(*(port_range or (None, None)))
        self.ice_servers = list(ice_servers)
        self.adaptation = adaptation
        self.rooms: dict[str, Room] = {}
        self.delays = DelayTotal()  # how long forwarded copies were held, every publication since the start
        self.ladder_starts = StartPacer()  # how many ladders this process (one worker) starts a second
        self.loop_lag = LoopLag()  # how far behind this process's loop runs (watched from the first join)
        self._changed = asyncio.Condition()
        self.on_change: list[Callable[[], None]] = []  # told whenever wait_until's predicates are checked

    async def _notify(self) -> None:
        for listener in self.on_change:
            listener()
        async with self._changed:
            self._changed.notify_all()

    def _changed_soon(self) -> None:
        asyncio.ensure_future(self._notify())

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; checked whenever someone joins or leaves, a track is
        published, a subscriber changes level or a layer starts or stops."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    def room(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = Room(room_id, self.ice_servers, self.adaptation, self._changed_soon,
                                              self.delays)
            room.ladder_starts = self.ladder_starts
            room.loop_lag = self.loop_lag
        return room

    async def join(
        self, room_id: str, info: ParticipantInfo, signal: Signal, on_failed: FailureHandler
    ) -> Peer:
        self.loop_lag.start()
        peer = await self.room(room_id).add(info, signal, on_failed)
        await self._notify()
        return peer

    async def leave(self, room_id: str, participant_id: str, peer: MediaPeer | None = None) -> None:
        """Remove a participant (only if ``peer`` is still its current session)."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        current = room.peers.get(participant_id)
        if current is None or (peer is not None and current is not peer):
            if isinstance(peer, Peer):
                await peer.close()
            return
        await room.remove(participant_id)
        if not room.peers and self.rooms.get(room_id) is room:
            del self.rooms[room_id]
        await self._notify()

    def _room_stats(self, room: Room) -> dict[str, Any]:
        """Per participant: what came in, and what went out to each subscriber."""
        return {
            peer.info.id: {
                "published": {k: {**vars(p.stats), "rate_cap": p.rate_cap, "bitrate": int(p.meter.rate),
                                  "layers": sorted(p.ladder.specs[lv].name for lv in p.ladder.layers)
                                  if p.ladder is not None else [],
                                  "ladder_cpu": {"decode_s": round(p.ladder.decode_seconds, 4),
                                                 "encode_s": round(p.ladder.encode_seconds, 4),
                                                 "decoded_frames": p.ladder.decoded_frames,
                                                 "encoded_frames": p.ladder.encoded_frames,
                                                 "layers": p.ladder.work_by_layer()}
                                  if p.ladder is not None else None,
                                  "forwarding_delay": p.delays.snapshot().to_json()}
                              for k, p in peer.publications.items()},
                "bandwidth_estimate": int(peer.bandwidth.estimate),
                "transport_feedback": {"packets": peer.transport_feedbacks, "delay": peer.delay.state,
                                       "overuse_cuts": peer.bandwidth.overuse_cuts},
                "received": [
                    {"from": slot.publication.id, **vars(slot.subscription.stats),
                     "level": slot.publication.level_name(slot.subscription.level),
                     "bitrate": int(slot.subscription.meter.rate), "switches": slot.subscription.switches}
                    for slot in peer.slots
                    if slot.publication is not None and slot.subscription is not None
                ],
            }
            for peer in list(room.peers.values())
        }

    # --- what signalling asks (service.MediaService) ----------------------------

    def is_live(self, room_id: str) -> bool:
        room = self.rooms.get(room_id)
        return room is not None and bool(room.peers)

    async def participants(self, room_id: str) -> list[dict[str, Any]]:
        room = self.rooms.get(room_id)
        return room.participants() if room is not None else []

    async def mute(self, room_id: str, peer: MediaPeer, kind: str, muted: bool) -> None:
        room = self.rooms.get(room_id)
        if room is not None and isinstance(peer, Peer) and room.peers.get(peer.info.id) is peer:
            await room.set_muted(peer, kind, muted)

    async def stats(self) -> dict[str, Any]:
        """Per consultation and participant: what came in, and what went out to each subscriber. Read a
        consultation at a time with a turn of the loop between (as ``figures``: read at once, a busy worker's
        stats held every packet arriving behind them)."""
        rooms: dict[str, Any] = {}
        for room_id, room in list(self.rooms.items()):
            rooms[room_id] = self._room_stats(room)
            await asyncio.sleep(0)  # (one turn of the loop: not waiting for anything)
        return rooms

    async def figures(self) -> list[ConsultationFigures]:
        from .figures import live_figures  # figures.py reads rooms and peers: it imports this module

        return await live_figures(self)

    def forwarding_delay(self) -> DelaySnapshot:
        """How long this process held the copies it forwarded, since it started (``forwarding_delay.py``)."""
        return self.delays.read(p.delays for room in list(self.rooms.values()) for peer in list(room.peers.values())
                                for p in list(peer.publications.values()) if not p.closed)

    async def forwarding_delays(self) -> dict[str, DelaySnapshot]:
        return {IN_PROCESS: self.forwarding_delay()}

    def counts(self) -> dict[str, int]:
        return {
            "rooms": len(self.rooms),
            "participants": sum(len(r.peers) for r in self.rooms.values()),
        }

    async def close(self) -> None:
        await self.loop_lag.stop()
        for room in list(self.rooms.values()):
            await room.close()
        self.rooms.clear()
        await self._notify()
