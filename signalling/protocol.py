"""The signalling protocol's client messages, validated (see docs/protocol.md).

Every inbound WebSocket message goes through ``parse_client_message``. It
either returns one of the dataclasses below or raises ``ProtocolError`` with a
stable code; nothing unvalidated reaches the room.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mediaserver.errors import CodedError

from .bodysites import BODY_SITES

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 128 * 1024
MAX_SDP_BYTES = 100 * 1024
KINDS = ("audio", "video")
MAX_PHOTO_NOTE = 2000


class ProtocolError(CodedError):
    """A signalling message was refused."""


@dataclass(frozen=True)
class Join:
    room: str
    token: str
    publish: bool
    uplink_feedback: bool = False  # the client stamps what it sends and reads the server's transport feedback


@dataclass(frozen=True)
class Answer:
    sdp: str


@dataclass(frozen=True)
class Mute:
    kind: str
    muted: bool


@dataclass(frozen=True)
class Ping:
    id: int | str | None


@dataclass(frozen=True)
class Leave:
    pass


@dataclass(frozen=True)
class RequestPhoto:
    """A clinician or nurse asks the kit for a photo (docs/images.md, "Events")."""

    body_site: str | None
    note: str | None


ClientMessage = Join | Answer | Mute | Ping | Leave | RequestPhoto


def error_message(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    if name not in data:
        if required:
            raise ProtocolError("message_invalid", f"Field '{name}' is required.")
        return None
    value = data[name]
    # bool is an int in Python; never accept it where a number or text is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError("message_invalid", f"Field '{name}' has the wrong type.")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _text(data: dict[str, Any], name: str, limit: int) -> str:
    value: str = _field(data, name, str)
    if not value or len(value) > limit:
        raise ProtocolError("message_invalid", f"Field '{name}' must be 1 to {limit} characters.")
    return value


def parse_client_message(raw: str | bytes) -> ClientMessage:
    if isinstance(raw, bytes):
        raise ProtocolError("message_malformed", "Messages must be JSON text, not binary.")
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message_too_large", f"Messages may be at most {MAX_MESSAGE_BYTES} bytes.")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError("message_malformed", "The message is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ProtocolError("message_malformed", "A message must be a JSON object.")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("message_invalid", "Field 'type' is required.")
    if kind == "join":
        publish = _field(data, "publish", bool, required=False)
        uplink_feedback = _field(data, "uplink_feedback", bool, required=False)
        return Join(room=_text(data, "room", 64), token=_text(data, "token", 4096),
                    publish=True if publish is None else publish, uplink_feedback=bool(uplink_feedback))
    if kind == "answer":
        sdp = _text(data, "sdp", MAX_SDP_BYTES)
        if not sdp.startswith("v=0"):
            raise ProtocolError("sdp_invalid", "The answer is not an SDP session description.")
        return Answer(sdp=sdp)
    if kind == "mute":
        media = _field(data, "kind", str)
        if media not in KINDS:
            raise ProtocolError("message_invalid", "Field 'kind' must be 'audio' or 'video'.")
        return Mute(kind=media, muted=_field(data, "muted", bool))
    if kind == "ping":
        ping_id = _field(data, "id", (int, str), required=False)
        if isinstance(ping_id, str) and len(ping_id) > 64:
            raise ProtocolError("message_invalid", "Field 'id' is too long.")
        return Ping(id=ping_id)
    if kind == "leave":
        return Leave()
    if kind == "request-photo":
        body_site = _field(data, "body_site", str, required=False)
        if body_site is not None and body_site not in BODY_SITES:
            raise ProtocolError("message_invalid", "Field 'body_site' must be one of the body sites in docs/images.md.")
        note = _field(data, "note", str, required=False)
        if note is not None and len(note) > MAX_PHOTO_NOTE:
            raise ProtocolError("message_invalid", f"Field 'note' may be at most {MAX_PHOTO_NOTE} characters.")
        return RequestPhoto(body_site=body_site, note=note or None)
    raise ProtocolError("message_unknown_type", f"Unknown message type {kind[:40]!r}.")
