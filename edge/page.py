"""The kit's own screen: a page on localhost that the kit's browser shows full screen.

The agent owns the call; the page only shows it. It gets the agent's state
over a local WebSocket (``/events``: the whole status as JSON at once and at
every change) and the pictures as JPEGs it fetches a few times a second
(``/video/remote.jpg``: the care team's newest picture; ``/video/self.jpg``:
the kit's own camera). Texts are in ``edge/static/lang/{sv,en}.json``.

The photo flow (``edge/photo_flow.py``): ``POST /photo/take`` takes and judges
a still, ``GET /photo/{id}/preview.jpg`` shows it, ``POST /photo/{id}/discard``
drops it ("Ta om"), ``POST /photo/{id}/save`` keeps it in the outbox with the
form; ``GET /photo/sites`` is the body-site list. A clinician's request and
the queue are in the status.
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
from aiohttp import WSCloseCode, WSMsgType, web

from .agent import KitAgent
from .media import StillFailed
from .outbox import OutboxError
from .photo_flow import PhotoFormError, body_sites

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
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets", set)


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
    request.app[SOCKETS].add(ws)

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
        request.app[SOCKETS].discard(ws)
    return ws


async def close_sockets(app: web.Application) -> None:
    """An open screen must not hold up the agent's stop (systemd waits for it)."""
    sockets: set[web.WebSocketResponse] = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the kit is stopping")


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


# --- the photo flow ----------------------------------------------------------------------------


def _error(status: int, code: str, message: str, **extra: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


async def photo_sites(request: web.Request) -> web.Response:
    return web.json_response({"body_sites": body_sites()})


async def photo_take(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    if agent.media is None:
        return _error(503, "no_camera", "the kit's camera is not open yet")
    try:
        pending = await agent.photos.take(agent.media)
    except StillFailed as exc:
        logger.warning("photo: the still failed: %s", exc)
        return _error(503, exc.code, exc.detail)
    return web.json_response(pending.public())


async def photo_preview(request: web.Request) -> web.Response:
    pending = request.app[AGENT].photos.pending
    if pending is None or pending.id != request.match_info["photo_id"]:
        return _error(404, "photo_gone", "this photo is no longer on the screen")
    return web.Response(body=pending.examined.preview, content_type="image/jpeg",
                        headers={"Cache-Control": "no-store"})


async def photo_discard(request: web.Request) -> web.Response:
    request.app[AGENT].photos.discard(request.match_info["photo_id"])
    return web.Response(status=204)


async def photo_save(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    try:
        form = await request.json()
    except ValueError:
        return _error(400, "form_invalid", "the form is not JSON")
    if not isinstance(form, dict):
        return _error(400, "form_invalid", "the form is not a JSON object")
    try:
        item = await agent.save_photo(request.match_info["photo_id"], form)
    except PhotoFormError as exc:
        return _error(404 if exc.code == "photo_gone" else 400, exc.code, exc.message, field=exc.field)
    except OutboxError as exc:
        logger.error("photo: could not be kept: %s", exc)
        return _error(507, exc.code, exc.message)
    return web.json_response(item.public(), status=201)


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
    app[SOCKETS] = set()
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/", index)
    app.router.add_get("/status", status)
    app.router.add_get("/events", events)
    app.router.add_get("/vitals", vitals)
    app.router.add_get("/video/remote.jpg", remote_picture)
    app.router.add_get("/video/self.jpg", self_picture)
    app.router.add_get("/photo/sites", photo_sites)
    app.router.add_post("/photo/take", photo_take)
    app.router.add_get("/photo/{photo_id}/preview.jpg", photo_preview)
    app.router.add_post("/photo/{photo_id}/discard", photo_discard)
    app.router.add_post("/photo/{photo_id}/save", photo_save)
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
