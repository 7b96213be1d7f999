"""The clinician's page calls the home kit: the button, the kit's state, and the kit arriving."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from signalling.client import ConsultationClient

from .conftest import RunningServer
from .test_browser_client import ARTIFACTS, browser, open_page

__all__ = ["browser"]  # Chromium, with the same rule for when it may be missing


async def enrolled_kit(server: RunningServer, http: aiohttp.ClientSession, room: str) -> tuple[str, str]:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    async with http.post(f"{server.url}/api/devices", json={"name": "Kit 7"}, headers=admin) as r:
        code = (await r.json())["enrolment_code"]
    async with http.post(f"{server.url}/api/devices/enrol", json={"code": code}) as r:
        enrolled = await r.json()
    async with http.put(f"{server.url}/api/consultations/{room}/kit", json={"device_id": enrolled["device_id"]},
                        headers=admin) as r:
        assert r.status == 200
    return enrolled["device_id"], enrolled["secret"]


async def ask_where_to_be(server: RunningServer, http: aiohttp.ClientSession, device_id: str,
                          secret: str) -> dict[str, Any]:
    async with http.post(f"{server.url}/api/devices/{device_id}/session?wait=25",
                         headers={"Authorization": f"Device {secret}"}) as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]


async def test_the_clinician_calls_the_home_kit_from_the_page(server: RunningServer, browser: Any) -> None:
    room = server.consultation("Hemsjukvård Pajala")
    kit: ConsultationClient | None = None
    async with aiohttp.ClientSession() as http:
        device_id, secret = await enrolled_kit(server, http, room)
        doctor = await open_page(browser, f"{server.url}/c/{room}#token={server.token(room, 'Dr Berg', 'clinician')}")
        await doctor.wait_for_selector('[data-testid="kit-panel"]:not([hidden])')
        assert await doctor.text_content("#kit-status") == "Hemkitet Kit 7 är inte påslaget"
        assert await doctor.text_content("#call-kit-button") == "Ring upp hemmet"

        # The kit is switched on and asks where to be: the page shows it as on, within one round of its check.
        question = asyncio.ensure_future(ask_where_to_be(server, http, device_id, secret))
        try:
            await doctor.wait_for_selector('#kit-status[data-online="true"]', timeout=10000)
            assert not question.done(), "nothing is due: the kit waits"
            await doctor.click("#call-kit-button")
            answer = await asyncio.wait_for(question, 5)
        finally:
            question.cancel()
        assert answer["state"] == "assigned" and answer["consultation_id"] == room
        # (the kit may hear of the call before the page has the server's answer to its click)
        await doctor.wait_for_function(
            "() => document.getElementById('kit-status').textContent === "
            "'Hemkitet Kit 7 är uppringt och ansluter så snart det är påslaget'", timeout=5000)

        try:
            await doctor.click("#join-button")
            await doctor.wait_for_function("() => naraDebug.call && naraDebug.call.state === 'connected'",
                                           timeout=20000)
            kit = ConsultationClient(server.url, room, answer["token"], publish=False)
            await kit.join()
            await doctor.wait_for_selector(f'[data-participant="{device_id}"]')
            await doctor.wait_for_function(
                "() => document.getElementById('kit-status').textContent === 'Hemkitet Kit 7 är med i samtalet'")
            assert await doctor.is_hidden("#call-kit-button")
            await doctor.select_option("#lang-select", "en")
            assert await doctor.text_content("#kit-status") == "Home kit Kit 7 is in the call"
            ARTIFACTS.mkdir(exist_ok=True)
            await doctor.screenshot(path=str(ARTIFACTS / "home-kit-in-the-call.png"))
        finally:
            if kit is not None:
                await kit.close()

        # A relative's page has no kit controls.
        relative = await open_page(browser, f"{server.url}/c/{room}#token={server.token(room, 'Anna', 'relative')}")
        await relative.wait_for_selector("#screen-prejoin:not([hidden])")
        assert await relative.is_hidden('[data-testid="kit-panel"]')
