"""Helpers for the kit's upload tests: a kit assigned to a consultation, the care team's view of its images,
and an HTTP proxy that loses the server's answers to chosen PATCHes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from edge.device_api import DeviceCredential, read_credential
from tests.edge_helpers import admin, enrolled_kit


@dataclass
class AssignedKit:
    credential: DeviceCredential
    credential_path: Path
    room: str


async def assigned_kit(server_url: str, admin_key: str, tmp_path: Path, room: str) -> AssignedKit:
    """An enrolled kit, assigned to ``room``."""
    kit_id, path = await enrolled_kit(server_url, admin_key, tmp_path)
    await admin(server_url, admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    return AssignedKit(read_credential(path), path, room)


async def stored_images(server_url: str, room: str, token: str) -> list[dict[str, Any]]:
    """The consultation's images as the care team lists them, each with its bytes under ``"data"``."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{server_url}/api/consultations/{room}/images") as response:
            assert response.status == 200, await response.text()
            images: list[dict[str, Any]] = (await response.json())["images"]
        for image in images:
            async with http.get(f"{server_url}/api/images/{image['id']}", params={"consultation": room}) as response:
                assert response.status == 200, await response.text()
                image["data"] = await response.read()
                assert hashlib.sha256(image["data"]).hexdigest() == image["sha256"]
    return images


class Changes:
    """Wait for a condition that on_change callbacks announce (no polling, no sleeping)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self._event.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._event.clear()
                await self._event.wait()


_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class AnswerLosingProxy:
    """An HTTP proxy before the server: each request goes through, but the answers to the PATCHes numbered
    in ``lose`` (1 for the first) never come back: the proxy hangs up on the kit instead, after the server
    has acted on the chunk."""

    def __init__(self, target: str, lose: set[int]) -> None:
        self.target = target.rstrip("/")
        self.lose = lose
        self.patches = 0
        self.lost = 0
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._http = aiohttp.ClientSession(auto_decompress=False)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._http.request(request.method, self.target + request.path_qs, headers=headers,
                                      data=body or None) as answer:
            data = await answer.read()
            status, answer_headers = answer.status, answer.headers.copy()
        if request.method == "PATCH":
            self.patches += 1
            if self.patches in self.lose:
                self.lost += 1
                assert request.transport is not None
                request.transport.abort()  # the server kept the chunk; its answer is lost on the way
                return web.Response(status=204)  # written to nobody
        kept = {k: v for k, v in answer_headers.items() if k.lower() not in _HOP_HEADERS}
        return web.Response(status=status, headers=kept, body=data if request.method != "HEAD" else None)
