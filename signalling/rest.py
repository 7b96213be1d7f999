"""REST: consultations and join tokens, for administrators and booking systems.

Every endpoint under /api needs the admin key as a bearer token, except the home
kits' own and the clinician's "call the home kit" (devices.py). Errors are
JSON ``{"error": {"code": ..., "message": ...}}`` with a stable code.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mediaserver.errors import CodedError

from .store import patient_ref_problem
from .tokens import DEFAULT_TTL, MAX_TTL, ROLES
from .ws import HUB, SignallingHub

logger = logging.getLogger(__name__)

ADMIN_KEY: web.AppKey[str] = web.AppKey("admin_key", str)
MAX_BODY = 16 * 1024
# Routes under /api that check credentials of their own (devices.py): a home kit's enrolment code
# or device secret, or the admin key or a clinician's join token for the consultation; and the images'
# (images.py): a participant's join token, or the kit's device secret for an upload token.
SELF_AUTHENTICATED = frozenset({
    "device-enrol", "device-session", "kit-get", "kit-put", "kit-delete", "kit-call",
    "upload-options", "upload-create", "upload-head", "upload-patch",
    "images-list", "image-get", "image-thumbnail", "image-fhir", "device-upload-token",
})


class ApiError(CodedError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


def api_error(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, code, message)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response({"error": {"code": exc.code, "message": exc.message}}, status=exc.status)


@web.middleware
async def require_admin(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/api/") and request.match_info.route.name not in SELF_AUTHENTICATED:
        expected = request.app[ADMIN_KEY]
        header = request.headers.get("Authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not supplied:
            raise api_error(401, "admin_key_missing", "Send the admin key as 'Authorization: Bearer <key>'.")
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise api_error(403, "admin_key_invalid", "The admin key is not valid.")
    return await handler(request)


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise api_error(413, "body_too_large", f"Request bodies may be at most {MAX_BODY} bytes.")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise api_error(413, "body_too_large", f"Request bodies may be at most {MAX_BODY} bytes.")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise api_error(400, "body_malformed", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise api_error(400, "body_malformed", "The request body must be a JSON object.")
    return data


def consultation_json(hub: SignallingHub, consultation: Any,
                      participants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    kit = hub.devices.kit_status(consultation.id, hub.connected) if hub.devices else None
    placed = {"node": hub.cluster.id, "node_url": hub.cluster.settings.node_url} if hub.cluster else {}
    return {**consultation.public(), "participants": participants or [], "kit": kit, **placed}


async def consultation_view(hub: SignallingHub, consultation: Any) -> dict[str, Any]:
    """``consultation_json`` with everyone in its call now (asked of its media worker, if it is live)."""
    participants: list[dict[str, Any]] = []
    if hub.media.is_live(consultation.id):
        try:
            participants = await hub.media.participants(consultation.id)
        except CodedError as exc:  # its media worker stopped or is stuck: shown without them
            logger.warning("participants of %s unknown: %s", consultation.id, exc.code)
    return consultation_json(hub, consultation, participants)


def validated_consultation(data: dict[str, Any]) -> dict[str, Any]:
    """A new consultation's fields from a request body: title, scheduled_for and patient_ref."""
    title = data.get("title", "Konsultation")
    if not isinstance(title, str) or not 0 < len(title.strip()) <= 200:
        raise api_error(400, "title_invalid", "title must be text of 1 to 200 characters.")
    scheduled_for = data.get("scheduled_for")
    if scheduled_for is not None and (
        isinstance(scheduled_for, bool) or not isinstance(scheduled_for, (int, float))
    ):
        raise api_error(400, "scheduled_for_invalid", "scheduled_for must be a Unix time in seconds.")
    patient_ref = data.get("patient_ref")
    if patient_ref is not None and (problem := patient_ref_problem(patient_ref)):
        raise api_error(400, "patient_ref_invalid", problem)
    return {"title": title.strip(), "scheduled_for": scheduled_for, "patient_ref": patient_ref}


def requested_device(data: dict[str, Any]) -> str | None:
    """The optional ``device_id`` of a new consultation: the home kit to assign to it."""
    device_id = data.get("device_id")
    if device_id is not None and (not isinstance(device_id, str) or not 0 < len(device_id) <= 64):
        raise api_error(400, "device_id_invalid", "device_id must be a home kit's device id.")
    return device_id


async def create_consultation(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    data = await json_body(request)
    fields, device_id = validated_consultation(data), requested_device(data)
    if hub.cluster is not None:  # on the least-loaded node of the cluster, or the kit's (cluster.py)
        placed = await hub.cluster.place(fields, request.headers.get("Authorization", ""),
                                         lambda c: consultation_json(hub, c), device_id)
        return web.json_response(placed, status=201)
    if device_id is not None:
        if hub.devices is None:
            raise api_error(404, "device_unknown", "This server serves no home kits.")
        hub.devices.assignable(device_id)  # refused before anything is stored
    consultation = hub.store.create(**fields)
    if device_id is not None and hub.devices is not None:
        hub.devices.assign(consultation.id, device_id)
    return web.json_response(consultation_json(hub, consultation), status=201)


async def list_consultations(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    return web.json_response({"consultations": [await consultation_view(hub, c) for c in hub.store.list()]})


async def get_consultation(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    consultation = hub.store.get(request.match_info["id"])
    if consultation is None:
        raise api_error(404, "consultation_not_found", "There is no consultation with this id.")
    return web.json_response(await consultation_view(hub, consultation))


def join_url(hub: SignallingHub, room: str, token: str, base_url: str | None = None) -> str:
    # The token rides in the fragment, which browsers never send to a server,
    # so it stays out of access logs and proxies.
    return f"{base_url or hub.config.base_url}/c/{room}#token={token}"


async def mint_token(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    room = request.match_info["id"]
    base_url = hub.config.base_url
    if hub.store.get(room) is None:
        owner = await hub.cluster.owner(room) if hub.cluster is not None else None
        if owner is None:
            raise api_error(404, "consultation_not_found", "There is no consultation with this id.")
        base_url = owner.url  # every node shares the token keys: the link only has to lead to the owner
    data = await json_body(request)
    name, role = data.get("name"), data.get("role")
    ttl = data.get("ttl_seconds", DEFAULT_TTL)
    participant_id = data.get("participant_id")
    if not isinstance(name, str):
        raise api_error(400, "name_invalid", "name is required: the participant's display name.")
    if role not in ROLES:
        raise api_error(400, "role_invalid", f"role must be one of: {', '.join(ROLES)}.")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL:
        raise api_error(400, "ttl_invalid", f"ttl_seconds must be a whole number from 1 to {MAX_TTL}.")
    if participant_id is not None and not isinstance(participant_id, str):
        raise api_error(400, "participant_id_invalid", "participant_id must be text.")
    try:
        token, claims = hub.authority.mint(room, name, role, ttl, participant_id)
    except ValueError as exc:
        raise api_error(400, "token_request_invalid", str(exc)) from None
    return web.json_response(
        {
            "token": token,
            "participant_id": claims.participant_id,
            "role": claims.role,
            "expires_at": claims.expires_at,
            "join_url": join_url(hub, room, token, base_url),
        },
        status=201,
    )


async def forwarding_stats(request: web.Request) -> web.Response:
    return web.json_response({"rooms": await request.app[HUB].media.stats()})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", **request.app[HUB].media.counts()})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/consultations", create_consultation)
    app.router.add_get("/api/consultations", list_consultations)
    app.router.add_get("/api/consultations/{id}", get_consultation)
    app.router.add_post("/api/consultations/{id}/tokens", mint_token)
    app.router.add_get("/api/stats", forwarding_stats)
    app.router.add_get("/healthz", health)
