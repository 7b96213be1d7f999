"""``nara bench forward``: what forwarding video to N subscribers costs the server.

Two servers are measured in the same run, each in processes of its own:

* ``forward``: Nära's server (``nara serve``, optionally with ``--workers``),
  every feature of the forwarding path on: NACK cache, keyframe relay, the
  bandwidth estimate with adaptation (the default) and statistics;
* ``naive``: the re-encoding relay of ``bench/naive_relay.py`` (aiortc
  ``MediaRelay`` feeding one VP8 encoder per subscriber), the baseline.

Publishers replay a clip of 640x480 VP8 at 30 fps and a fixed bitrate,
encoded once before the run, so a consultation's publisher costs little
and many consultations can run. Two shapes: one consultation with every
subscriber in it (``--room-size 0``), or consultations of one publisher and
``--room-size`` subscribers each, the shape of real consultations.

Subscribers are added step by step up to each N. A subscriber completes ICE
and DTLS with aiortc, then counts RTP packets from their clear header at the
socket (no SRTP, parsing or decoding) while sending what real receivers send:
receiver reports built from what arrived, and a REMB every second (claiming
``REMB_CLAIM``; loopback carries it). The server moves every subscriber to the
original before a step is measured, as a real link with room to spare would.

At every step the server's processes' CPU (the main process and its media
workers) is read from /proc over a measurement window; every subscriber
reports frames per second, loss and one-way delay (relative to its minimum,
so it includes the generators' own lag); the server reports how long it held
each forwarded packet (from the datagram's arrival to its copy's sendto).
Load generators run in processes of their own and report their CPU apart. The
marginal CPU per subscriber is the slope of a least-squares line through
(N, server CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import av
from aiortc.mediastreams import MediaStreamTrack

from mediaserver import loop_watch
from mediaserver.forwarding_delay import DelaySnapshot

from .process import NaraServer, cpu_seconds, free_port, start_python, stop
from .seconds import SecondSampler

FPS = 30
CLIP_SECONDS = 4  # the replayed clip: two keyframe intervals
KEYFRAME_INTERVAL = 2.0
WARMUP = 2.0
SETTLE_LIMIT = 30.0  # seconds a batch of new subscribers may take to be on the original
REMB_CLAIM = 5_000_000  # bit/s each subscriber's REMB claims
REMB_INTERVAL = 1.0
DEGRADED_DELIVERY = 0.95
DEGRADED_LOSS = 0.01
DEGRADED_DELAY_MS = 100.0
# The worker's counters read at each end of a window: packets in from publishers, NACKs it sent them
# (Nära's own; aiortc's receiver asks too), probes' duplicates, resends to subscribers, level moves.
COUNTERS = ("packets_in", "asks_upstream", "padding", "resends", "resends_shed", "switches", "nacked")


# --- the clip ----------------------------------------------------------------------


def encode_clip(bitrate: int, seconds: float = CLIP_SECONDS) -> list[tuple[bytes, bool]]:
    """(VP8 frame, keyframe) for ``seconds`` of the detailed synthetic scene at ``bitrate``, starting on a
    keyframe; replayed in a loop it stays decodable (every loop starts on a keyframe)."""
    import numpy as np

    from bench.synthetic import source_luma
    from mediaserver.video_encoders import Vp8Encoder

    width, height = 640, 480
    encoder = Vp8Encoder(width, height, FPS, bitrate, keyframe_interval=KEYFRAME_INTERVAL)
    chroma = np.full((height // 2, width), 128, dtype=np.uint8)
    frames: list[tuple[bytes, bool]] = []
    try:
        for number in range(int(seconds * FPS)):
            luma = source_luma(width, height, number, "detailed")
            frame = av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")
            if number == 0:
                encoder.request_keyframe()
            encoded = encoder.encode(frame, number * 90000 // FPS)
            if encoded is not None:
                frames.append((encoded.data, encoded.keyframe))
    finally:
        encoder.close()
    return frames


class ReplayVideoTrack(MediaStreamTrack):
    """Hands aiortc the clip's encoded frames at ``FPS``, in a loop (aiortc only packetises them).

    Each track keeps its own frame clock. Independent publishers (the default, as real cameras are)
    each start at a random phase within the frame interval and a random keyframe of the clip, so their
    frames, and their keyframes' bursts, fall at unrelated times. ``align(True)`` is the worst case: every
    aligned track, in every generator process, sends the same frame of the clip on the same instants of
    the shared monotonic clock, so the server gets every publisher's frame (and keyframe) at once.
    """

    kind = "video"

    def __init__(self, frames: list[tuple[bytes, bool]], rng: random.Random | None = None) -> None:
        super().__init__()
        self.frames = frames
        self.frames_sent = 0
        self.rng = rng or random.Random()
        keyframes = [i for i, (_, keyframe) in enumerate(frames) if keyframe] or [0]
        self._clip_at = self.rng.choice(keyframes)  # the clip's frame sent next
        self._phase = self.rng.random() / FPS
        self._due: float | None = None  # when the next frame is due (time.monotonic)

    @property
    def next_due(self) -> float | None:
        """When (``time.monotonic``) the next frame goes; None before the first."""
        return self._due

    @property
    def next_frame(self) -> int:
        """The clip's frame that goes next."""
        return self._clip_at % len(self.frames)

    def align(self, aligned: bool, tick: int | None = None) -> None:
        """From frame boundary ``tick`` of the shared monotonic clock on (default: the next one):
        aligned with every other aligned track, or at a random phase and place in the clip of its own
        (a jump in the clip breaks the picture until its next keyframe, within ``KEYFRAME_INTERVAL``:
        the benchmark's subscribers count packets and decode nothing)."""
        if tick is None:
            tick = math.floor(time.monotonic() * FPS) + 1
        if aligned:
            self._due, self._clip_at = tick / FPS, tick % len(self.frames)
        else:
            self._due, self._clip_at = tick / FPS + self.rng.random() / FPS, self.rng.randrange(len(self.frames))

    async def recv(self) -> av.Packet[Any]:
        if self._due is None:
            self._due = time.monotonic() + self._phase
        delay = self._due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # (pacing the frames, not waiting for anything)
        data, keyframe = self.frames[self._clip_at % len(self.frames)]
        packet = av.Packet(data)
        packet.pts = self.frames_sent * 90000 // FPS
        packet.time_base = fractions.Fraction(1, 90000)
        packet.is_keyframe = keyframe
        self.frames_sent += 1
        self._clip_at += 1
        self._due += 1 / FPS  # (a late frame goes at once, and the clock keeps its phase)
        return packet


# --- load generator processes ---------------------------------------------------


class Subscriber:
    """One subscriber's peer connection, what it counted, and what its REMB names."""

    def __init__(self, peer: Any, meter: Any, remb: bool) -> None:
        self.peer = peer
        self.meter = meter
        self.remb = remb
        self.video_receivers: list[Any] = []
        self.ssrc: int | None = None

    def on_header(self, ssrc: int, seq: int, ts: int, marker: bool, size: int) -> None:
        self.ssrc = ssrc
        self.meter.count(seq, ts, marker, size, time.monotonic())


def _count_at_socket(subscriber: Subscriber, pc: Any) -> None:
    from mediaserver.aiortc_adapter import count_rtp_headers

    count_rtp_headers(pc, subscriber.on_header)


async def _forward_subscriber(url: str, room: str, token: str) -> Subscriber:
    from bench.meter import StreamMeter
    from mediaserver.aiortc_adapter import InboundTap
    from signalling.client import ConsultationClient

    subscriber = Subscriber(None, StreamMeter(), remb=True)

    def tap(transceiver: Any) -> None:
        # Until counting at the socket takes over: nothing decoded, nothing buffered.
        async def on_packet(packet: Any) -> None:
            if transceiver.kind == "video":
                subscriber.on_header(packet.ssrc, packet.sequence_number, packet.timestamp, bool(packet.marker),
                                     len(packet.payload))

        InboundTap(transceiver.receiver, on_packet)
        if transceiver.kind == "video":
            subscriber.video_receivers.append(transceiver.receiver)

    client = ConsultationClient(url, room, token, publish=False, on_new_transceiver=tap)
    await client.join()
    subscriber.peer = client
    return subscriber


async def _naive_subscriber(url: str) -> Subscriber:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from bench.meter import StreamMeter
    from mediaserver.aiortc_adapter import InboundTap

    pc = RTCPeerConnection()
    subscriber = Subscriber(pc, StreamMeter(), remb=False)  # (the relay's encoders ignore REMB: held at a rate)
    transceiver = pc.addTransceiver("video", direction="recvonly")

    async def on_packet(packet: Any) -> None:
        subscriber.on_header(packet.ssrc, packet.sequence_number, packet.timestamp, bool(packet.marker),
                             len(packet.payload))

    InboundTap(transceiver.receiver, on_packet)
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/subscribe", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    def _() -> None:
        if pc.connectionState == "connected":
            connected.set()

    if pc.connectionState != "connected":
        await asyncio.wait_for(connected.wait(), 30)
    return subscriber


async def _publisher(mode: str, url: str, room: str, token: str, frames: list[tuple[bytes, bool]]) -> tuple[Any, Any]:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from signalling.client import ConsultationClient

    video = ReplayVideoTrack(frames)
    if mode == "forward":
        client = ConsultationClient(url, room, token, video=video)
        await client.join()
        # Connected, its track long published: the consultation's subscribers join after, so none is offered
        # the publication's renegotiation while its own join is still under way.
        deadline = time.monotonic() + 30
        while (client.pc is None or client.pc.connectionState != "connected") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # (polling the connection, bounded)
        return client, video
    pc = RTCPeerConnection()
    pc.addTrack(video)
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/publish", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    return pc, video


async def _send_rembs(subscribers: list[Subscriber]) -> None:
    """Every subscriber's REMB, once a second, as a browser sends its receive estimate."""
    from mediaserver.aiortc_adapter import send_bitrate_cap

    while True:
        await asyncio.sleep(REMB_INTERVAL)  # (the REMB's own period)
        for subscriber in list(subscribers):
            if subscriber.remb and subscriber.ssrc is not None:
                for receiver in subscriber.video_receivers:
                    try:
                        await send_bitrate_cap(receiver, REMB_CLAIM, [subscriber.ssrc])
                    except ConnectionError:
                        pass


async def _generator(conn: Connection, mode: str, url: str, frames: list[tuple[bytes, bool]]) -> None:
    from mediaserver.aiortc_adapter import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])
    loop = asyncio.get_running_loop()
    subscribers: list[Subscriber] = []
    peers: list[Any] = []
    videos: list[Any] = []
    rembs = asyncio.ensure_future(_send_rembs(subscribers))
    window_start = time.monotonic()
    cpu_start = time.process_time()
    frames_start = 0
    while True:
        command: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
        kind = command["cmd"]
        if kind == "publish":
            peer, video = await _publisher(mode, url, command["room"], command["token"], frames)
            peers.append(peer)
            videos.append(video)
            conn.send({"ok": True})
        elif kind == "add":
            new: list[Subscriber] = []
            for room, tokens in command["groups"]:
                for token in tokens:
                    if mode == "forward":
                        new.append(await _forward_subscriber(url, room, token))
                    else:
                        new.append(await _naive_subscriber(url))
            deadline = time.monotonic() + 30
            while any(s.meter.packets == 0 for s in new) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # (polling the counters, bounded)
            for subscriber in new:  # (connected and receiving: counting at the socket takes over)
                pc = subscriber.peer.pc if mode == "forward" else subscriber.peer
                if subscriber.meter.packets:
                    _count_at_socket(subscriber, pc)
            subscribers.extend(new)
            conn.send({"ok": all(s.meter.packets for s in new)})
        elif kind == "phase":
            for video in videos:
                video.align(command["aligned"], command["tick"])
            conn.send({"ok": True})
        elif kind == "reset":
            for subscriber in subscribers:
                subscriber.meter.reset()
            window_start, cpu_start = time.monotonic(), time.process_time()
            frames_start = sum(v.frames_sent for v in videos)
            conn.send({"ok": True})
        elif kind == "stats":
            seconds = time.monotonic() - window_start
            conn.send({
                "subscribers": [s.meter.summary(seconds) for s in subscribers],
                "cpu": (time.process_time() - cpu_start) / seconds,
                "frames_sent": sum(v.frames_sent for v in videos) - frames_start,
                "publishers": len(videos),
                "seconds": seconds,
            })
        elif kind == "stop":
            rembs.cancel()
            for subscriber in subscribers:
                await subscriber.peer.close()
            for peer in peers:
                await peer.close()
            conn.send({"ok": True})
            return


def _generator_main(conn: Connection, mode: str, url: str, frames: list[tuple[bytes, bool]]) -> None:
    asyncio.run(_generator(conn, mode, url, frames))


# --- the server's processes ---------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a server's media workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # (a worker gone: its CPU is lost with it)
    return total


def pin_threads(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` onto ``cores`` (a thread it starts later inherits its creator's)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:
            pass  # (a thread that ended meanwhile)


class CorePlan:
    """``--pin``: media worker i alone on core i; this process, its load generators and publishers, and the
    server's main process share the other cores (a worker started again later is not pinned)."""

    def __init__(self, workers: int) -> None:
        self.saved = os.sched_getaffinity(0)
        cores = sorted(self.saved)
        if len(cores) <= workers:
            raise SystemExit(f"--pin needs more cores than workers: {len(cores)} core(s), {workers} worker(s)")
        self.worker_cores = [{c} for c in cores[:workers]]
        self.rest = set(cores[workers:])
        os.sched_setaffinity(0, self.rest)  # everything started from here on inherits it

    def pin_workers(self, worker_pids: list[int]) -> None:
        if len(worker_pids) != len(self.worker_cores):
            raise RuntimeError(f"expected {len(self.worker_cores)} media workers, found {len(worker_pids)}")
        for pid, cores in zip(sorted(worker_pids), self.worker_cores, strict=True):
            pin_threads(pid, cores)

    def restore(self) -> None:
        os.sched_setaffinity(0, self.saved)


class ServerUnderTest:
    """The forwarding SFU (`nara serve`) or the naive relay, in processes of their own."""

    def __init__(self, mode: str, bitrate: int, workdir: Path, workers: int | None, uvloop: bool,
                 watch_loops: bool = False) -> None:
        self.mode = mode
        self.nara: NaraServer | None = None
        self.env_backup = os.environ.get("PYTHONPATH")
        if uvloop:
            _use_uvloop(workdir)
        self.loop_watch: Path | None = None
        try:
            if mode == "forward":
                if watch_loops:  # (the media workers read it from their environment: loop_watch.py)
                    self.loop_watch = workdir / "loop-watch"
                    self.loop_watch.mkdir(exist_ok=True)
                    os.environ[loop_watch.ENV] = str(self.loop_watch)
                options = ("--workers", str(workers)) if workers is not None else ()
                self.nara = NaraServer(workdir / f"forward-data-{time.monotonic_ns()}", options)
                self.url, self.process = self.nara.url, self.nara.process
            else:
                port = free_port()
                self.url = f"http://127.0.0.1:{port}"
                self.process = start_python("bench.naive_relay", "--port", str(port), "--bitrate", str(bitrate),
                                            ready="ready")
        finally:
            if uvloop:
                _restore_env(self.env_backup)
            os.environ.pop(loop_watch.ENV, None)

    async def consultation(self, title: str) -> str:
        return await self.nara.consultation(title) if self.nara is not None else ""

    async def tokens(self, room: str, role: str, count: int) -> list[str]:
        if self.nara is None:
            return [""] * count
        return [await self.nara.token(room, "bench", role) for _ in range(count)]

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    def loop_readings(self) -> dict[str, Any]:
        """``--loop-watch``: what each media worker last wrote (every 2 s), one worker's (the first) only."""
        if self.loop_watch is None:
            return {}
        for path in sorted(self.loop_watch.glob("loop-*.json")):
            try:
                reading: dict[str, Any] = json.loads(path.read_text())
                return reading
            except (OSError, ValueError):
                continue
        return {}

    def worker_pids(self) -> list[int]:
        return [pid for pid in self.pids() if pid != self.process.pid]

    async def stats(self) -> dict[str, Any]:
        if self.nara is None:
            return {}
        rooms: dict[str, Any] = (await self.nara.api("GET", "/api/stats")).get("rooms", {})
        return rooms

    async def forwarding_delay(self) -> DelaySnapshot | None:
        return (await self.readings())[0]

    async def readings(self) -> tuple[DelaySnapshot | None, dict[str, int]]:
        """The forwarding delay histogram, and the worker's counters summed (``COUNTERS``), in one read."""
        if self.nara is None:
            return None, {}
        total = DelaySnapshot.empty()
        counters = dict.fromkeys(COUNTERS, 0)
        for participants in (await self.stats()).values():
            for participant in participants.values():
                for published in participant.get("published", {}).values():
                    if "forwarding_delay" in published:
                        total = total + DelaySnapshot.from_json(published["forwarding_delay"])
                    counters["packets_in"] += published.get("packets", 0)
                    counters["asks_upstream"] += published.get("nacks", 0)
                for received in participant.get("received", []):
                    for name, key in (("padding", "padding"), ("resends", "retransmitted"),
                                      ("resends_shed", "resends_shed"), ("switches", "switches"),
                                      ("nacked", "nacked")):
                        counters[name] += received.get(key, 0)
        return total, counters

    async def levels(self) -> tuple[int, int]:
        """(subscriptions on the original, all subscriptions) of video."""
        on, total = 0, 0
        for participants in (await self.stats()).values():
            for participant in participants.values():
                for received in participant.get("received", []):
                    if str(received.get("from", "")).endswith("/video"):
                        total += 1
                        on += received.get("level") == "original"
        return on, total

    def stop(self) -> None:
        stop(self.process)


def _use_uvloop(workdir: Path) -> None:
    """Make every Python process started from here on (the server and its workers) run uvloop."""
    site = workdir / "uvloop-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import asyncio\nimport uvloop\nasyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)


def _restore_env(value: str | None) -> None:
    if value is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = value


# --- profiles ------------------------------------------------------------------------


def start_profiles(pids: list[int], seconds: float, directory: Path, label: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on each of the server's processes for the measurement window (raw stacks, one file each)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                              "--format", "raw", "--nonblocking", "-o", str(directory / f"{label}-{pid}.raw")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in pids]


def own_time(files: list[Path], top: int = 12) -> list[tuple[str, float]]:
    """The functions with the most samples at the top of the stack (own time), as shares of the busy
    samples (the event loop waiting in ``select`` is idle, left out)."""
    counts: dict[str, int] = {}
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaf = stack.rsplit(";", 1)[-1]
            name, _, where = leaf.partition(" (")
            module = where.rsplit("/", 1)[-1].split(":", 1)[0]
            key = f"{name} ({module})"
            if name.endswith("Selector.select") or name == "select":
                continue
            counts[key] = counts.get(key, 0) + int(count)
            total += int(count)
    return [(key, n / total) for key, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]] if total else []


# --- orchestration -----------------------------------------------------------------


async def _ask(conn: Connection, command: dict[str, Any]) -> dict[str, Any]:
    conn.send(command)
    reply: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    return reply


async def run_mode(mode: str, steps: list[int], options: Any, frames: list[tuple[bytes, bool]], workdir: Path,
                   progress: Any = print) -> list[dict[str, Any]]:
    room_size = options.room_size if mode == "forward" else 0  # (the naive relay has one room)
    plan = CorePlan(options.workers) if options.pin and mode == "forward" else None
    try:
        server = ServerUnderTest(mode, options.bitrate, workdir, options.workers if mode == "forward" else None,
                                 options.uvloop and mode == "forward", options.loop_watch and mode == "forward")
        if plan is not None:
            plan.pin_workers(server.worker_pids())
    except BaseException:
        if plan is not None:
            plan.restore()
        raise
    context = multiprocessing.get_context("spawn")
    generators: list[tuple[Any, Connection]] = []
    rooms: list[tuple[str, int, int]] = []  # (consultation, generator, subscribers in it)
    try:
        for _ in range(options.generators):
            parent, child = context.Pipe()
            process = context.Process(target=_generator_main, args=(child, mode, server.url, frames))
            process.start()
            generators.append((process, parent))

        async def open_room(generator: int) -> None:
            room = await server.consultation(f"bench {len(rooms)}")
            token = (await server.tokens(room, "kit", 1))[0]
            await _ask(generators[generator][1], {"cmd": "publish", "room": room, "token": token})
            rooms.append((room, generator, 0))

        async def add(count: int) -> list[dict[str, Any]]:
            """``count`` more subscribers; wait (bounded) until the server has every one on the original."""
            # Who gets them: the consultation being filled, then new ones, each (publisher and
            # subscribers) in one generator, consultations spread round the generators.
            plan: dict[int, list[tuple[str, int]]] = {}
            for _ in range(count):
                if not rooms or (room_size and rooms[-1][2] >= room_size):
                    await open_room(len(rooms) % len(generators) if room_size else 0)
                room, _, count = rooms[-1]
                generator = rooms[-1][1] if room_size else (count % len(generators))
                plan.setdefault(generator, []).append((room, count))
                rooms[-1] = (room, rooms[-1][1], count + 1)
            replies = []
            for generator, wanted in plan.items():  # (one command per generator: its pipe takes one at a time)
                by_room: dict[str, int] = {}
                for room, _ in wanted:
                    by_room[room] = by_room.get(room, 0) + 1
                groups = [(room, await server.tokens(room, "observer", count)) for room, count in by_room.items()]
                replies.append(_ask(generators[generator][1], {"cmd": "add", "groups": groups}))
            answers = await asyncio.gather(*replies)
            settle_started = time.monotonic()
            on, total = await server.levels()
            while on < total and time.monotonic() - settle_started < SETTLE_LIMIT:
                await asyncio.sleep(0.5)  # (polling the server's levels, bounded)
                on, total = await server.levels()
            return list(answers)

        results = []
        current = 0
        # Each step measured once per phasing asked for: independent publishers, then (the worst case) aligned.
        phases = [name == "aligned" for name in options.phases.split(",")]
        aligned_now = False
        for n in steps:
            answers = []
            while current < n:
                # Near a busy worker's top, one consultation at a time: each batch starts a ladder per consultation.
                size = options.batch if current < options.small_batches_from else (room_size or 3)
                batch = min(size, n - current)
                answers += await add(batch)
                current += batch
            on, total = await server.levels()
            await asyncio.sleep(WARMUP)  # let the last moves' keyframes and rates settle
            for phase in phases:
                if phase != aligned_now:
                    # Every publisher to the other phasing, then a keyframe interval and the warm-up for
                    # the clips' jumps to pass (each is back on a keyframe within one interval).
                    tick = math.floor(time.monotonic() * FPS) + FPS  # (a second ahead: every generator has it by then)
                    for _, conn in generators:
                        await _ask(conn, {"cmd": "phase", "aligned": phase, "tick": tick})
                    aligned_now = phase
                    await asyncio.sleep(KEYFRAME_INTERVAL + WARMUP)
                for _, conn in generators:
                    await _ask(conn, {"cmd": "reset"})
                label = f"{mode}-{n}-aligned" if phase else f"{mode}-{n}"
                pids = server.pids()
                profiles = (start_profiles(pids, options.duration, Path(options.profile), label)
                            if options.profile and mode == "forward" else [])
                workers = server.worker_pids() if mode == "forward" else []
                delay_start, counters_start = await server.readings()
                loops_start = server.loop_readings()
                sampler = (SecondSampler(workers[0], [p.pid for p, _ in generators if p.pid is not None])
                           if workers else None)
                cpu_start, worker_start, wall_start = _tree_cpu(pids), _tree_cpu(workers), time.monotonic()
                if sampler is not None:
                    sampler.sample(wall_start)
                    while (left := wall_start + options.duration - time.monotonic()) > 0:
                        await asyncio.sleep(min(1.0, left))  # the measurement window, read a second at a time
                        sampler.sample(time.monotonic())
                else:
                    await asyncio.sleep(options.duration)  # the measurement window
                wall = time.monotonic() - wall_start
                server_cores = (_tree_cpu(pids) - cpu_start) / wall
                worker_cores = (_tree_cpu(workers) - worker_start) / wall
                delay_end, counters_end = await server.readings()
                loops_end = server.loop_readings()
                for profile in profiles:
                    profile.wait(timeout=options.duration + 30)
                stats = [await _ask(conn, {"cmd": "stats"}) for _, conn in generators]
                subscribers = [s for st in stats for s in st["subscribers"]]
                publishers = sum(st["publishers"] for st in stats)
                sent_fps = sum(st["frames_sent"] for st in stats) / stats[0]["seconds"] / max(publishers, 1)
                step: dict[str, Any] = {
                    "mode": mode,
                    "subscribers": n,
                    "publishers_aligned": phase,
                    "consultations": len(rooms),
                    "server_processes": len(pids),
                    "on_original": on,
                    "all_receiving": all(r["ok"] for r in answers),
                    "server_cores": server_cores,
                    "worker_cores": worker_cores,  # the media workers alone (0 without workers)
                    "generator_cores": sum(st["cpu"] for st in stats),
                    "sent_fps": sent_fps,
                    "min_fps": min(s["frames_per_second"] for s in subscribers),
                    "mean_kbit_per_second": sum(s["kbit_per_second"] for s in subscribers) / len(subscribers),
                    "max_loss": max(s["loss"] for s in subscribers),
                    "max_delay_p95_ms": max(s["delay_p95_ms"] for s in subscribers),
                }
                if delay_start is not None and delay_end is not None:
                    window = delay_end.since(delay_start)
                    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                        value = window.quantile(q)
                        step[f"forwarding_delay_{name}_ms"] = value * 1000 if value is not None else None
                    step["forwarded_packets"] = window.total
                    # (with the loop watched, each packet's arrival is the kernel's stamp as it reached the socket)
                    step["forwarding_delay_from"] = "socket" if loops_end else "read"
                if loops_end:
                    step["loop_watch"] = loop_watch.window(loops_start, loops_end)
                if counters_end:
                    step["counters"] = {k: counters_end[k] - counters_start.get(k, 0) for k in COUNTERS}
                if sampler is not None:
                    step["seconds"] = [second.to_json() for second in sampler.seconds]
                if profiles:
                    step["profile"] = own_time([Path(options.profile) / f"{label}-{pid}.raw" for pid in pids])
                step["degraded"] = (
                    step["min_fps"] < DEGRADED_DELIVERY * sent_fps
                    or step["max_loss"] > DEGRADED_LOSS
                    or step["max_delay_p95_ms"] > DEGRADED_DELAY_MS
                )
                results.append(step)
                progress(_row(step))
            if aligned_now:  # (the climb goes on with independent publishers)
                tick = math.floor(time.monotonic() * FPS) + 1
                for _, conn in generators:
                    await _ask(conn, {"cmd": "phase", "aligned": False, "tick": tick})
                aligned_now = False
        for _, conn in generators:
            await _ask(conn, {"cmd": "stop"})
        return results
    finally:
        for process, _ in generators:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
        server.stop()
        if plan is not None:
            plan.restore()


def marginal_cost(steps: list[dict[str, Any]], cores: str = "server_cores") -> tuple[float, float]:
    """Least-squares slope and intercept of server cores (or ``cores``: ``worker_cores``) against subscribers."""
    xs = [float(s["subscribers"]) for s in steps]
    ys = [s[cores] for s in steps]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = covariance / var if var else ys[0] / xs[0]
    return slope, mean_y - slope * mean_x


HEADER = (f"{'server':8} {'N':>4} {'rooms':>5} {'server cores':>12} {'worker':>6} {'gen cores':>9} {'min fps':>7} "
          f"{'kbit/s':>7} {'max loss':>8} {'p95 delay':>9} {'fwd p50/p95/p99 ms':>20} {'orig':>5}  state")


def _row(s: dict[str, Any]) -> str:
    state = "degraded" if s["degraded"] else "ok"
    held = "-"
    if s.get("forwarding_delay_p95_ms") is not None:
        held = "/".join(f"{s[f'forwarding_delay_{q}_ms']:.2f}" for q in ("p50", "p95", "p99"))
        held += "*" if s.get("forwarding_delay_from") == "socket" else ""  # (from the datagram reaching its socket)
    mode = f"{s['mode']}/al" if s.get("publishers_aligned") else s["mode"]  # (aligned publishers: the worst case)
    line = (f"{mode:8} {s['subscribers']:>4} {s['consultations']:>5} {s['server_cores']:>12.3f} "
            f"{s.get('worker_cores', 0):>6.3f} {s['generator_cores']:>9.2f} {s['min_fps']:>7.1f} "
            f"{s['mean_kbit_per_second']:>7.0f} "
            f"{s['max_loss']:>8.2%} {s['max_delay_p95_ms']:>7.1f}ms {held:>20} {s['on_original']:>5}  {state}")
    for name, share in s.get("profile", [])[:8]:
        line += f"\n    {share:6.1%}  {name}"
    if "counters" in s:
        line += "\n    in the window: " + ", ".join(f"{k} {v}" for k, v in s["counters"].items())
    if s.get("seconds"):
        line += ("\n    per second (worker cores / its sockets' queued KB / drops at the worker / at the generators): "
                 + " ".join(f"{c:.2f}/{q // 1024}/{w}/{g}" for c, q, w, g in s["seconds"]))
    watched = s.get("loop_watch", {})
    for generation, (count, total, longest) in sorted(watched.get("collections", {}).items()):
        line += (f"\n    gc gen {generation}: {count:.0f} passes, {total * 1000:.1f} ms in all, "
                 f"longest {longest * 1000:.1f} ms")
    if watched.get("socket_waits"):
        waits = DelaySnapshot.from_json(watched["socket_waits"])
        if waits.total:
            line += ("\n    of which waited in the worker's sockets (p50/p95/p99 ms): "
                     + "/".join(f"{(waits.quantile(q) or 0.0) * 1000:.2f}" for q in (0.5, 0.95, 0.99))
                     + f" over {waits.total} datagrams")
    if any(t[0] for t in watched.get("turns", [])):
        line += "\n    loop turns (share of turns / of sockets found ready / of the turns' time): " + ", ".join(
            f"{label} {turns:.1%}/{ready:.1%}/{took:.1%}"
            for label, turns, ready, took in loop_watch.turn_shares(watched["turns"]))
    for name, (count, total, longest) in watched.get("callbacks", {}).items():
        line += (f"\n    {count:6.0f} callbacks over 1 ms, {total * 1000:7.1f} ms in all, "
                 f"longest {longest * 1000:5.1f} ms: {name}")
    return line


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode, all_steps in results.items():
        steps = [s for s in all_steps if not s.get("publishers_aligned")] or all_steps  # (one reading per N)
        # The fit uses healthy steps only: past saturation CPU says nothing about cost.
        healthy_steps = [s for s in steps if not s["degraded"]] or steps
        slope, intercept = marginal_cost(healthy_steps)
        healthy = [s["subscribers"] for s in steps if not s["degraded"]]
        summary[mode] = {
            "marginal_cores_per_subscriber": slope,
            "base_cores": intercept,
            "streams_per_core": (1 / slope) if slope > 0 else float("inf"),
            "largest_healthy_n": max(healthy) if healthy else 0,
        }
        if any(s.get("worker_cores") for s in healthy_steps):
            # The media workers alone: with one worker, what that worker's own core can carry.
            worker_slope, _ = marginal_cost(healthy_steps, "worker_cores")
            summary[mode]["worker_marginal_cores_per_subscriber"] = worker_slope
            summary[mode]["worker_streams_per_core"] = (1 / worker_slope) if worker_slope > 0 else float("inf")
    if "forward" in summary:
        # The load closest to 80 % of one core's capacity (capacity: 1 core / marginal CPU per subscriber,
        # of the media workers alone when there are any: the main process is on another core).
        capacity = summary["forward"].get("worker_streams_per_core", summary["forward"]["streams_per_core"])
        if math.isfinite(capacity):
            target = 0.8 * capacity
            independent = [s for s in results["forward"] if not s.get("publishers_aligned")]
            nearest = min(independent, key=lambda s: abs(s["subscribers"] - target))
            summary["forward"]["capacity_80_percent"] = target
            summary["forward"]["step_nearest_80_percent"] = {
                "subscribers": nearest["subscribers"], "share_of_capacity": nearest["subscribers"] / capacity,
                "worker_cores": nearest.get("worker_cores"),
                **{k: nearest.get(k) for k in ("forwarding_delay_p50_ms", "forwarding_delay_p95_ms",
                                               "forwarding_delay_p99_ms")}}
    if "forward" in summary and "naive" in summary:
        summary["naive_over_forward"] = (
            summary["naive"]["marginal_cores_per_subscriber"]
            / summary["forward"]["marginal_cores_per_subscriber"]
        )
    return summary


def main(args: argparse.Namespace) -> int:
    if args.pin and not args.workers:
        raise SystemExit("--pin needs --workers N (N media workers, each pinned to a core of its own)")
    if not set(args.phases.split(",")) <= {"independent", "aligned"}:
        raise SystemExit(f"--phases: independent and/or aligned, comma-separated (not {args.phases!r})")
    forward_steps = sorted({int(n) for n in args.subscribers.split(",") if n})
    naive_steps = sorted({int(n) for n in args.naive_subscribers.split(",") if n})
    shape = f"consultations of 1 + {args.room_size}" if args.room_size else "one consultation"
    workers = "default workers" if args.workers is None else f"--workers {args.workers}"
    print(f"nara bench forward: 640x480@{FPS} VP8 clip at {args.bitrate // 1000} kbit/s, {shape}, "
          f"{args.duration:.0f} s per step, {args.generators} generator processes, {workers}"
          f"{', uvloop' if args.uvloop else ''}", flush=True)
    print("encoding the clip ...", flush=True)
    frames = encode_clip(args.bitrate)
    clip_rate = sum(len(d) for d, _ in frames) * 8 / (len(frames) / FPS)
    print(f"clip: {len(frames)} frames, {clip_rate / 1000:.0f} kbit/s, "
          f"{sum(k for _, k in frames)} keyframes", flush=True)
    if args.loop_watch:
        print("fwd delay*: from each datagram reaching the worker's socket (the kernel's stamp) to its copies' "
              "sendto; without --loop-watch, from its read", flush=True)
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            mode: asyncio.run(run_mode(mode, steps, args, frames, Path(tmp), lambda r: print(r, flush=True)))
            for mode, steps in (("forward", forward_steps), ("naive", naive_steps)) if steps
        }
    summary = summarise(results)
    print()
    for mode in results:
        s = summary[mode]
        print(f"{mode:8} marginal {s['marginal_cores_per_subscriber'] * 1000:.2f} millicores per subscriber "
              f"(= {s['streams_per_core']:.0f} streams per core), largest healthy N {s['largest_healthy_n']}")
        if "worker_streams_per_core" in s:
            print(f"{'':8} the media workers alone: {s['worker_marginal_cores_per_subscriber'] * 1000:.2f} "
                  f"millicores per subscriber (= {s['worker_streams_per_core']:.0f} streams per core)")
    if "forward" in summary and "step_nearest_80_percent" in summary["forward"]:
        near = summary["forward"]["step_nearest_80_percent"]
        print(f"80 % of one core's capacity: {summary['forward']['capacity_80_percent']:.0f} subscribers; "
              f"nearest step N = {near['subscribers']} ({near['share_of_capacity']:.0%} of capacity): forwarding "
              f"delay p50/p95/p99 {near['forwarding_delay_p50_ms']} / {near['forwarding_delay_p95_ms']} / "
              f"{near['forwarding_delay_p99_ms']} ms")
    if "naive_over_forward" in summary:
        print(f"naive / forward CPU per subscriber: {summary['naive_over_forward']:.1f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"steps": results, "summary": summary}, indent=2))
    return 0
