"""The kit's own screen: a page on localhost that the kit's browser shows full screen.

The agent owns the call; the page only shows it. It gets the agent's state
over a local WebSocket (``/events``: the whole status as JSON at once and at
every change) and the pictures as JPEGs it fetches a few times a second
(``/video/remote.jpg``: the care team's newest picture; ``/video/self.jpg``:
the kit's own camera). Texts are in ``edge/static/lang/{sv,en}.json``.
"""

from __future__ import annotations

import asyncio
import fractions
import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import Any

import av
from aiohttp import WSMsgType, web

from .agent import KitAgent

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
JPEG_WIDTH = 640


def encode_jpeg(frame: av.VideoFrame, max_width: int = JPEG_WIDTH) -> bytes:
    """A JPEG of ``frame``, scaled down to ``max_width`` if wider."""
    width, height = frame.width, frame.height
    if width > max_width:
        width, height = max_width, round(height * max_width / width) & ~1
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuvj420p"
    codec.time_base = fractions.Fraction(1, 15)
    codec.options = {"qscale": "5"}
    picture = frame.reformat(width=width, height=height, format="yuvj420p")
    picture.pts = 0
    return b"".join(bytes(p) for p in codec.encode(picture))


class JpegCache:
    """Encodes each picture once, however many times the page asks for it."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[int, bytes]] = {}

    async def jpeg(self, name: str, frame: av.VideoFrame | None) -> bytes | None:
        if frame is None:
            return None
        cached = self._made.get(name)
        if cached is not None and cached[0] == id(frame):
            return cached[1]
        data = await asyncio.get_running_loop().run_in_executor(None, encode_jpeg, frame)
        self._made[name] = (id(frame), data)
        return data


AGENT: web.AppKey[KitAgent] = web.AppKey("agent", KitAgent)
PICTURES: web.AppKey[JpegCache] = web.AppKey("pictures", JpegCache)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT].status())


async def vitals(request: web.Request) -> web.Response:
    """The agent process's tasks and open files, for soak runs and monitoring."""
    return web.json_response({"tasks": len(asyncio.all_tasks()), "fds": len(os.listdir("/proc/self/fd"))})


async def events(request: web.Request) -> web.WebSocketResponse:
    agent = request.app[AGENT]
    ws = web.WebSocketResponse(heartbeat=10)
    await ws.prepare(request)

    async def push() -> None:
        last: dict[str, Any] | None = None
        while not ws.closed:
            current = agent.status()
            if current != last:
                await ws.send_str(json.dumps(current, ensure_ascii=False))
                last = current
            async with agent.changed:
                await agent.changed.wait()

    pusher = asyncio.ensure_future(push())
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
    finally:
        pusher.cancel()
    return ws


async def _picture(request: web.Request, name: str, frame: av.VideoFrame | None) -> web.Response:
    data = await request.app[PICTURES].jpeg(name, frame)
    if data is None:
        return web.Response(status=204, headers={"Cache-Control": "no-store"})
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "no-store"})


async def remote_picture(request: web.Request) -> web.Response:
    picture = request.app[AGENT].remote.picture
    return await _picture(request, "remote", picture.frame if picture is not None else None)


async def self_picture(request: web.Request) -> web.Response:
    media = request.app[AGENT].media
    return await _picture(request, "self", media.self_view() if media is not None else None)


@web.middleware
async def local_only(request: web.Request, handler: Any) -> web.StreamResponse:
    """The page shows a patient's room: it answers the kit's own screen only."""
    if request.remote is None or not ipaddress.ip_address(request.remote).is_loopback:
        raise web.HTTPForbidden(text="The kit's page is only for the kit's own screen.")
    response: web.StreamResponse = await handler(request)
    return response


def build_page(agent: KitAgent) -> web.Application:
    app = web.Application(middlewares=[local_only])
    app[AGENT] = agent
    app[PICTURES] = JpegCache()
    app.router.add_get("/", index)
    app.router.add_get("/status", status)
    app.router.add_get("/events", events)
    app.router.add_get("/vitals", vitals)
    app.router.add_get("/video/remote.jpg", remote_picture)
    app.router.add_get("/video/self.jpg", self_picture)
    app.router.add_static("/static/", STATIC)
    return app


async def start_page(agent: KitAgent, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the page; returns the runner (for cleanup) and the port (useful when ``port`` is 0)."""
    runner = web.AppRunner(build_page(agent), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, int(bound)
