"""The SFU as worker processes, seen from the main process.

One asyncio loop uses one core, so ``nara serve`` runs the SFU in ``workers``
processes (``worker.py``), each with its own ``MediaServer``, and keeps
signalling, tokens, the store and images here. ``WorkerPool`` offers signalling
the same surface as an in-process ``MediaServer`` (``service.MediaService``);
``RemotePeer`` stands in for a participant's ``Peer``.

Placement: a consultation goes to the least-loaded worker that is up when its
first participant joins, and every later participant of it goes to the same
worker while anyone is in its call: a consultation is never split. When its
last participant leaves, it is forgotten. Load is the worker's own CPU, a share
of the one core its loop can use (read from /proc with each load report), and
how far behind its loop runs (``loop_lag.py``, which it reports). A worker over
``SATURATED_CPU`` of its core, or behind, is *saturated*: past about three
quarters of its core a worker was seen to tip over to all of it
(docs/benchmarks.md, issue 9), so it takes a new consultation only when every
other worker is saturated too (the only worker up still takes every join). The
metrics and /api/workers show which workers are saturated.

A worker that dies is noticed at once (its stream ends): each participant on it
is told ``media_worker_lost`` (``signalling/ws.py`` closes their WebSocket and
their clients join again), its consultations are forgotten so they land on a
worker that is up, and a new worker takes its place. Nothing else is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CodedError
from .figures import ConsultationFigures
from .forwarding_delay import DelaySnapshot
from .loop_lag import BUSY_LAG
from .peer import ParticipantInfo, Signal
from .service import MediaPeer, PeerFailed
from .worker_protocol import Message, ProtocolFault, encode, error_from_json, figures_from_json, read_message

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds a new worker may take to import aiortc and answer
REQUEST_TIMEOUT = 30.0  # seconds a join, an answer or a negotiation may take in a worker
READ_TIMEOUT = 2.0  # seconds a scrape (figures, stats) waits for a worker before leaving it out
STOP_TIMEOUT = 5.0  # seconds a worker has to close its rooms before it is killed
RESTART_DELAY = (0.5, 30.0)  # the first and the longest wait before a worker that keeps dying is started again
STABLE_AFTER = 30.0  # seconds a worker must live for its next death to count as a first one
STUCK_AFTER = 15.0  # seconds without a word from a worker (it reports its load every 2 s) before it is killed
WORKER_LOST = "media_worker_lost"


def worker_lost() -> CodedError:
    return CodedError(WORKER_LOST, "The server's media process for this consultation stopped; join again.")


class MediaUnavailable(CodedError):
    def __init__(self) -> None:
        super().__init__("media_unavailable", "No media process of the server is running; try again shortly.")


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker's ``MediaServer`` is made with (see ``room.MediaServer``)."""

    ice_servers: list[dict[str, Any]] = field(default_factory=list)
    addresses: list[str] | None = None
    adaptation: bool = True
    port_range: tuple[int, int] | None = None
    log_format: str = "text"
    log_level: str = "info"


def port_slices(low: int, high: int, count: int) -> list[tuple[int, int]]:
    """``low``-``high`` cut into ``count`` consecutive slices as equal as they go (the first ones one longer)."""
    size, extra = divmod(high - low + 1, count)
    slices, start = [], low
    for i in range(count):
        end = start + size + (1 if i < extra else 0) - 1
        slices.append((start, end))
        start = end + 1
    return slices


# A worker using this share of its core or more takes new consultations only when no other has room.
SATURATED_CPU = 0.7
CPU_BAND = 0.1  # workers whose CPU differs by less than this are told apart by their participants


@dataclass(frozen=True)
class WorkerLoad:
    index: int
    up: bool
    participants: int
    cpu: float  # share of its core used lately
    loop_lag: float = 0.0  # seconds its loop runs behind, smoothed (as it reported)

    @property
    def saturated(self) -> bool:
        return self.cpu >= SATURATED_CPU or self.loop_lag >= BUSY_LAG


def least_loaded(loads: list[WorkerLoad]) -> int | None:
    """The worker a new consultation goes to; None when none is up.

    One that is not saturated, if any; of those, the least CPU (in bands of CPU_BAND: a reading is two
    seconds old, and between readings the participants placed since tell workers at about the same CPU
    apart), then the fewest participants.
    """
    up = [load for load in loads if load.up]
    if not up:
        return None
    return min(up, key=lambda load: (load.saturated, int(load.cpu / CPU_BAND), load.participants, load.index)).index


def process_usage(pid: int) -> tuple[float, int] | None:
    """CPU seconds (user and system) and resident bytes of a process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open(f"/proc/{pid}/statm") as f:
            resident = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, resident * os.sysconf("SC_PAGE_SIZE")


class WorkerProcess:
    """One running worker: its process, its stream, what is waiting for an answer, who is on it."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.process = process
        self.pid = process.pid
        self.reader = reader
        self.writer = writer
        self.up = False
        self.started_at = time.monotonic()
        self.heard_at = self.started_at  # its last message
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.sessions: dict[int, RemotePeer] = {}
        self.reported: dict[str, int] = {}  # the worker's own last counts (its load event)
        self.cpu_seen: tuple[float, float] | None = None  # (monotonic time, CPU seconds) of the last reading
        self.cpu_rate = 0.0
        self.loop_lag = 0.0  # seconds, as it last reported (loop_lag.py)

    def rooms(self) -> set[str]:
        return {peer.room_id for peer in self.sessions.values()}

    def load(self) -> WorkerLoad:
        return WorkerLoad(self.index, self.up, len(self.sessions), self.cpu_rate, self.loop_lag)

    def read_cpu(self) -> None:
        usage = process_usage(self.pid)
        if usage is None:
            return
        now = time.monotonic()
        if self.cpu_seen is not None and now > self.cpu_seen[0]:
            self.cpu_rate = max(usage[0] - self.cpu_seen[1], 0.0) / (now - self.cpu_seen[0])
        self.cpu_seen = (now, usage[0])


class RemotePeer:
    """A participant's media session in a worker, as its WebSocket sees it (``service.MediaPeer``)."""

    def __init__(self, pool: WorkerPool, worker: WorkerProcess, room_id: str, session: int,
                 info: ParticipantInfo, signal: Signal, on_failed: PeerFailed) -> None:
        self.pool = pool
        self.worker = worker
        self.room_id = room_id
        self.session = session
        self.info = info
        self.signal = signal
        self.on_failed = on_failed
        self._awaiting_answer = False
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    @property
    def awaiting_answer(self) -> bool:
        return self._awaiting_answer

    async def handle_answer(self, sdp: str) -> None:
        result = await self.pool.request(self.worker, "answer", session=self.session, sdp=sdp)
        self._awaiting_answer = bool(result["awaiting_answer"])

    async def negotiate(self) -> None:
        result = await self.pool.request(self.worker, "negotiate", session=self.session)
        self._awaiting_answer = bool(result["awaiting_answer"])

    def deliver(self, message: dict[str, Any]) -> None:
        """Pass a message from the worker on to the participant, in order, without holding up the stream."""
        if message.get("type") == "offer":
            self._awaiting_answer = True
        self._outbox.put_nowait(message)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.ensure_future(self._send_all())

    async def _send_all(self) -> None:
        while not self._outbox.empty():
            message = self._outbox.get_nowait()
            try:
                await self.signal(message)
            except Exception as exc:  # noqa: BLE001 - a closing WebSocket; its participant leaves
                logger.info("could not signal participant %s: %s", self.info.id, exc)


class WorkerPool:
    """The SFU in ``count`` worker processes (``service.MediaService``)."""

    def __init__(self, count: int, settings: WorkerSettings, stuck_after: float = STUCK_AFTER,
                 command: tuple[str, ...] = (sys.executable, "-m", "mediaserver.worker")) -> None:
        if count < 1:
            raise ValueError("a pool needs at least one worker")
        self.count = count
        self.settings = settings
        self.stuck_after = stuck_after  # (tests make it short; a worker reports its load every 2 s)
        self.command = command  # a worker's program; its stream's descriptor and log settings follow
        self.port_ranges: list[tuple[int, int] | None] = [None] * count
        if settings.port_range is not None:
            self.port_ranges = list(port_slices(*settings.port_range, count))
        self.workers: list[WorkerProcess | None] = [None] * count
        self.restarts = [0] * count
        self.deaths_in_a_row = [0] * count
        self.placement: dict[str, WorkerProcess] = {}  # consultation -> the worker its call is on
        self.closing = False
        self._ids = itertools.count(1)
        self._sessions = itertools.count(1)
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._readers: set[asyncio.Task[None]] = set()

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; those that do not come up are tried again in the background."""
        await asyncio.gather(*(self._start_worker(i) for i in range(self.count)))
        self._spawn(self._watch())

    async def _watch(self) -> None:
        """Kill a worker whose loop has stopped answering (a stuck worker serves no media either): its
        participants then move as from any worker that died."""
        while not self.closing:
            await asyncio.sleep(self.stuck_after / 5)  # the watch's own pace
            now = time.monotonic()
            for worker in self._up():
                if now - worker.heard_at > self.stuck_after:
                    logger.error("media worker %d (pid %d) said nothing for %.0f s; killed", worker.index,
                                 worker.pid, now - worker.heard_at)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()

    async def _start_worker(self, index: int) -> None:
        if self.closing:
            return
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, str(child.fileno()),
                self.settings.log_format, self.settings.log_level, pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)  # its log goes to stderr
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker = self.workers[index] = WorkerProcess(index, process, reader, writer)
        reading = asyncio.ensure_future(self._read(worker))
        self._readers.add(reading)
        reading.add_done_callback(self._readers.discard)
        low_high = self.port_ranges[index]
        try:
            await self.request(worker, "start", timeout=START_TIMEOUT, ready=False,
                               ice_servers=self.settings.ice_servers, addresses=self.settings.addresses,
                               adaptation=self.settings.adaptation, port_range=list(low_high) if low_high else None)
        except CodedError as exc:
            logger.error("media worker %d (pid %d) did not start: %s", index, worker.pid, exc)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return
        worker.up = True
        worker.read_cpu()
        logger.info("media worker %d is up (pid %d%s)", index, worker.pid,
                    f", UDP {low_high[0]}-{low_high[1]}" if low_high else "")
        await self._notify()

    async def _read(self, worker: WorkerProcess) -> None:
        try:
            while (message := await read_message(worker.reader)) is not None:
                worker.heard_at = time.monotonic()
                self._dispatch(worker, message)
        except (ProtocolFault, ConnectionError) as exc:
            logger.error("media worker %d (pid %d): its stream broke: %s", worker.index, worker.pid, exc)
        finally:
            await self._lost(worker)

    def _dispatch(self, worker: WorkerProcess, message: Message) -> None:
        if "id" in message:
            future = worker.pending.pop(message["id"], None) if isinstance(message["id"], int) else None
            if future is not None and not future.done():
                if message.get("ok"):
                    future.set_result(message.get("result"))
                else:
                    future.set_exception(error_from_json(message.get("error")))
            return
        event = message.get("event")
        if event == "signal":
            peer = worker.sessions.get(message.get("session", -1))
            if peer is not None and isinstance(message.get("message"), dict):
                peer.deliver(message["message"])
        elif event == "failed":
            peer = worker.sessions.get(message.get("session", -1))
            if peer is not None:
                self._spawn(peer.on_failed(peer, str(message.get("code", "media_failed"))))
        elif event == "changed":
            self._spawn(self._notify())
        elif event == "load":
            worker.reported = {k: int(v) for k, v in message.items() if k in ("rooms", "participants")}
            lag = message.get("loop_lag")
            worker.loop_lag = float(lag) if isinstance(lag, (int, float)) and lag >= 0 else 0.0
            worker.read_cpu()

    async def _lost(self, worker: WorkerProcess) -> None:
        """The worker's stream ended: it exited, was killed, or broke the protocol."""
        was_up, worker.up = worker.up, False
        for future in worker.pending.values():
            if not future.done():
                future.set_exception(worker_lost())
        worker.pending.clear()
        lost = list(worker.sessions.values())
        worker.sessions.clear()
        for room in [room for room, placed in self.placement.items() if placed is worker]:
            del self.placement[room]  # its next join is placed again, on a worker that is up
        if not self.closing:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()  # already gone, or past saving
        code = await worker.process.wait()
        worker.writer.close()
        if self.closing:
            return
        logger.error("media worker %d (pid %d) exited (%s)%s; %d participant(s) in %d consultation(s) move",
                     worker.index, worker.pid, f"exit code {code}" if code >= 0 else f"signal {-code}",
                     "" if was_up else " before it was up", len(lost), len({p.room_id for p in lost}))
        for peer in lost:
            self._spawn(peer.on_failed(peer, WORKER_LOST))
        await self._notify()
        if self.workers[worker.index] is worker:
            self._spawn(self._restart(worker.index, time.monotonic() - worker.started_at))

    async def _restart(self, index: int, lived: float) -> None:
        """Start a worker in place of one that died after ``lived`` seconds, after a back-off that grows while
        its workers keep dying young (a worker that cannot start is not started in a loop)."""
        self.deaths_in_a_row[index] = 1 if lived > STABLE_AFTER else self.deaths_in_a_row[index] + 1
        first, longest = RESTART_DELAY
        await asyncio.sleep(min(first * 2 ** (self.deaths_in_a_row[index] - 1), longest))  # the back-off
        if self.closing:
            return
        self.restarts[index] += 1
        try:
            await self._start_worker(index)
        except OSError as exc:  # no process could be made (out of memory, process limit): later
            logger.error("media worker %d could not be started: %s", index, exc)
            self._spawn(self._restart(index, 0.0))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop every worker: its stream is ended, it closes its rooms and exits (killed if it does not)."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()  # restarts waiting, messages on their way to participants who are leaving anyway
        workers = [w for w in self.workers if w is not None]
        for worker in workers:
            worker.up = False
            if not worker.writer.is_closing():
                with contextlib.suppress(OSError):
                    worker.writer.write_eof()  # the worker reads the end of its stream and stops

        async def stopped(worker: WorkerProcess) -> None:
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("media worker %d (pid %d) did not stop in time; killed", worker.index, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()

        await asyncio.gather(*(stopped(w) for w in workers))
        await asyncio.gather(*self._readers, return_exceptions=True)
        self.placement.clear()
        await self._notify()

    # --- requests ---------------------------------------------------------------------

    async def request(self, worker: WorkerProcess, op: str, timeout: float = REQUEST_TIMEOUT, ready: bool = True,
                      **arguments: Any) -> Any:
        """Ask a worker and wait for its reply; its refusal is raised with the worker's code."""
        if (ready and not worker.up) or worker.writer.is_closing():
            raise worker_lost()
        number = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.pending[number] = future
        try:
            worker.writer.write(encode({"id": number, "op": op, **arguments}))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise CodedError("media_worker_timeout",
                             f"The media process did not answer ({op}) within {timeout:g} s.") from None
        finally:
            worker.pending.pop(number, None)

    def _up(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w is not None and w.up]

    def _choose(self) -> WorkerProcess:
        loads = [w.load() for w in self.workers if w is not None]
        index = least_loaded(loads)
        worker = self.workers[index] if index is not None else None
        if worker is None:
            raise MediaUnavailable()
        return worker

    # --- what signalling asks (service.MediaService) -----------------------------------

    async def join(self, room_id: str, info: ParticipantInfo, signal: Signal, on_failed: PeerFailed) -> MediaPeer:
        worker = self.placement.get(room_id)
        if worker is None or not worker.up:
            worker = self.placement[room_id] = self._choose()  # decided before any wait: never split
            logger.info("consultation %s placed on media worker %d", room_id, worker.index)
        peer = RemotePeer(self, worker, room_id, next(self._sessions), info, signal, on_failed)
        worker.sessions[peer.session] = peer  # before the request: what it signals finds its way
        try:
            result = await self.request(worker, "join", room=room_id, session=peer.session, info=asdict(info))
        except BaseException:
            if worker.sessions.pop(peer.session, None) is not None:
                self._forget_if_empty(room_id, worker)
            raise
        peer._awaiting_answer = bool(result["awaiting_answer"])
        for session, other in list(worker.sessions.items()):
            if other is not peer and other.room_id == room_id and other.info.id == info.id:
                del worker.sessions[session]  # replaced by this session (the worker closed it)
        await self._notify()
        return peer

    async def leave(self, room_id: str, participant_id: str, peer: MediaPeer | None = None) -> None:
        found = [p for w in self._up() for p in w.sessions.values()
                 if p.room_id == room_id and p.info.id == participant_id and (peer is None or p is peer)]
        for remote in found:
            worker = remote.worker
            del worker.sessions[remote.session]
            self._forget_if_empty(room_id, worker)
            with contextlib.suppress(CodedError):
                await self.request(worker, "leave", session=remote.session)
        await self._notify()

    def _forget_if_empty(self, room_id: str, worker: WorkerProcess) -> None:
        if self.placement.get(room_id) is worker and room_id not in worker.rooms():
            del self.placement[room_id]

    async def mute(self, room_id: str, peer: MediaPeer, kind: str, muted: bool) -> None:
        if isinstance(peer, RemotePeer) and peer.worker.sessions.get(peer.session) is peer:
            await self.request(peer.worker, "mute", session=peer.session, kind=kind, muted=muted)

    async def participants(self, room_id: str) -> list[dict[str, Any]]:
        worker = self.placement.get(room_id)
        if worker is None:
            return []
        result: list[dict[str, Any]] = await self.request(worker, "participants", timeout=READ_TIMEOUT * 2,
                                                          room=room_id)
        return result

    def is_live(self, room_id: str) -> bool:
        return room_id in self.placement

    def counts(self) -> dict[str, int]:
        return {"rooms": len(self.placement), "participants": sum(len(w.sessions) for w in self._up())}

    async def _ask_all(self, op: str) -> list[Any]:
        """Every worker's answer to ``op``; a worker that does not answer in READ_TIMEOUT is left out."""
        return list((await self._ask_each(op)).values())

    async def _ask_each(self, op: str) -> dict[int, Any]:
        """``_ask_all``, by worker index."""
        workers = self._up()
        answers = await asyncio.gather(*(self.request(w, op, timeout=READ_TIMEOUT) for w in workers),
                                       return_exceptions=True)
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, BaseException):
                logger.warning("media worker %d (pid %d) did not answer %s: %r", worker.index, worker.pid, op,
                               answer)
        return {w.index: a for w, a in zip(workers, answers, strict=True) if not isinstance(a, BaseException)}

    async def stats(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for answer in await self._ask_all("stats"):
            merged.update(answer)
        return merged

    async def figures(self) -> list[ConsultationFigures]:
        return [c for answer in await self._ask_all("figures") for c in figures_from_json(answer)]

    async def forwarding_delays(self) -> dict[str, DelaySnapshot]:
        delays = {}
        for index, answer in (await self._ask_each("forwarding_delay")).items():
            try:
                delays[str(index)] = DelaySnapshot.from_json(answer)
            except (ValueError, AttributeError) as exc:
                logger.warning("media worker %d sent no forwarding delay histogram: %s", index, exc)
        return delays

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    # --- for IT staff: /api/workers and /metrics ----------------------------------------

    def ready(self) -> str | None:
        """None when at least one worker is up, else the reason (for /health/ready)."""
        return None if self._up() else f"media: none of {self.count} worker(s) is up"

    @staticmethod
    def _participants_by_room(worker: WorkerProcess) -> dict[str, int]:
        counted: dict[str, int] = {}
        for peer in worker.sessions.values():
            counted[peer.room_id] = counted.get(peer.room_id, 0) + 1
        return dict(sorted(counted.items()))

    def describe(self) -> list[dict[str, Any]]:
        """Each worker: its pid, whether it is up, its consultations (with their participants), its participants,
        CPU seconds, its share of its core lately, how far behind its loop runs, whether it is saturated (see
        the module's doc), resident memory, restarts and UDP port slice."""
        described = []
        for index in range(self.count):
            worker = self.workers[index]
            usage = process_usage(worker.pid) if worker is not None and worker.up else None
            described.append({
                "index": index,
                "pid": worker.pid if worker is not None else None,
                "up": worker is not None and worker.up,
                "consultations": self._participants_by_room(worker) if worker is not None else {},
                "participants": len(worker.sessions) if worker is not None else 0,
                "cpu_seconds": usage[0] if usage else None,
                "cpu_share": round(worker.cpu_rate, 3) if worker is not None and worker.up else None,
                "loop_lag_ms": round(worker.loop_lag * 1000, 1) if worker is not None and worker.up else None,
                "saturated": worker is not None and worker.up and worker.load().saturated,
                "memory_bytes": usage[1] if usage else None,
                "restarts": self.restarts[index],
                "port_range": list(r) if (r := self.port_ranges[index]) else None,
            })
        return described
