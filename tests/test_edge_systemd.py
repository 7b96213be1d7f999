"""systemd's notify protocol over a real unix datagram socket: READY, STATUS, and a watchdog fed by the loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.process import PROJECT, free_port
from edge.systemd import Notifier


@contextlib.contextmanager
def notify_socket(path: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + path[1:] if path.startswith("@") else path)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def receive(sock: socket.socket, timeout: float = 10.0) -> str:
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)).decode()


@pytest.mark.parametrize("abstract", [False, True])
async def test_ready_and_status_reach_the_socket(tmp_path: Path, abstract: bool) -> None:
    address = f"@nara-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with notify_socket(address) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": address})
        assert notifier.ready("waiting for a call")
        assert await receive(sock) == "READY=1\nSTATUS=waiting for a call"
        assert notifier.status("connected")
        assert await receive(sock) == "STATUS=connected"
        notifier.close()


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert notifier.watchdog_interval is None


def test_watchdog_for_another_process_is_not_ours() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None
    notifier = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == 5.0


async def test_a_stuck_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})  # a ping every 50 ms
        task = asyncio.ensure_future(notifier.keep_watchdog())
        try:
            for _ in range(3):
                assert await receive(sock) == "WATCHDOG=1"
            time.sleep(0.6)  # noqa: ASYNC251 -- the event loop is stuck on purpose: twelve pings are due, none can go out
            waiting = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    waiting.append(sock.recv(4096))
            assert len(waiting) <= 1  # at most the one sent just before the loop got stuck
            assert await receive(sock, 1.0) == "WATCHDOG=1"  # and they come again once it turns
        finally:
            task.cancel()
            notifier.close()


async def test_nara_edge_run_is_ready_once_its_page_answers_and_feeds_the_watchdog(tmp_path: Path) -> None:
    page_port = free_port()
    config = tmp_path / "edge.toml"
    config.write_text(f'server = "http://127.0.0.1:9"\ncredential = "{tmp_path / "none.json"}"\n'
                      f'camera = "none"\nmicrophone = "none"\npage = "127.0.0.1:{page_port}"\n')
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        env = {**os.environ, "PYTHONPATH": str(PROJECT), "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nara.cli", "edge", "run", "--config", str(config), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            messages = [await receive(sock, 30)]
            while not any("STATUS=not set up" in m for m in messages):
                messages.append(await receive(sock))
            # Ready came first, once the kit's screen was there; it says what is wrong.
            assert "READY=1" in messages[0]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{page_port}/status") as response:
                    status = await response.json()
            assert status["state"] == "config_error" and "enrol" in status["reason"]
            pings = 0
            while pings < 3:
                pings += await receive(sock) == "WATCHDOG=1"
            process.terminate()
            while "STOPPING=1" not in await receive(sock):
                pass
            assert await asyncio.wait_for(process.wait(), 20) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
