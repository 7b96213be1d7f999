"""An SFU worker process: one ``MediaServer`` on its own event loop, driven over a stream.

``python -m mediaserver.worker FD [LOG_FORMAT LOG_LEVEL]``: ``FD`` is this
process's end of a socketpair whose other end the main process holds
(``pool.py``); ``worker_protocol.py`` describes what goes over it. The worker
knows nothing of tokens, the store or WebSockets: the main process has checked
every participant before it asks for a join. When the stream ends the worker
closes its rooms and exits, so it never outlives the server that started it; and
should the server die at once (SIGKILL, OOM), Linux ends the worker with it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCIceServer

from .errors import CodedError
from .figures import FIGURES_SLICE
from .loop_watch import LoopWatch, from_environment
from .peer import ParticipantInfo, Peer
from .room import MediaServer
from .worker_protocol import (
    EncodedItems,
    Message,
    ProtocolFault,
    consultation_json,
    encode,
    encode_reply,
    error_json,
    read_message,
)

logger = logging.getLogger(__name__)

LOAD_INTERVAL = 2.0  # seconds between two load events
# How long a thread may hold the interpreter before another that waits gets it (Python's default: 5 ms). The
# loop gives it up at every sendto and SRTP call; a ladder's thread (decoding, encoding) often takes it then,
# and the loop waited up to the whole interval for it back at each: measured with one ladder beside a loop
# of SRTP and sendto on one core, the loop sent about a fifth less than the CPU it had left allowed at 5 ms,
# and about what it allowed at 1 ms (docs/benchmarks.md, issue 9).
SWITCH_INTERVAL = 0.001
PR_SET_PDEATHSIG = 1  # prctl(2)
COLLECT_EVERY = 600.0  # seconds between full collections while no one leaves (``Collector``)


class Collector:
    """When the garbage collector walks a media worker's long-lived objects.

    Each full pass of the collector walks every object it tracks, and the loop, with every packet arriving,
    waits until it is done: at 180-200 subscribers, 90-200 ms (docs/benchmarks.md, issue 9). On a busy worker
    a full pass came about every 10-20 s, yet almost everything it walks is a participant's connection,
    which lives as long as the participant does. So once
    participants have joined, what lives is frozen out of the passes (``gc.freeze``), and the passes walk
    only what was made since. Frozen cyclic garbage is never freed, so when a participant leaves (its
    connection is such garbage), and every ``COLLECT_EVERY`` seconds whatever else, all is thawed, collected
    in one pass, and frozen again.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, every: float = COLLECT_EVERY) -> None:
        self.clock = clock
        self.every = every
        self.peers: set[int] = set()
        self.collected_at = clock()
        self.passes = 0  # full collections it made

    def tick(self, peers: set[int]) -> None:
        """Called every few seconds with the ids of the peers the worker holds."""
        left, joined = bool(self.peers - peers), bool(peers - self.peers)
        self.peers = peers
        now = self.clock()
        if left or now - self.collected_at >= self.every:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.collected_at = now
            self.passes += 1
        elif joined:
            gc.freeze()


class Worker:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.media: MediaServer | None = None
        self.sessions: dict[int, tuple[str, Peer]] = {}  # session -> (room, peer)
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop_watch: LoopWatch | None = None  # (a bench instrument: loop_watch.py)
        self.collector = Collector()

    def send(self, message: Message) -> None:
        self.send_frame(encode(message))

    def send_frame(self, frame: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame)  # one frame per write: frames never interleave

    async def serve(self, reader: asyncio.StreamReader) -> None:
        load = asyncio.ensure_future(self._report_load())
        try:
            while (message := await read_message(reader)) is not None:
                task = asyncio.ensure_future(self._answer(message))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except (ProtocolFault, ConnectionError) as exc:
            logger.error("media worker: the stream from the server broke: %s", exc)
        finally:
            load.cancel()
            if self.media is not None:
                await self.media.close()

    async def _report_load(self) -> None:
        while True:
            await asyncio.sleep(LOAD_INTERVAL)  # the report's own period
            if self.media is not None:
                # (its CPU the server reads from /proc; how far behind its loop runs only the worker knows)
                self.send({"event": "load", **self.media.counts(), "loop_lag": round(self.media.loop_lag.lag, 4)})
                self.collector.tick({id(peer) for room in list(self.media.rooms.values())
                                     for peer in list(room.peers.values())})
            if self.loop_watch is not None:
                self.loop_watch.write()

    async def _answer(self, request: Message) -> None:
        reply: Message = {"id": request.get("id")}
        try:
            result = await self._do(request)
            if isinstance(result, EncodedItems):  # (encoded a piece at a time: _figures)
                self.send_frame(encode_reply(request.get("id"), result))
                return
            reply.update(ok=True, result=result)
        except CodedError as exc:
            reply.update(ok=False, error=error_json(exc))
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the worker's other rooms
            logger.exception("media worker: %s failed", request.get("op"))
            reply.update(ok=False, error={"code": "media_worker_fault", "message": f"{type(exc).__name__}: {exc}"})
        self.send(reply)

    def _peer(self, request: Message) -> Peer:
        found = self.sessions.get(int(request["session"]))
        if found is None:
            raise CodedError("media_session_gone", "This participant's media session has ended.")
        return found[1]

    async def _do(self, request: Message) -> Any:
        op = request.get("op")
        if op == "start":
            return self._start(request)
        media = self.media
        if media is None:
            raise CodedError("media_worker_fault", "The media worker was not started.")
        if op == "join":
            return await self._join(media, request)
        if op == "leave":
            found = self.sessions.pop(int(request["session"]), None)
            if found is not None:
                await media.leave(found[0], found[1].info.id, found[1])
            return None
        if op in ("answer", "negotiate"):
            peer = self._peer(request)
            if op == "answer":
                await peer.handle_answer(str(request["sdp"]))
            else:
                await peer.negotiate()
            return {"awaiting_answer": peer.awaiting_answer}
        if op == "mute":
            found = self.sessions.get(int(request["session"]))
            if found is not None:
                await media.mute(found[0], found[1], str(request["kind"]), bool(request["muted"]))
            return None
        if op == "participants":
            return await media.participants(str(request["room"]))
        if op == "stats":
            return await media.stats()
        if op == "figures":
            return await self._figures(media)
        if op == "forwarding_delay":
            return media.forwarding_delay().to_json()
        raise CodedError("media_request_unknown", f"The media worker has no request {op!r}.")

    async def _figures(self, media: MediaServer) -> EncodedItems:
        """Every participant's figures (the IT staff page's sampler asks every 2 s), each consultation encoded
        on its own, with a turn of the loop after every few participants: read and encoded at once, a busy
        worker's figures held every packet arriving behind them for 20 ms or more."""
        items, since_turn = [], 0
        for consultation in await media.figures():
            items.append(json.dumps(consultation_json(consultation), separators=(",", ":")).encode())
            since_turn += len(consultation.participants)
            if since_turn >= FIGURES_SLICE:
                since_turn = 0
                await asyncio.sleep(0)  # (one turn of the loop: not waiting for anything)
        return EncodedItems(items)

    def _start(self, request: Message) -> dict[str, int]:
        port_range = request.get("port_range")
        self.media = MediaServer(
            [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
             for s in request.get("ice_servers", [])],
            request.get("addresses"),
            adaptation=bool(request.get("adaptation", True)),
            port_range=(int(port_range[0]), int(port_range[1])) if port_range else None,
        )
        self.media.on_change.append(lambda: self.send({"event": "changed"}))
        # What start-up made (the modules: aiortc, av, numpy, ...) lives as long as the worker. Frozen, it is
        # left out of the collector's full passes, each of which holds the loop, and every packet, while it walks.
        gc.collect()
        gc.freeze()
        return {"pid": os.getpid()}

    async def _join(self, media: MediaServer, request: Message) -> dict[str, bool]:
        session, room_id = int(request["session"]), str(request["room"])
        info = ParticipantInfo(**request["info"])

        async def signal(message: dict[str, Any]) -> None:
            self.send({"event": "signal", "session": session, "message": message})

        async def failed(peer: Peer, code: str) -> None:
            found = self.sessions.get(session)
            if found is not None and found[1] is peer:
                self.send({"event": "failed", "session": session, "code": code})

        peer = await media.join(room_id, info, signal, failed)
        for other, (other_room, other_peer) in list(self.sessions.items()):
            if other_room == room_id and other_peer.info.id == info.id:
                del self.sessions[other]  # replaced by this session (Room.add closed it)
        self.sessions[session] = (room_id, peer)
        return {"awaiting_answer": peer.awaiting_answer}


async def run(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    worker = Worker(writer)
    from .aiortc_adapter import read_datagrams_in_batches

    read_datagrams_in_batches()  # (before any socket is made: each transport binds its read callback when made)
    worker.loop_watch = from_environment()
    if worker.loop_watch is not None:  # (a bench instrument: how long datagrams waited in their sockets too)
        from .aiortc_adapter import watch_socket_waits

        watch_socket_waits(worker.loop_watch.socket_waits)
    try:
        await worker.serve(reader)
    finally:
        writer.close()
    logger.info("media worker %d: the server's stream ended; exiting", os.getpid())


def die_with_parent() -> None:
    """Have the kernel kill this process when the server that started it dies (Linux; elsewhere the end of
    the stream does it, a moment later)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        logger.info("media worker: prctl is not available; the end of the stream stops this worker")


def main(argv: list[str]) -> int:
    from signalling import logs  # the same log lines as the server's, secrets redacted

    die_with_parent()
    sys.setswitchinterval(SWITCH_INTERVAL)
    log_format, level = (argv[1], argv[2]) if len(argv) >= 3 else ("text", "info")
    logs.configure(log_format, level)
    asyncio.run(run(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
