"""The signalling protocol over a real WebSocket: refusals, validation, limits."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import pytest

from bench.synthetic import StampedVideoTrack
from signalling.client import ConsultationClient
from signalling.protocol import MAX_MESSAGE_BYTES

from .conftest import RunningServer, start_server


@asynccontextmanager
async def socket(server: RunningServer) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws") as ws:
            yield ws


async def reply(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)  # type: ignore[no-any-return]


async def refused_join(server: RunningServer, room: str, token: str, publish: bool = True) -> tuple[str, int]:
    async with socket(server) as ws:
        await ws.send_json({"type": "join", "room": room, "token": token, "publish": publish})
        error = await reply(ws)
        assert error["type"] == "error" and error["message"]
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        return error["code"], ws.close_code or 0


def forged(server: RunningServer, room: str, algorithm: str = "HS256", key: Any = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "p1", "name": "X", "role": "nurse", "room": room, "iss": "nara", "aud": "nara",
               "iat": now, "exp": now + 600, "jti": "j1", **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    if key is None and algorithm == "HS256":
        key = server.hub.authority.keys.signing_key
    return jwt.encode(payload, key, algorithm=algorithm)


async def test_join_refusals_each_have_their_code(server: RunningServer) -> None:
    room = server.consultation()
    other = server.consultation()
    now = int(time.time())
    cases = {
        "token_alg_none": forged(server, room, algorithm="none"),
        "token_alg_not_allowed": forged(server, room, algorithm="HS384", key=b"k" * 64),
        "token_bad_signature": forged(server, room, key=b"wrong" * 10),
        "token_expired": forged(server, room, iat=now - 3600, exp=now - 100),
        "token_not_yet_valid": forged(server, room, iat=now + 3600, exp=now + 4000),
        "token_wrong_audience": forged(server, room, aud="elsewhere"),
        "token_wrong_issuer": forged(server, room, iss="elsewhere"),
        "token_wrong_room": server.token(other),
        "token_malformed": "garbage",
    }
    for code, token in cases.items():
        got, close_code = await refused_join(server, room, token)
        assert got == code
        assert close_code == 4001
    assert (await refused_join(server, "no-such-room", server.token("no-such-room")))[0] == "room_not_found"
    assert not server.hub.media.rooms, "no refused join may leave anything behind"


async def test_observer_may_watch_but_not_publish(server: RunningServer) -> None:
    room = server.consultation()
    token = server.token(room, "Student", "observer")
    assert (await refused_join(server, room, token, publish=True))[0] == "publish_not_allowed"
    async with socket(server) as ws:
        await ws.send_json({"type": "join", "room": room, "token": token, "publish": False})
        joined = await reply(ws)
        assert joined["type"] == "joined"
        assert joined["participant"]["role"] == "observer"
        # Nothing to receive yet, so no offer; the first publisher brings one.
        publisher = ConsultationClient(server.url, room, server.token(room, "Nurse", "nurse"),
                                       video=StampedVideoTrack(1, 160, 120, 5))
        await publisher.join()
        try:
            messages = [await reply(ws) for _ in range(3)]
            offer = next(m for m in messages if m["type"] == "offer")
            assert offer["publish"] == {}
            assert {t["kind"] for t in offer["tracks"]} == {"video"}
        finally:
            await publisher.close()


async def test_malformed_messages_get_errors_and_change_nothing(server: RunningServer) -> None:
    room = server.consultation()
    async with socket(server) as ws:
        bad = {
            "not json": "message_malformed",
            "[1, 2]": "message_malformed",
            json.dumps({"no": "type"}): "message_invalid",
            json.dumps({"type": "shout"}): "message_unknown_type",
            json.dumps({"type": "join", "room": 5, "token": "x"}): "message_invalid",
            json.dumps({"type": "join", "room": room}): "message_invalid",
            json.dumps({"type": "mute", "kind": "smell", "muted": True}): "message_invalid",
            json.dumps({"type": "mute", "kind": "audio", "muted": 1}): "message_invalid",
            json.dumps({"type": "answer", "sdp": "v=0"}): "not_joined",
            json.dumps({"type": "answer", "sdp": "hello"}): "sdp_invalid",
            json.dumps({"type": "leave"}): "not_joined",
            "x" * (MAX_MESSAGE_BYTES + 10): "message_too_large",
        }
        for raw, code in bad.items():
            await ws.send_str(raw)
            error = await reply(ws)
            assert (error["type"], error["code"]) == ("error", code), raw[:60]
        await ws.send_bytes(b"\x00\x01")
        assert (await reply(ws))["code"] == "message_malformed"
        # the connection is still good for a real join
        await ws.send_json({"type": "ping", "id": 7})
        assert await reply(ws) == {"type": "pong", "id": 7}
        await ws.send_json({"type": "join", "room": room, "token": server.token(room)})
        assert (await reply(ws))["type"] == "joined"
        assert (await reply(ws))["type"] == "offer"
        await ws.send_json({"type": "join", "room": room, "token": server.token(room)})
        assert (await reply(ws))["code"] == "already_joined"
        await ws.send_json({"type": "answer", "sdp": "v=0\r\nnonsense"})
        assert (await reply(ws))["code"] == "sdp_invalid"


async def test_answer_out_of_order_is_refused(server: RunningServer) -> None:
    room = server.consultation()
    async with socket(server) as ws:
        await ws.send_json({"type": "join", "room": room, "token": server.token(room)})
        assert (await reply(ws))["type"] == "joined"
        offer = await reply(ws)
        assert offer["type"] == "offer"
        # an answer to an offer nobody made: refuse the second one
        from aiortc import RTCPeerConnection, RTCSessionDescription

        pc = RTCPeerConnection()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            await ws.send_json({"type": "answer", "sdp": pc.localDescription.sdp})
            await ws.send_json({"type": "answer", "sdp": pc.localDescription.sdp})
            error = await reply(ws)
            assert error["code"] == "unexpected_answer"
        finally:
            await pc.close()


async def test_a_flood_is_rate_limited_then_closed(server: RunningServer) -> None:
    async with socket(server) as ws:
        for i in range(300):
            await ws.send_json({"type": "ping", "id": i})
        codes: list[str] = []
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if data["type"] == "error":
                codes.append(data["code"])
        assert "rate_limited" in codes
        assert ws.close_code == 1008


async def test_silent_connection_is_closed_at_the_heartbeat_deadline(tmp_path: Any) -> None:
    running, runner = await start_server(tmp_path, heartbeat_timeout=0.5, heartbeat_interval=0.2)
    try:
        room = running.consultation()
        async with socket(running) as ws:
            await ws.send_json({"type": "join", "room": room, "token": running.token(room)})
            assert (await reply(ws))["type"] == "joined"
            messages = []
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                messages.append(json.loads(msg.data))
            assert messages[-1]["code"] == "heartbeat_timeout"
        await running.hub.media.wait_until(lambda: not running.hub.media.rooms)
    finally:
        await runner.cleanup()


async def test_second_session_of_a_participant_replaces_the_first(server: RunningServer) -> None:
    room = server.consultation()
    token = server.token(room, participant_id="nurse-1")
    async with socket(server) as first, socket(server) as second:
        await first.send_json({"type": "join", "room": room, "token": token})
        assert (await reply(first))["type"] == "joined"
        await second.send_json({"type": "join", "room": room, "token": token})
        codes = []
        while (msg := await first.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
            codes.append(json.loads(msg.data).get("code"))
        assert codes[-1] == "replaced"
        assert first.close_code == 4002
        assert (await reply(second))["type"] == "joined"
        assert list(server.hub.media.rooms[room].peers) == ["nurse-1"]


@pytest.mark.parametrize("payload", ["{" * 100000, json.dumps({"type": "ping", "id": "x" * 100})])
async def test_pathological_json_is_refused(server: RunningServer, payload: str) -> None:
    async with socket(server) as ws:
        await ws.send_str(payload)
        assert (await reply(ws))["type"] == "error"
