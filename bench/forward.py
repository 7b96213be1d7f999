"""``nara bench forward``: what forwarding one video to N subscribers costs the server.

Two servers are measured in the same run, each in its own process:

* ``forward``: Nära's server (``nara serve``), forwarding packets untouched;
* ``naive``: the re-encoding relay of ``bench/naive_relay.py`` (aiortc
  ``MediaRelay`` feeding one VP8 encoder per subscriber), the baseline.

One publisher sends 640x480 VP8 at 30 fps and a fixed bitrate. Subscribers
are added step by step up to each N; at every step the server process's CPU is
read from /proc over a measurement window, and every subscriber reports frames
per second, loss and one-way delay (relative to its minimum). Load generators
run in their own processes, never decode, and report their CPU apart. The
marginal CPU per subscriber is the slope of a least-squares line through
(N, server CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from .process import NaraServer, cpu_seconds, free_port, start_python, stop

FPS = 30
WARMUP = 2.0
DEGRADED_DELIVERY = 0.95
DEGRADED_LOSS = 0.01
DEGRADED_DELAY_MS = 100.0


# --- load generator processes ---------------------------------------------------


async def _forward_subscriber(url: str, room: str, token: str, meters: list[Any]) -> Any:
    from bench.meter import StreamMeter
    from mediaserver.aiortc_adapter import InboundTap
    from signalling.client import ConsultationClient

    meter = StreamMeter()

    def tap(transceiver: Any) -> None:
        async def on_packet(packet: Any) -> None:
            if transceiver.kind == "video":
                meter.add(packet)

        InboundTap(transceiver.receiver, on_packet)

    client = ConsultationClient(url, room, token, publish=False, on_new_transceiver=tap)
    await client.join()
    meters.append(meter)
    return client


async def _naive_subscriber(url: str, meters: list[Any]) -> Any:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from bench.meter import StreamMeter
    from mediaserver.aiortc_adapter import InboundTap

    meter = StreamMeter()
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("video", direction="recvonly")

    async def on_packet(packet: Any) -> None:
        meter.add(packet)

    InboundTap(transceiver.receiver, on_packet)
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/subscribe", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    meters.append(meter)
    return pc


async def _publisher(mode: str, url: str, room: str, token: str, bitrate: int) -> tuple[Any, Any]:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from bench.synthetic import StampedVideoTrack
    from mediaserver.aiortc_adapter import hold_encoder_bitrate
    from signalling.client import ConsultationClient

    video = StampedVideoTrack(1, 640, 480, FPS)
    if mode == "forward":
        client = ConsultationClient(url, room, token, video=video,
                                    on_new_transceiver=lambda t: hold_encoder_bitrate(t.sender, bitrate))
        await client.join()
        return client, video
    pc = RTCPeerConnection()
    hold_encoder_bitrate(pc.addTrack(video), bitrate)
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/publish", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    return pc, video


async def _generator(conn: Connection, mode: str, url: str, room: str) -> None:
    from mediaserver.aiortc_adapter import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])
    loop = asyncio.get_running_loop()
    meters: list[Any] = []
    peers: list[Any] = []
    video = None
    window_start = time.monotonic()
    cpu_start = time.process_time()
    frames_start = 0
    while True:
        command: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
        kind = command["cmd"]
        if kind == "publish":
            peer, video = await _publisher(mode, url, room, command["token"], command["bitrate"])
            peers.append(peer)
            conn.send({"ok": True})
        elif kind == "add":
            new: list[Any] = []
            for token in command["tokens"]:
                if mode == "forward":
                    peers.append(await _forward_subscriber(url, room, token, new))
                else:
                    peers.append(await _naive_subscriber(url, new))
            deadline = time.monotonic() + 30
            while any(m.packets == 0 for m in new) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            meters.extend(new)
            conn.send({"ok": all(m.packets for m in new)})
        elif kind == "reset":
            for meter in meters:
                meter.reset()
            window_start, cpu_start = time.monotonic(), time.process_time()
            frames_start = video.frames_sent if video is not None else 0
            conn.send({"ok": True})
        elif kind == "stats":
            seconds = time.monotonic() - window_start
            conn.send({
                "subscribers": [m.summary(seconds) for m in meters],
                "cpu": (time.process_time() - cpu_start) / seconds,
                "frames_sent": (video.frames_sent - frames_start) if video is not None else 0,
                "seconds": seconds,
            })
        elif kind == "stop":
            for peer in peers:
                await peer.close()
            conn.send({"ok": True})
            return


def _generator_main(conn: Connection, mode: str, url: str, room: str) -> None:
    asyncio.run(_generator(conn, mode, url, room))


# --- orchestration -----------------------------------------------------------------


class ServerUnderTest:
    """The forwarding SFU (`nara serve`) or the naive relay, in a process of its own."""

    def __init__(self, mode: str, bitrate: int, workdir: Path) -> None:
        self.mode = mode
        self.room = ""
        self.nara: NaraServer | None = None
        if mode == "forward":
            self.nara = NaraServer(workdir / "forward-data")
            self.url, self.process = self.nara.url, self.nara.process
        else:
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.process = start_python("bench.naive_relay", "--port", str(port), "--bitrate", str(bitrate),
                                        ready="ready")

    async def prepare(self) -> None:
        if self.nara is not None:
            self.room = await self.nara.consultation("bench")

    async def tokens(self, role: str, count: int) -> list[str]:
        if self.nara is None:
            return [""] * count
        return [await self.nara.token(self.room, "bench", role) for _ in range(count)]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        stop(self.process)


async def _ask(conn: Connection, command: dict[str, Any]) -> dict[str, Any]:
    conn.send(command)
    reply: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    return reply


async def run_mode(mode: str, steps: list[int], duration: float, bitrate: int, workdir: Path,
                   generators_count: int = 2, progress: Any = print) -> list[dict[str, Any]]:
    server = ServerUnderTest(mode, bitrate, workdir)
    context = multiprocessing.get_context("spawn")
    workers: list[tuple[Any, Connection]] = []
    try:
        await server.prepare()
        for _ in range(generators_count + 1):  # worker 0 publishes
            parent, child = context.Pipe()
            process = context.Process(target=_generator_main, args=(child, mode, server.url, server.room))
            process.start()
            workers.append((process, parent))
        publisher = workers[0][1]
        generators = [conn for _, conn in workers[1:]]
        await _ask(publisher, {"cmd": "publish", "token": (await server.tokens("kit", 1))[0],
                               "bitrate": bitrate})
        results = []
        current = 0
        for n in steps:
            tokens = await server.tokens("observer", n - current)
            shares = [tokens[i::len(generators)] for i in range(len(generators))]
            replies = await asyncio.gather(*(
                _ask(g, {"cmd": "add", "tokens": share})
                for g, share in zip(generators, shares, strict=True)
                if share
            ))
            current = n
            await asyncio.sleep(WARMUP)  # let the new subscribers' keyframes and rates settle
            for _, conn in workers:
                await _ask(conn, {"cmd": "reset"})
            cpu_start, wall_start = server.cpu_seconds(), time.monotonic()
            await asyncio.sleep(duration)  # the measurement window
            server_cores = (server.cpu_seconds() - cpu_start) / (time.monotonic() - wall_start)
            stats = [await _ask(conn, {"cmd": "stats"}) for _, conn in workers]
            subscribers = [s for st in stats[1:] for s in st["subscribers"]]
            sent_fps = stats[0]["frames_sent"] / stats[0]["seconds"]
            step = {
                "mode": mode,
                "subscribers": n,
                "all_receiving": all(r["ok"] for r in replies),
                "server_cores": server_cores,
                "generator_cores": sum(st["cpu"] for st in stats[1:]),
                "publisher_cores": stats[0]["cpu"],
                "sent_fps": sent_fps,
                "min_fps": min(s["frames_per_second"] for s in subscribers),
                "mean_kbit_per_second": sum(s["kbit_per_second"] for s in subscribers) / len(subscribers),
                "max_loss": max(s["loss"] for s in subscribers),
                "max_delay_p95_ms": max(s["delay_p95_ms"] for s in subscribers),
            }
            step["degraded"] = (
                step["min_fps"] < DEGRADED_DELIVERY * sent_fps
                or step["max_loss"] > DEGRADED_LOSS
                or step["max_delay_p95_ms"] > DEGRADED_DELAY_MS
            )
            results.append(step)
            progress(_row(step))
        for _, conn in workers:
            await _ask(conn, {"cmd": "stop"})
        return results
    finally:
        for process, _ in workers:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
        server.stop()


def marginal_cost(steps: list[dict[str, Any]]) -> tuple[float, float]:
    """Least-squares slope and intercept of server cores against subscribers."""
    xs = [float(s["subscribers"]) for s in steps]
    ys = [s["server_cores"] for s in steps]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = covariance / var if var else ys[0] / xs[0]
    return slope, mean_y - slope * mean_x


HEADER = (f"{'server':8} {'N':>4} {'server cores':>12} {'gen cores':>9} {'min fps':>7} "
          f"{'kbit/s':>7} {'max loss':>8} {'p95 delay':>9}  state")


def _row(s: dict[str, Any]) -> str:
    state = "degraded" if s["degraded"] else "ok"
    return (f"{s['mode']:8} {s['subscribers']:>4} {s['server_cores']:>12.3f} {s['generator_cores']:>9.2f} "
            f"{s['min_fps']:>7.1f} {s['mean_kbit_per_second']:>7.0f} {s['max_loss']:>8.2%} "
            f"{s['max_delay_p95_ms']:>7.1f}ms  {state}")


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode, steps in results.items():
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
    if "forward" in summary and "naive" in summary:
        summary["naive_over_forward"] = (
            summary["naive"]["marginal_cores_per_subscriber"]
            / summary["forward"]["marginal_cores_per_subscriber"]
        )
    return summary


def main(args: argparse.Namespace) -> int:
    forward_steps = sorted({int(n) for n in args.subscribers.split(",")})
    naive_steps = sorted({int(n) for n in args.naive_subscribers.split(",")})
    print(f"nara bench forward: 640x480@{FPS} VP8 at {args.bitrate // 1000} kbit/s, "
          f"{args.duration:.0f} s per step, {args.generators} generator processes", flush=True)
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            mode: asyncio.run(run_mode(mode, steps, args.duration, args.bitrate, Path(tmp),
                                       args.generators, lambda r: print(r, flush=True)))
            for mode, steps in (("forward", forward_steps), ("naive", naive_steps))
        }
    summary = summarise(results)
    print()
    for mode in ("forward", "naive"):
        s = summary[mode]
        print(f"{mode:8} marginal {s['marginal_cores_per_subscriber'] * 1000:.1f} millicores per subscriber "
              f"(= {s['streams_per_core']:.0f} streams per core), largest healthy N {s['largest_healthy_n']}")
    print(f"naive / forward CPU per subscriber: {summary['naive_over_forward']:.1f}x")
    if args.output:
        Path(args.output).write_text(json.dumps({"steps": results, "summary": summary}, indent=2))
    return 0
