"""The kit's own screen in a real browser: the status a nurse reads, the team's picture and the self view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.reconnect import State

from .conftest import RunningServer
from .edge_helpers import KitWatcher, admin, enrolled_kit, kit_config
from .test_browser_client import ARTIFACTS, browser, open_page
from .test_edge_agent import running_kit

__all__ = ["browser"]  # Chromium, with the same rule for when it may be missing

SHOWS_A_PICTURE = "id => { const img = document.getElementById(id); return !img.hidden && img.naturalWidth > 0; }"


async def test_the_kit_screen_says_where_it_stands_and_shows_the_team(server: RunningServer, browser: Any,
                                                                      tmp_path: Path) -> None:
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation("Hembesök")
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    async with running_kit(kit_config(server.url, credential)) as kit:
        await kit.agent.wait_for(lambda: kit.agent.state is State.WAITING, 10)
        screen = await open_page(browser, kit.page_url, viewport={"width": 800, "height": 480})
        await screen.wait_for_function("() => document.getElementById('state-text').textContent === "
                                       "'Väntar på samtal'", timeout=10000)
        team = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
        try:
            await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
            await screen.wait_for_function("() => document.getElementById('state-text').textContent === "
                                           "'Ansluten'", timeout=20000)
            await screen.wait_for_function(SHOWS_A_PICTURE, arg="self-video", timeout=15000)
            await screen.wait_for_function(SHOWS_A_PICTURE, arg="remote-video", timeout=20000)
            assert await screen.get_attribute("#status", "data-state") == "connected"
            ARTIFACTS.mkdir(exist_ok=True)
            await screen.screenshot(path=str(ARTIFACTS / "kit-screen-connected.png"))
        finally:
            await team.close()
