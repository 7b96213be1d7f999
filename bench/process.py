"""Processes under measurement: a free port, CPU and memory from /proc, a `nara serve` to test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from mediaserver.pool import process_usage

PROJECT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (ProcessLookupError once it is gone)."""
    usage = process_usage(pid)
    if usage is None:
        raise ProcessLookupError(pid)
    return usage[0]


def with_children(pid: int) -> list[int]:
    """The process and its children (a `nara serve` and its media workers)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def _total(measure: Any, pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += measure(pid)
        except (OSError, IndexError, ValueError):
            continue  # a worker that exited between the listing and the reading
    return total


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_python(module: str, *args: str, ready: str) -> subprocess.Popen[str]:
    """Start ``python -m module args``, returning once it prints a line containing ``ready``."""
    # (a PYTHONPATH already set comes after the project: nara bench forward --uvloop puts a sitecustomize there)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if ready in line:
            return process
    process.kill()
    raise RuntimeError(f"{module} did not start")


def stop(process: subprocess.Popen[str]) -> None:
    """Stop at once: SIGINT, as SIGTERM lets ``nara serve`` drain until its calls end."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


class NaraServer:
    """A `nara serve` process of its own, with its admin key at hand."""

    def __init__(self, data_dir: Path, options: Sequence[str] = ()) -> None:
        """``options``: more ``nara serve`` options, e.g. ``("--adaptation", "off")``."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.process = start_python("nara.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
                                    "--no-demo", *options, ready="listening on")
        self.admin = (data_dir / "admin-key").read_text().strip()

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.admin}"}) as http:
            async with http.request(method, f"{self.url}{path}", json=body) as response:
                return await response.json()

    async def consultation(self, title: str) -> str:
        return str((await self.api("POST", "/api/consultations", {"title": title}))["id"])

    async def token(self, room: str, name: str, role: str, participant_id: str | None = None) -> str:
        body = {"name": name, "role": role, **({"participant_id": participant_id} if participant_id else {})}
        return str((await self.api("POST", f"/api/consultations/{room}/tokens", body))["token"])

    def stop(self) -> None:
        stop(self.process)


class SfuProcess(NaraServer):
    """The SFU under test, sampled for CPU and memory: the server and its media worker processes together."""

    def __init__(self, workdir: Path, options: Sequence[str] = ()) -> None:
        super().__init__(workdir / "sfu-data", options)
        self._cpu = _total(cpu_seconds, with_children(self.process.pid))
        self._at = time.monotonic()

    def sample(self) -> tuple[float, float]:
        """(cores used since the last sample, resident memory in MB)."""
        pids = with_children(self.process.pid)
        cpu, now = _total(cpu_seconds, pids), time.monotonic()
        cores = (cpu - self._cpu) / max(now - self._at, 1e-6)
        self._cpu, self._at = cpu, now
        return cores, _total(resident_mb, pids)
