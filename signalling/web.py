"""The browser client: the consultation page, the tablet kit page, their static files, and the link check.

The pages are plain ES modules with no build step. A join link looks like
``/c/<consultation>#token=<jwt>``; the token stays in the fragment, so it never
reaches a server log. Before asking for camera and microphone, the page asks
``POST /join/check`` whether the link is still good, so an expired link or a
link for another consultation gets a clear page instead of a failed call.

``/kit/<consultation>#token=<jwt>`` (a ``kit`` or ``nurse`` token) is the tablet
kit page: it joins the call and takes, describes and uploads wound photos
(docs/images.md). Both pages read the fixed list of body sites from
``/body-sites``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from mediaserver.errors import CodedError

from .bodysites import BODY_SITES
from .tokens import TokenError
from .ws import HUB

if TYPE_CHECKING:
    from .cluster import ClusterNode

STATIC = Path(__file__).parent / "static"
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob:; connect-src 'self' ws: wss:; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


async def consultation_page(request: web.Request) -> web.StreamResponse:
    await _send_to_owner(request)
    return web.FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def kit_page(request: web.Request) -> web.StreamResponse:
    await _send_to_owner(request)
    return web.FileResponse(STATIC / "kit.html", headers=PAGE_HEADERS)


async def _send_to_owner(request: web.Request) -> None:
    """In a cluster, a page for a consultation another node holds answers 307 to that node.

    The browser keeps the link's fragment (the token) across the redirect. When the
    owner cannot be found now, the page is served here and its join is redirected later.
    """
    hub = request.app[HUB]
    room = request.match_info["room"]
    if hub.cluster is None or hub.store.get(room) is not None:
        return
    try:
        owner = await hub.cluster.owner(room)
    except CodedError:
        return
    if owner is not None:
        raise web.HTTPTemporaryRedirect(f"{owner.url}{request.rel_url}", headers=NO_STORE)


def kit_url(base_url: str, room: str, token: str) -> str:
    """The tablet kit page's link; the token rides in the fragment like a join link's."""
    return f"{base_url}/kit/{room}#token={token}"


async def body_sites(request: web.Request) -> web.Response:
    """The body sites an image may show, with their names, in the list's order."""
    sites = [{"key": site.key, "label": site.label()} for site in BODY_SITES.values()]
    return web.json_response({"body_sites": sites}, headers={"Cache-Control": "max-age=3600"})


async def check_link(request: web.Request) -> web.Response:
    """Is this join link usable? Answers who it is for, or why not."""
    hub = request.app[HUB]
    try:
        data = json.loads(await request.content.read(8192))
        room, token = data["room"], data["token"]
        if not isinstance(room, str) or not isinstance(token, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return web.json_response(
            {"error": {"code": "body_malformed", "message": "Send {\"room\": ..., \"token\": ...}."}},
            status=400, headers=NO_STORE)
    consultation = hub.store.get(room)
    if consultation is None and hub.cluster is not None:
        return await _check_at_owner(hub.cluster, room, token)
    if consultation is None or consultation.status != "open":
        return web.json_response(
            {"error": {"code": "room_not_found", "message": "There is no open consultation with this id."}},
            status=404, headers=NO_STORE)
    try:
        claims = hub.authority.verify(token, room)
    except TokenError as exc:
        return web.json_response({"error": {"code": exc.code, "message": exc.message}},
                                 status=403, headers=NO_STORE)
    return web.json_response(
        {
            "participant": {"id": claims.participant_id, "name": claims.name, "role": claims.role},
            "may_publish": claims.may_publish,
            "room": {"id": consultation.id, "title": consultation.title},
            "expires_at": claims.expires_at,
        },
        headers=NO_STORE,
    )


async def _check_at_owner(cluster: ClusterNode, room: str, token: str) -> web.Response:
    """In a cluster, the node that holds the consultation answers for it (this page's join is redirected there)."""
    try:
        owner = await cluster.owner(room)
        if owner is None:
            status, body = 404, {"error": {"code": "room_not_found",
                                           "message": "There is no open consultation with this id."}}
        else:
            status, body = await cluster.ask_owner(owner, "/join/check", {"room": room, "token": token})
    except CodedError as exc:
        status, body = 503, {"error": {"code": exc.code, "message": exc.message}}
    return web.json_response(body, status=status, headers=NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/c/{room}", consultation_page)
    app.router.add_get("/kit/{room}", kit_page)
    app.router.add_get("/body-sites", body_sites)
    app.router.add_post("/join/check", check_link)
    app.router.add_static("/static/", STATIC, append_version=False)
