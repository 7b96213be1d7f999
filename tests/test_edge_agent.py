"""The home kit end to end on a real server: enrol, get called, publish; revoked; no camera."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from edge.agent import KitAgent
from edge.config import EdgeConfig
from edge.page import start_page
from edge.reconnect import State

from .conftest import RunningServer
from .edge_helpers import KitWatcher, admin, enrolled_kit, kit_config


class RunningKit:
    def __init__(self, agent: KitAgent, page_url: str) -> None:
        self.agent = agent
        self.page_url = page_url

    async def page(self, path: str) -> tuple[int, bytes, str]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.page_url}{path}") as response:
            return response.status, await response.read(), response.content_type


@contextlib.asynccontextmanager
async def running_kit(config: EdgeConfig) -> AsyncIterator[RunningKit]:
    agent = KitAgent(config)
    runner, port = await start_page(agent, "127.0.0.1", 0)
    task = asyncio.ensure_future(agent.run())
    try:
        yield RunningKit(agent, f"http://127.0.0.1:{port}")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()


async def test_enrol_command_writes_a_private_credential(server: RunningServer, tmp_path: Path) -> None:
    created = await admin(server.url, server.admin_key, "POST", "/api/devices", {"name": "Kit 3"})
    path = tmp_path / "credential.json"
    code = created["enrolment_code"].replace("-", "").lower()  # as someone might type it
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nara.cli", "edge", "enrol", "--server", server.url, "--code", code,
        "--credential", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert saved["device_id"] == created["device_id"] and saved["name"] == "Kit 3"
    assert len(saved["secret"]) >= 43 and saved["secret"] not in out.decode()
    # The code works once: a second enrolment is refused with the server's reason.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nara.cli", "edge", "enrol", "--server", server.url, "--code", code,
        "--credential", str(tmp_path / "again.json"), stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and "code_used" in err.decode()
    assert not (tmp_path / "again.json").exists()


async def test_called_kit_joins_and_the_team_sees_and_hears_it(server: RunningServer, tmp_path: Path) -> None:
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation("Hembesök")
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    async with running_kit(kit_config(server.url, credential)) as kit:
        await kit.agent.wait_for(lambda: kit.agent.state is State.WAITING, 10)
        status, body, _ = await kit.page("/status")
        assert json.loads(body)["state"] == "waiting"
        clinician = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
        try:
            token = server.token(room, "Dr A", "clinician")
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
                async with http.post(f"{server.url}/api/consultations/{room}/call-kit") as response:
                    assert response.status == 200
            await kit.agent.wait_for(lambda: kit.agent.state is State.CONNECTED, 15)
            await clinician.wait_for(lambda: clinician.sees_kit() and clinician.hears_kit(), 20)
            # The kit's screen: connected, its own picture, and the clinician's.
            status, body, _ = await kit.page("/status")
            shown = json.loads(body)
            assert (shown["state"], shown["camera"], shown["consultation"]) == ("connected", "ok", "Hembesök")
            status, body, kind = await kit.page("/video/self.jpg")
            assert (status, kind, body[:2]) == (200, "image/jpeg", b"\xff\xd8")
            await kit.agent.wait_for(lambda: kit.agent.remote.picture is not None, 15)
            status, body, kind = await kit.page("/video/remote.jpg")
            assert (status, kind, body[:2]) == (200, "image/jpeg", b"\xff\xd8")
            # Only once in the room, as the device itself.
            details = await admin(server.url, server.admin_key, "GET", f"/api/consultations/{room}")
            kits = [p for p in details["participants"] if p["role"] == "kit"]
            assert [p["id"] for p in kits] == [kit_id]
        finally:
            await clinician.close()


async def test_revoked_kit_stops_and_says_why(server: RunningServer, tmp_path: Path) -> None:
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation()
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
    async with running_kit(kit_config(server.url, credential)) as kit:
        await kit.agent.wait_for(lambda: kit.agent.state is State.CONNECTED, 15)
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{kit.page_url}/events") as screen:
            assert json.loads((await screen.receive(timeout=5)).data)["state"] == "connected"
            await admin(server.url, server.admin_key, "POST", f"/api/devices/{kit_id}/revoke")
            shown = json.loads((await screen.receive(timeout=5)).data)  # the screen is told at once
            assert shown["state"] == "revoked"
        await kit.agent.wait_for(lambda: kit.agent.state is State.REVOKED, 5)
        status, body, _ = await kit.page("/status")
        shown = json.loads(body)
        assert shown["state"] == "revoked" and "enrolled again" in shown["reason"]
        # It stops trying: the server hears nothing more from it.
        before = await admin(server.url, server.admin_key, "GET", "/api/devices")
        transitions = len(kit.agent.machine.transitions)
        await asyncio.sleep(2.0)  # a window in which a retrying kit would have asked again
        after = await admin(server.url, server.admin_key, "GET", "/api/devices")
        assert before["devices"][0]["last_seen"] == after["devices"][0]["last_seen"]
        assert len(kit.agent.machine.transitions) == transitions
    page_text = json.loads((Path(__file__).parent.parent / "edge/static/lang/sv.json").read_text())
    assert page_text["state.revoked"] == "Kitet är spärrat – kontakta IT"


async def test_a_kit_without_camera_joins_with_sound_and_says_so(server: RunningServer, tmp_path: Path) -> None:
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation()
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
    clinician = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
    try:
        async with running_kit(kit_config(server.url, credential, camera="/dev/video-missing")) as kit:
            await kit.agent.wait_for(lambda: kit.agent.state is State.CONNECTED, 15)
            await clinician.wait_for(clinician.hears_kit, 20)
            status, body, _ = await kit.page("/status")
            shown = json.loads(body)
            assert (shown["state"], shown["camera"]) == ("connected", "missing")
            assert "/dev/video-missing does not exist" in shown["camera_detail"]
            status, _, _ = await kit.page("/video/self.jpg")
            assert status == 204
            assert clinician.video_at == []
            kinds = {kind for owner, kind in clinician.client.owners.values() if owner == kit_id}
            assert kinds == {"audio"}
    finally:
        await clinician.close()


async def test_a_kit_that_is_not_enrolled_says_so(tmp_path: Path) -> None:
    config = kit_config("http://127.0.0.1:9", tmp_path / "nothing.json")
    async with running_kit(config) as kit:
        await kit.agent.wait_for(lambda: kit.agent.state is State.CONFIG_ERROR, 5)
        status, body, _ = await kit.page("/status")
        assert "nara edge enrol" in json.loads(body)["reason"]


@pytest.mark.parametrize("host", ["name-that-does-not-resolve.invalid"])
async def test_a_name_that_does_not_resolve_is_no_network(server: RunningServer, tmp_path: Path, host: str) -> None:
    _, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    async with running_kit(kit_config(f"http://{host}:8080", credential)) as kit:
        await kit.agent.wait_for(lambda: kit.agent.state is State.NO_NETWORK, 10)
        assert "resolve" in kit.agent.machine.reason


async def test_the_page_and_its_texts_in_both_languages(tmp_path: Path) -> None:
    async with running_kit(kit_config("http://127.0.0.1:9", tmp_path / "nothing.json")) as kit:
        status, body, kind = await kit.page("/")
        assert status == 200 and kind == "text/html" and b"kit.js" in body and b"photo" in body
        status, body, _ = await kit.page("/static/lang/sv.json")
        assert status == 200 and json.loads(body)["state.connected"] == "Ansluten"
    lang = Path(__file__).parent.parent / "edge/static/lang"
    sv, en = (json.loads((lang / f"{code}.json").read_text()) for code in ("sv", "en"))
    assert sv.keys() == en.keys()
    assert all(f"state.{s.value}" in sv for s in State)
    assert (sv["state.reconnecting"], sv["state.no_network"], sv["state.waiting"]) == (
        "Återansluter…", "Inget nätverk", "Väntar på samtal")
    assert sv["camera.missing"] == "Ingen kamera – endast ljud"
