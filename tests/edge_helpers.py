"""Test helpers for the home kit: an enrolled kit's files, and a care-team member who watches it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.edge import KitLink
from bench.process import PROJECT, free_port
from bench.synthetic import StampedVideoTrack, ToneAudioTrack, dominant_frequency, read_stamp
from edge.agent import KitAgent
from edge.config import EdgeConfig, TurnRelay
from edge.device_api import enrol, write_credential
from edge.media import SYNTHETIC_TAG, SYNTHETIC_TONE
from signalling.client import ConsultationClient


async def admin(server_url: str, admin_key: str, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_key}"}) as http:
        async with http.request(method, f"{server_url}{path}", json=body) as response:
            data = await response.json()
            assert response.status < 300, data
            return data


async def enrolled_kit(server_url: str, admin_key: str, tmp_path: Path, name: str = "Kit 7") -> tuple[str, Path]:
    """Create a device on the server and enrol it: (device id, credential path)."""
    created = await admin(server_url, admin_key, "POST", "/api/devices", {"name": name})
    credential = await enrol(server_url, created["enrolment_code"])
    path = tmp_path / "kit" / "credential.json"
    write_credential(path, credential)
    return credential.device_id, path


def kit_config(server_url: str, credential: Path, *, camera: str = "synthetic", video: str = "320x240",
               turn: TurnRelay | None = None) -> EdgeConfig:
    return EdgeConfig(server=server_url, credential=credential, camera=camera, microphone="synthetic",
                      page="127.0.0.1:0", video=video, fps=15, turn=turn, data_dir=credential.parent / "data")


@dataclass
class KitWatcher:
    """A clinician in the consultation who records what arrives from the kit, and when."""

    client: ConsultationClient
    kit_id: str
    video_at: list[float] = field(default_factory=list)  # time.monotonic() of each kit picture decoded
    tags: set[int] = field(default_factory=set)
    tones: list[float] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    @classmethod
    async def join(cls, server_url: str, room: str, token: str, kit_id: str) -> KitWatcher:
        client = ConsultationClient(server_url, room, token, video=StampedVideoTrack(1, 160, 120, 10),
                                    audio=ToneAudioTrack(440.0))
        watcher = cls(client, kit_id)
        client.on_answered = lambda pc: watcher.follow()
        await client.join()
        return watcher

    def follow(self) -> None:
        for mid, track in self.client.remote_tracks.items():
            if id(track) not in self._tasks:
                self._tasks[id(track)] = asyncio.ensure_future(self._read(mid, track))

    async def _read(self, mid: str, track: Any) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                owner = self.client.owners.get(mid)
                if owner is None or owner[0] != self.kit_id:
                    continue
                if track.kind == "video":
                    self.video_at.append(time.monotonic())
                    self.tags.add(read_stamp(frame.to_ndarray(format="yuv420p")[: frame.height]).tag)
                else:
                    self.tones.append(dominant_frequency(frame))
                async with self.changed:
                    self.changed.notify_all()

    def kit_video_after(self, moment: float) -> float | None:
        """When the first kit picture after ``moment`` arrived."""
        return next((t for t in self.video_at if t > moment), None)

    def hears_kit(self) -> bool:
        return sum(1 for f in self.tones[-50:] if abs(f - SYNTHETIC_TONE) < 30) >= 10

    def sees_kit(self) -> bool:
        return len(self.video_at) >= 10 and SYNTHETIC_TAG in self.tags

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await self.client.close()


@dataclass
class KitInCall:
    """A real kit agent in a call with a clinician, its whole link (signalling and TURN) through ``link``."""

    link: KitLink
    agent: KitAgent
    clinician: KitWatcher


@contextlib.asynccontextmanager
async def agent_running(config: EdgeConfig) -> AsyncIterator[KitAgent]:
    agent = KitAgent(config)
    task = asyncio.ensure_future(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def kit_in_call(server: Any, tmp_path: Path) -> AsyncIterator[KitInCall]:
    """An enrolled kit called into a new consultation of ``server`` (a RunningServer), the clinician seeing it."""
    link = KitLink(server.url)
    await link.start()
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation()
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
    clinician = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
    config = kit_config(link.server_url, credential, turn=link.relay)
    try:
        async with agent_running(config) as agent:
            await clinician.wait_for(clinician.sees_kit, 20)
            yield KitInCall(link, agent, clinician)
    finally:
        await clinician.close()
        await link.close()


class ServerProcess:
    """`nara serve` on a fixed port and data directory, so it can be killed and started again."""

    def __init__(self, data_dir: Path, *extra: str, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.data_dir = data_dir
        self.extra = extra  # further `nara serve` arguments
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> float:
        """Start and return the moment it listens."""
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nara.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--no-demo", *self.extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if "listening on" in line:
                return time.monotonic()
        raise RuntimeError("the server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-key").read_text().strip()

    async def token(self, room: str) -> str:
        body = {"name": "Dr A", "role": "clinician"}
        data = await admin(self.url, self.admin_key, "POST", f"/api/consultations/{room}/tokens", body)
        return str(data["token"])
