"""``nara bench edge``: how fast the home kit is back after an outage, what it costs, whether it leaks.

The kit (``nara edge run``, a process of its own) reaches the server only
through ``KitLink``: its media through the impairing TURN relay
(``bench/turn.py``) and its HTTP and WebSocket traffic through a TCP proxy
(``bench/tcp_proxy.py``), so one outage cuts both, as a dead mobile link
would. A clinician in the consultation, on a link of its own that is never
cut, watches the kit's pictures.

* Recovery: outages of each length (default 5, 30 and 120 s), ``--trials``
  of each; the time from the link's return to the first new kit picture at
  the clinician. Goal: under 3 s in every trial.
* CPU: the kit process's CPU per second while it streams 640x480 at 15 fps
  (Nära's VP8 and Opus), against a process that streams the same synthetic
  camera and tone through aiortc's stock pipeline (a ``VideoStreamTrack`` and
  aiortc's own VP8 and Opus encoders), measured in the same run.
* Soak (``--soak-minutes``): random outages for that long; every minute the
  kit's resident memory, asyncio tasks and open file descriptors are sampled,
  and their growth from the first minute to the last is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from edge.config import TurnRelay
from edge.device_api import enrol, write_credential

from .process import PROJECT, NaraServer, cpu_seconds, free_port, resident_mb, stop
from .tcp_proxy import TcpProxy
from .turn import ImpairingTurnServer

RECOVERY_GOAL = 3.0
TRIAL_TIMEOUT = 60.0


class KitLink:
    """The kit's access link: media through the impairing TURN relay, signalling through a TCP proxy."""

    def __init__(self, server_url: str, profile: str = "loopback", seed: int = 0) -> None:
        host, _, port = server_url.removeprefix("http://").partition(":")
        self.proxy = TcpProxy(host, int(port.rstrip("/")))
        self.turn = ImpairingTurnServer(seed=seed)
        self.profile = profile

    async def start(self) -> None:
        await self.proxy.start()
        await self.turn.start()

    @property
    def server_url(self) -> str:
        """The address the kit uses for the server."""
        return self.proxy.url

    @property
    def relay(self) -> TurnRelay:
        return TurnRelay(self.turn.url, f"{self.profile}/kit", self.turn.password)

    def cut(self) -> None:
        self.proxy.cut()
        self.turn.down = True

    def restore(self) -> None:
        self.turn.down = False
        self.proxy.restore()

    async def close(self) -> None:
        await self.proxy.close()
        self.turn.close()


def kit_toml(server: str, credential: Path, page_port: int, relay: TurnRelay | None, video: str, fps: int) -> str:
    lines = [f'server = "{server}"', f'credential = "{credential}"', f'data_dir = "{credential.parent / "data"}"',
             'camera = "synthetic"',
             'microphone = "synthetic"', f'page = "127.0.0.1:{page_port}"', f'video = "{video}"', f"fps = {fps}"]
    if relay is not None:
        lines += ["[turn]", f'url = "{relay.url}"', f'username = "{relay.username}"',
                  f'credential = "{relay.credential}"']
    return "\n".join(lines) + "\n"


class KitProcess:
    """``nara edge run`` in a process of its own, watched through its page."""

    def __init__(self, config: Path, page_port: int, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        env.pop("NOTIFY_SOCKET", None)
        self.page = f"http://127.0.0.1:{page_port}"
        self._log = log.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "nara.cli", "edge", "run", "--config", str(config)],
                                        env=env, stdout=self._log, stderr=subprocess.STDOUT)

    async def status(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.page}/status") as response:
            data: dict[str, Any] = await response.json()
            return data

    async def vitals(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.page}/vitals") as response:
            data: dict[str, Any] = await response.json()
            return data

    async def wait_for_state(self, state: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (await self.status())["state"] == state:
                    return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.2)  # polling another process's page
        raise TimeoutError(f"the kit did not reach {state!r} in {timeout:.0f} s")

    def stop(self) -> None:
        stop(self.process)  # type: ignore[arg-type]
        self._log.close()


async def _admin(server: NaraServer, method: str, path: str, body: Any = None) -> Any:
    return await server.api(method, path, body)


async def enrolled_kit(server: NaraServer, folder: Path) -> tuple[str, Path]:
    created = await _admin(server, "POST", "/api/devices", {"name": "Bench kit"})
    credential = await enrol(server.url, created["enrolment_code"])
    path = folder / "credential.json"
    write_credential(path, credential)
    return credential.device_id, path


# --- the clinician who watches ------------------------------------------------------------


class Watcher:
    """A clinician in the room, on an uncut link, noting when each kit picture arrives."""

    def __init__(self, kit_id: str) -> None:
        from signalling.client import ConsultationClient

        self.kit_id = kit_id
        self.client: ConsultationClient | None = None
        self.arrivals: list[float] = []
        self.changed = asyncio.Condition()
        self._followed: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def join(self, url: str, room: str, token: str) -> None:
        from signalling.client import ConsultationClient

        self.client = ConsultationClient(url, room, token, publish=False, on_answered=lambda pc: self._follow())
        await self.client.join()

    def _follow(self) -> None:
        assert self.client is not None
        for mid, track in self.client.remote_tracks.items():
            if id(track) not in self._followed and track.kind == "video":
                self._followed.add(id(track))
                self._tasks.append(asyncio.ensure_future(self._read(mid, track)))

    async def _read(self, mid: str, track: Any) -> None:
        assert self.client is not None
        try:
            while True:
                await track.recv()
                owner = self.client.owners.get(mid)
                if owner is not None and owner[0] == self.kit_id:
                    self.arrivals.append(time.monotonic())
                    async with self.changed:
                        self.changed.notify_all()
        except Exception:
            return

    async def first_after(self, moment: float, timeout: float) -> float:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.arrivals[-1:] > [moment]), timeout)
        return next(t for t in self.arrivals if t > moment)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.client is not None:
            await self.client.close()


# --- the parts of the benchmark --------------------------------------------------------------


async def recovery_trials(link: KitLink, watcher: Watcher, lengths: list[float], trials: int,
                          rng: random.Random) -> dict[str, list[float | None]]:
    results: dict[str, list[float | None]] = {}
    for length in lengths:
        times: list[float | None] = []
        for trial in range(trials):
            try:
                await watcher.first_after(time.monotonic(), TRIAL_TIMEOUT)  # the kit is streaming
            except TimeoutError:
                print(f"  outage {length:>5.0f} s, trial {trial + 1:>2}: the kit's media never came back; "
                      "no more trials", flush=True)
                times += [None] * (trials - trial)
                break
            await asyncio.sleep(rng.uniform(1.0, 3.0))  # a random phase of the kit's heartbeat and reports
            link.cut()
            await asyncio.sleep(length)  # the outage itself
            link.restore()
            back = time.monotonic()
            try:
                recovered: float | None = await watcher.first_after(back, TRIAL_TIMEOUT) - back
            except TimeoutError:
                recovered = None
            times.append(recovered)
            shown = "none in 60 s" if recovered is None else f"{recovered:.2f} s"
            print(f"  outage {length:>5.0f} s, trial {trial + 1:>2}: media again after {shown}", flush=True)
        results[f"{length:g}"] = times
    return results


def summarise(times: list[float | None]) -> dict[str, Any]:
    got = sorted(t for t in times if t is not None)
    if not got:
        return {"trials": len(times), "within_goal": 0}
    return {
        "trials": len(times), "within_goal": sum(1 for t in got if t <= RECOVERY_GOAL),
        "min": got[0], "median": statistics.median(got), "p90": got[min(len(got) - 1, int(0.9 * len(got)))],
        "max": got[-1], "failed": len(times) - len(got),
    }


async def cpu_while_streaming(pid: int, seconds: float) -> float:
    """Cores a process uses over ``seconds``."""
    before, at = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)  # the measurement window
    return (cpu_seconds(pid) - before) / (time.monotonic() - at)


async def stock_kit(url: str, room: str, token: str, width: int, height: int, fps: int) -> None:
    """aiortc's stock pipeline: raw frames to aiortc's own VP8 and Opus encoders (run with ``stock-kit``)."""
    from bench.synthetic import StampedVideoTrack, ToneAudioTrack
    from mediaserver.aiortc_adapter import restrict_host_addresses
    from signalling.client import ConsultationClient

    restrict_host_addresses(["127.0.0.1"])
    client = ConsultationClient(url, room, token, video=StampedVideoTrack(9, width, height, fps),
                                audio=ToneAudioTrack(550.0, voiced=True))
    await client.join()
    print("joined", flush=True)
    await asyncio.Event().wait()


async def soak(kit: KitProcess, link: KitLink, watcher: Watcher, minutes: float,
               rng: random.Random) -> list[dict[str, float]]:
    samples: list[dict[str, float]] = []
    end = time.monotonic() + minutes * 60
    next_sample = time.monotonic()
    while time.monotonic() < end:
        if time.monotonic() >= next_sample:
            vitals = await kit.vitals()
            sample = {"minute": len(samples), "rss_mb": resident_mb(kit.process.pid),
                      "tasks": vitals["tasks"], "fds": vitals["fds"]}
            samples.append(sample)
            print(f"  minute {sample['minute']:>3}: {sample['rss_mb']:.1f} MB, {sample['tasks']} tasks, "
                  f"{sample['fds']} fds", flush=True)
            next_sample += 60
        await asyncio.sleep(rng.uniform(10, 40))  # up time between outages
        link.cut()
        await asyncio.sleep(rng.uniform(2, 20))  # the outage
        link.restore()
        await watcher.first_after(time.monotonic(), TRIAL_TIMEOUT)
    return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from mediaserver.aiortc_adapter import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])  # loopback only, like the server: the clinician's ICE needs it
    rng = random.Random(args.seed)
    lengths = [float(x) for x in args.outages.split(",") if x]
    workdir = Path(tempfile.mkdtemp(prefix="nara-bench-edge-"))
    server = NaraServer(workdir / "server")
    link = KitLink(server.url, args.profile, args.seed)
    await link.start()
    kit_id, credential = await enrolled_kit(server, workdir)
    room = await server.consultation("Bench: home kit")
    await _admin(server, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    await _admin(server, "POST", f"/api/consultations/{room}/call-kit")
    page_port = free_port()
    config = workdir / "edge.toml"
    config.write_text(kit_toml(link.server_url, credential, page_port, link.relay, args.video, args.fps))
    kit = KitProcess(config, page_port, workdir / "kit.log")
    watcher = Watcher(kit_id)
    result: dict[str, Any] = {"video": args.video, "fps": args.fps, "profile": args.profile}
    try:
        await watcher.join(server.url, room, await server.token(room, "Bench clinician", "clinician"))
        await kit.wait_for_state("connected", 30)
        await watcher.first_after(time.monotonic(), TRIAL_TIMEOUT)
        print(f"CPU while streaming {args.video} at {args.fps} fps, {args.cpu_seconds:.0f} s each:", flush=True)
        nara_cpu = await cpu_while_streaming(kit.process.pid, args.cpu_seconds)
        width, height = (int(v) for v in args.video.split("x"))
        token = await server.token(room, "Stock kit", "kit", "stock-kit")
        stock = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.edge", "stock-kit", server.url, room, token, str(width), str(height),
            str(args.fps), env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=asyncio.subprocess.PIPE)
        try:
            assert stock.stdout is not None
            await asyncio.wait_for(stock.stdout.readline(), 30)
            await asyncio.sleep(3.0)  # its encoder settles
            stock_cpu = await cpu_while_streaming(stock.pid, args.cpu_seconds)
        finally:
            stock.terminate()
            await stock.wait()
        result["cpu"] = {"nara_kit_cores": nara_cpu, "aiortc_stock_cores": stock_cpu, "ratio": nara_cpu / stock_cpu}
        print(f"  nara edge: {nara_cpu:.3f} cores   aiortc stock pipeline: {stock_cpu:.3f} cores   "
              f"ratio {nara_cpu / stock_cpu:.2f}", flush=True)
        if args.trials > 0 and lengths:
            print(f"Recovery after outages ({args.trials} trials each, goal {RECOVERY_GOAL:g} s):", flush=True)
            trials = await recovery_trials(link, watcher, lengths, args.trials, rng)
            result["recovery"] = {length: {"times": times, **summarise(times)} for length, times in trials.items()}
            for length, summary in result["recovery"].items():
                if "median" in summary:
                    print(f"  {length:>5} s outages: {summary['within_goal']}/{summary['trials']} within goal; "
                          f"min {summary['min']:.2f}  median {summary['median']:.2f}  p90 {summary['p90']:.2f}  "
                          f"max {summary['max']:.2f} s", flush=True)
        if args.soak_minutes > 0:
            print(f"Soak, {args.soak_minutes:g} minutes of random outages:", flush=True)
            samples = await soak(kit, link, watcher, args.soak_minutes, rng)
            first, last = samples[0], samples[-1]
            result["soak"] = {"samples": samples, "growth": {k: last[k] - first[k] for k in ("rss_mb", "tasks", "fds")}}
            print(f"  growth first to last minute: {result['soak']['growth']}", flush=True)
    finally:
        await watcher.close()
        kit.stop()
        await link.close()
        server.stop()
    return result


def main(args: argparse.Namespace) -> int:
    result = asyncio.run(run(args))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    recovery = result.get("recovery", {})
    return 0 if all(s["within_goal"] == s["trials"] for s in recovery.values()) else 1


if __name__ == "__main__" and sys.argv[1:2] == ["stock-kit"]:
    url, room, token, width, height, fps = sys.argv[2:8]
    asyncio.run(stock_kit(url, room, token, int(width), int(height), int(fps)))
