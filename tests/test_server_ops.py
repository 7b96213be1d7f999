"""Running the server for real: JSON logs without secrets, health endpoints, graceful drain, the UDP range.

Every test here runs a real `nara serve --config` process on loopback and real participants
(aiortc peers over the real WebSocket protocol) against it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from signalling import logs
from signalling.client import ConsultationClient, JoinRefused
from signalling.settings import redact_url

from .conftest import start_server
from .media_helpers import Watcher
from .ports import free_udp_pair

PROJECT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NaraProcess:
    """`nara serve --config FILE` with its stdout and stderr lines at hand as they come."""

    def __init__(self, tmp_path: Path, config: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp_path / "data"
        self.config = tmp_path / "nara.toml"
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f'[server]\nport = {self.port}\ndata_dir = "{self.data_dir}"\ndemo = false\n{config}')
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("NARA_")}
        self.process = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "nara.cli", "serve", "--config", str(self.config)],
            cwd=self.config.parent, env={**environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        loop = asyncio.get_running_loop()
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._collect, args=(stream, lines, loop), daemon=True).start()
        await self.wait_for(lambda: any("listening on" in line for line in self.stdout) or self.ended, 30)
        assert not self.ended, "".join(self.stderr)

    def _collect(self, stream: Any, lines: list[str], loop: asyncio.AbstractEventLoop) -> None:
        for line in stream:
            lines.append(line)
            self._wake(loop)
        self._wake(loop)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))
        except RuntimeError:
            pass  # (the test that waited is over and its loop closed: the server's last lines still count)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @property
    def ended(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def wait_for_log(self, text: str, timeout: float = 10) -> None:
        await self.wait_for(lambda: any(text in line for line in self.stderr), timeout)

    async def exit_code(self, timeout: float) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-key").read_text().strip()

    async def request(self, method: str, path: str, body: Any = None, key: str | None = "admin") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.admin_key if key == 'admin' else key}"} if key else {}
        async with aiohttp.ClientSession(headers=headers) as http, \
                http.request(method, f"{self.url}{path}", json=body) as response:
            return response.status, await response.json()

    async def consultation(self) -> str:
        status, data = await self.request("POST", "/api/consultations", {"title": "Hembesök"})
        assert status == 201, data
        return str(data["id"])

    async def token(self, room: str, name: str, role: str = "clinician") -> str:
        status, data = await self.request("POST", f"/api/consultations/{room}/tokens", {"name": name, "role": role})
        assert status == 201, data
        return str(data["token"])


@contextlib.asynccontextmanager
async def nara_serve(tmp_path: Path, config: str = "") -> AsyncIterator[NaraProcess]:
    served = NaraProcess(tmp_path, config)
    try:
        await served.start()
        yield served
    finally:
        served.stop()


async def publisher(served: NaraProcess, room: str, tag: int, **client_kw: Any) -> ConsultationClient:
    video = StampedVideoTrack(tag, width=160, height=120, fps=10)
    client = ConsultationClient(served.url, room, await served.token(room, f"P{tag}"), video=video,
                                audio=ToneAudioTrack(440.0 * tag), **client_kw)
    await client.join()
    return client


async def watching(
    served: NaraProcess, room: str, tags: set[int], name: str = "W", **client_kw: Any
) -> tuple[ConsultationClient, Watcher]:
    """A participant who publishes nothing and has seen video from every publisher in ``tags``."""
    client = ConsultationClient(served.url, room, await served.token(room, name, "observer"), publish=False,
                                **client_kw)
    await client.join()
    watcher = Watcher(client)
    await client.wait_for(lambda: len(client.remote_tracks) >= 2 * len(tags), 20)
    watcher.follow()
    await watcher.wait_for(lambda: tags <= set(watcher.frames), 20)
    return client, watcher


async def frames_continue(watcher: Watcher, tag: int, more: int = 10) -> None:
    """The publisher ``tag``'s pictures keep arriving: ``more`` new frames."""
    seen = len(watcher.frames[tag])
    await watcher.wait_for(lambda: len(watcher.frames[tag]) >= seen + more, 15)


# --- logs -----------------------------------------------------------------------------


def test_redaction_takes_out_tokens_keys_and_credentials_whatever_the_format() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwLTEifQ.c2lnbmF0dXJlLXBhcnQ"
    logs.hide("admin-key-value-0123456789")
    samples = {
        f"join link /c/r1#token={jwt}": jwt,
        "GET /api/uploads/u1?token=opaque-upload-token-99 HTTP/1.1": "opaque-upload-token-99",
        "headers: {'Authorization': 'Bearer admin-key-value-0123456789'}": "admin-key-value-0123456789",
        "Authorization: Basic dXNlcjpwYXNzd29yZA==": "dXNlcjpwYXNzd29yZA==",
        "connecting to redis://:redis-pass-42@127.0.0.1:6379/0": "redis-pass-42",
        '{"urls": ["turn:t.example.se"], "username": "1700000000:p1", "credential": "hmac-credential-77"}':
            "hmac-credential-77",
        "the key is admin-key-value-0123456789 now": "admin-key-value-0123456789",
    }
    for text, secret in samples.items():
        assert secret not in logs.redact(text), text
        assert logs.REDACTED in logs.redact(text)
    assert logs.redact("participant p-1 joined r1 (clinician)") == "participant p-1 joined r1 (clinician)"
    assert redact_url("redis://user:pw@host:6379") == "redis://user:***@host:6379"


def test_a_traceback_and_extra_fields_are_redacted_too() -> None:
    jwt = "eyJ0eXAiOiJKV1QifQ.eyJyb29tIjoicjEifQ.aGVsbG8tc2lnbmF0dXJl"
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(logs.RedactSecrets())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("nara.test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError(f"bad token {jwt}")
        except ValueError:
            logger.exception("join failed for %s", jwt, extra={"room": "r1", "token": jwt})
    finally:
        logger.removeHandler(handler)
    entry = json.loads(records[0])
    assert jwt not in records[0]
    assert entry["room"] == "r1" and entry["level"] == "error" and "ValueError" in entry["exception"]


async def test_json_logs_one_object_per_line_and_no_secret_anywhere(tmp_path: Path) -> None:
    turn_secret = "coturn-static-secret-abcdef"
    async with nara_serve(tmp_path, '\nlog_format = "json"\nlog_level = "debug"\n'
                          f'[turn]\nurls = ["turn:127.0.0.1:3478"]\nstatic_auth_secret = "{turn_secret}"\n') as served:
        room = await served.consultation()
        token = await served.token(room, "Dr A")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{served.url}/c/{room}?token={token}") as response:
                assert response.status == 200
            async with http.get(f"{served.url}/api/consultations",
                                headers={"Authorization": "Bearer wrong-key-0123456789"}) as response:
                assert response.status == 403
        forged = ConsultationClient(served.url, room, token + "x")
        with pytest.raises(JoinRefused):
            await forged.join()
        await forged.close()
        first = await publisher(served, room, 1, ice_servers=[])  # the TURN server named above is not there
        viewer, watcher = await watching(served, room, {1}, ice_servers=[])
        await watcher.stop()
        await viewer.close()
        await first.close()
        served.signal(signal.SIGTERM)
        assert await served.exit_code(30) == 0
        secrets = [token, served.admin_key, (served.data_dir / "token-secret").read_text().strip(), turn_secret]
    await served.wait_for(lambda: served.ended, 5)
    assert served.stderr, "the server logged something"
    entries = [json.loads(line) for line in served.stderr]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert any(f"/c/{room}?token={logs.REDACTED}" in entry["message"] for entry in entries), "the token was redacted"
    assert any(entry["logger"] == "signalling.ws" and "joined" in entry["message"] for entry in entries)
    output = "".join(served.stdout + served.stderr)
    for secret in secrets:
        assert secret not in output


async def test_each_participant_gets_a_turn_credential_of_its_own_that_expires(tmp_path: Path) -> None:
    secret = "coturn-static-secret-abcdef"
    running, runner = await start_server(tmp_path, turn_urls=["turn:127.0.0.1:3478?transport=udp"],
                                         turn_static_auth_secret=secret, turn_ttl=600)
    try:
        room = running.consultation()
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{running.url}/ws") as ws:
            token = running.token(room, "Dr A", participant_id="p-dr-a")
            await ws.send_json({"type": "join", "room": room, "token": token, "publish": False})
            joined = await ws.receive_json(timeout=10)
    finally:
        await runner.cleanup()
    [server] = joined["ice_servers"]
    assert server["urls"] == ["turn:127.0.0.1:3478?transport=udp"]
    expiry, name = server["username"].split(":")
    assert name == "p-dr-a" and 590 <= int(expiry) - time.time() <= 600
    expected = hmac.new(secret.encode(), server["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(server["credential"]) == expected, "what coturn's use-auth-secret accepts"


# --- health and drain -------------------------------------------------------------------


async def test_sigterm_drains_the_live_call_goes_on_and_the_process_exits_when_it_ends(tmp_path: Path) -> None:
    async with nara_serve(tmp_path) as served:
        status, body = await served.request("GET", "/health/live", key=None)
        assert (status, body) == (200, {"status": "alive"})
        status, body = await served.request("GET", "/health/ready", key=None)
        assert (status, body) == (200, {"status": "ready"})
        status, body = await served.request("POST", "/admin/drain", key=None)
        assert (status, body["error"]["code"]) == (401, "admin_key_missing")
        room, other = await served.consultation(), await served.consultation()
        first = await publisher(served, room, 1)
        viewer, watcher = await watching(served, room, {1})

        served.signal(signal.SIGTERM)
        await served.wait_for_log("draining (SIGTERM)")
        status, body = await served.request("GET", "/health/ready", key=None)
        assert (status, body["status"]) == (503, "draining")
        status, body = await served.request("POST", "/api/consultations", {"title": "Ny"})
        assert (status, body["error"]["code"]) == (503, "draining")
        elsewhere = ConsultationClient(served.url, other, await served.token(other, "Dr B"))
        with pytest.raises(JoinRefused) as refused:
            await elsewhere.join()
        assert refused.value.code == "draining"
        await elsewhere.close()
        late = ConsultationClient(served.url, room, await served.token(room, "Sköterska"), publish=False)
        await late.join()  # the consultation live here still takes its participants
        await frames_continue(watcher, 1)  # and its call goes on
        assert not served.ended

        for client in (late, viewer, first):
            await client.close()
        await watcher.stop()
        assert await served.exit_code(30) == 0
        await served.wait_for_log("drained")


async def test_a_second_sigterm_exits_at_once_and_the_drain_timeout_tells_participants(tmp_path: Path) -> None:
    async with nara_serve(tmp_path, "drain_timeout = 600\n") as served:
        room = await served.consultation()
        waiting = ConsultationClient(served.url, room, await served.token(room, "Dr A"), publish=False)
        await waiting.join()
        served.signal(signal.SIGTERM)
        await served.wait_for_log("draining (SIGTERM)")
        assert not served.ended
        served.signal(signal.SIGTERM)
        assert await served.exit_code(15) == 0
        await waiting.wait_for(lambda: waiting.ended, 10)
        await waiting.close()
    async with nara_serve(tmp_path / "timeout", "drain_timeout = 0.5\n") as served:
        room = await served.consultation()
        staying = ConsultationClient(served.url, room, await served.token(room, "Dr A"), publish=False)
        await staying.join()
        served.signal(signal.SIGTERM)
        await staying.wait_for(lambda: any(e["code"] == "server_restarting" for e in staying.errors), 15)
        assert await served.exit_code(15) == 0
        await staying.close()


# --- the UDP port range ------------------------------------------------------------------




def server_ports(client: ConsultationClient) -> set[int]:
    assert client.pc is not None and client.pc.remoteDescription is not None
    return {int(line.split()[5]) for line in client.pc.remoteDescription.sdp.splitlines()
            if line.startswith("a=candidate:")}


async def test_the_sfu_uses_only_its_port_range_and_a_full_range_refuses_the_newcomer_not_the_call(
    tmp_path: Path,
) -> None:
    low = free_udp_pair(49000)
    async with nara_serve(tmp_path, f'[media]\naddresses = ["127.0.0.1"]\nport_min = {low}\nport_max = {low + 1}\n') \
            as served:
        room = await served.consultation()
        first = await publisher(served, room, 1)
        viewer, watcher = await watching(served, room, {1})
        assert server_ports(first) | server_ports(viewer) == {low, low + 1}

        third = ConsultationClient(served.url, room, await served.token(room, "Anhörig", "relative"), publish=False)
        await third.join()
        await third.wait_for(lambda: third.ended, 15)
        assert [e["code"] for e in third.errors] == ["media_ports_exhausted"]
        await third.close()
        await frames_continue(watcher, 1)  # the call is untouched
        status, body = await served.request("GET", f"/api/consultations/{room}")
        assert len(body["participants"]) == 2

        await watcher.stop()
        assert viewer.participant is not None
        gone = viewer.participant["id"]
        await viewer.close()
        await first.wait_for(lambda: gone not in first.participants, 10)  # told once its connection is closed
        again = ConsultationClient(served.url, room, await served.token(room, "Anhörig", "relative"), publish=False)
        await again.join()
        await again.wait_for(lambda: again.ended or (again.pc is not None and again.pc.remoteDescription is not None),
                             15)
        assert not again.ended and server_ports(again) <= {low, low + 1}, "a freed port is used again"
        await again.close()
        await first.close()
