"""What the main process and an SFU worker process say to each other.

One stream (a Unix socketpair) per worker carries frames: a 4-byte big-endian
length, then that many bytes of one UTF-8 JSON object. The main process sends
*requests*; the worker answers each with a *reply* carrying the same ``id``,
and sends *events* of its own at any time. Frames on the stream keep their
order, so every event a request caused (an offer signalled during a join)
reaches the main process before that request's reply.

Requests (main → worker), ``{"id": n, "op": ..., **arguments}``:

* ``start``: ``ice_servers``, ``addresses`` (null: every interface), ``adaptation``,
  ``port_range`` (null or ``[low, high]``): set up the worker's ``MediaServer``; the reply is its ``pid``.
* ``join``: ``room``, ``session`` (the main process's number for this connection),
  ``info`` (``id``, ``name``, ``role``, ``can_publish``).
* ``leave``: ``room``, ``session``. ``answer``: ``session``, ``sdp``. ``negotiate``: ``session``.
* ``mute``: ``session``, ``kind``, ``muted``. ``participants``: ``room``.
* ``stats``, ``figures``: the forwarding stats, every participant's figures.
* ``forwarding_delay``: how long the worker held the copies it forwarded since it started (the histogram's
  ``counts`` and ``sum_ns``, ``forwarding_delay.py``).

Replies (worker → main): ``{"id": n, "ok": true, "result": ...}`` or
``{"id": n, "ok": false, "error": {"code", "message", "class"}}``: a refusal keeps
its stable code (``CodedError``) across the boundary; ``class`` names the kind
(``media``, ``ports``) so the main process raises the same exception type.
Replies about a session carry ``awaiting_answer``.

Events (worker → main), ``{"event": ...}``:

* ``signal``: ``session``, ``message`` (a message for
  that participant's WebSocket). ``failed``: ``session``, ``code`` (its media failed).
* ``changed``: the media state changed (joins, levels, layers). ``load``: ``rooms``, ``participants``.

A worker whose stream reaches its end (the main process exited or died) closes
its rooms and exits: no worker outlives its server.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from .aiortc_adapter import MediaPortsExhausted
from .errors import CodedError, MediaError
from .figures import ConsultationFigures, ParticipantFigures, VideoReceived

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # a figures reply of a busy worker is far below this; anything larger is a fault

Message = dict[str, Any]


class ProtocolFault(Exception):
    """The other end sent something that is not a frame of this protocol: the stream cannot be trusted."""


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at the end of the stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolFault("the stream ended inside a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolFault(f"a frame of {length} bytes is over the limit")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolFault("the stream ended inside a frame") from None
    try:
        message = json.loads(body)
    except ValueError:
        raise ProtocolFault("a frame is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolFault("a frame is not a JSON object")
    return message


# --- errors across the boundary ---------------------------------------------------


def error_json(exc: CodedError) -> dict[str, str]:
    kind = "ports" if isinstance(exc, MediaPortsExhausted) else "media" if isinstance(exc, MediaError) else "coded"
    return {"code": exc.code, "message": exc.message, "class": kind}


def error_from_json(data: Any) -> CodedError:
    if not isinstance(data, dict):
        return CodedError("media_worker_fault", "The media worker answered with something that is not an error.")
    code, message = str(data.get("code", "media_worker_fault")), str(data.get("message", ""))
    kind = data.get("class")
    if kind == "ports":
        error: CodedError = MediaPortsExhausted.__new__(MediaPortsExhausted)
        CodedError.__init__(error, code, message)
        return error
    if kind == "media":
        return MediaError(code, message)
    return CodedError(code, message)


# --- figures across the boundary ---------------------------------------------------


def figures_json(consultations: list[ConsultationFigures]) -> list[Any]:
    return [consultation_json(c) for c in consultations]


def consultation_json(consultation: ConsultationFigures) -> dict[str, Any]:
    """One consultation's figures as JSON-ready data (field by field: ``dataclasses.asdict`` copies every
    value deeply, and took a busy worker's loop about 10 ms for 200 participants)."""
    return {"consultation": consultation.consultation, "started_at": consultation.started_at,
            "participants": [{**vars(p), "video": [vars(v) for v in p.video]} for p in consultation.participants]}


class EncodedItems:
    """A reply's result that is a list of items already encoded as JSON, each on its own: a large answer
    (every participant's figures) is encoded a piece at a time, and the worker's loop forwards media in
    between (``json.dumps`` of a busy worker's figures at once held it for several ms)."""

    def __init__(self, items: list[bytes]) -> None:
        self.items = items


def encode_reply(request_id: Any, result: EncodedItems) -> bytes:
    """The frame of ``{"id": request_id, "ok": true, "result": [...]}`` around already encoded items."""
    body = b"".join((b'{"id":', json.dumps(request_id).encode(), b',"ok":true,"result":[', b",".join(result.items),
                     b"]}"))
    return HEADER.pack(len(body)) + body


def figures_from_json(data: list[Any]) -> list[ConsultationFigures]:
    consultations = []
    for c in data:
        participants = []
        for p in c["participants"]:
            fields = dict(p)
            fields["uplink_packets"] = {k: (int(v[0]), int(v[1])) for k, v in p["uplink_packets"].items()}
            fields["video"] = [VideoReceived(**v) for v in p["video"]]
            participants.append(ParticipantFigures(**fields))
        consultations.append(ConsultationFigures(c["consultation"], c["started_at"], participants))
    return consultations
