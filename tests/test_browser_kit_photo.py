"""The kit screen's photo flow in a real browser: the team asks, the nurse takes, retakes, describes and saves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np

from edge.outbox import Outbox
from edge.reconnect import State
from edge.scene import STILL_HEIGHT, STILL_WIDTH, SyntheticScene

from .conftest import RunningServer
from .edge_helpers import KitWatcher, admin, enrolled_kit, kit_config
from .test_browser_client import ARTIFACTS, browser, open_page
from .test_edge_agent import RunningKit, running_kit

__all__ = ["browser"]  # Chromium, with the same rule for when it may be missing


def text_is(selector: str) -> str:
    return f"text => document.querySelector('{selector}').textContent.includes(text)"


async def test_the_team_asks_for_a_photo_and_the_nurse_takes_retakes_and_saves_it(
        server: RunningServer, browser: Any, tmp_path: Path) -> None:
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation("Hembesök")
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    config = kit_config(server.url, credential)
    async with running_kit(config) as kit:
        await kit.agent.wait_for(lambda: kit.agent.state is State.WAITING, 10)
        screen = await open_page(browser, kit.page_url, viewport={"width": 800, "height": 480})
        team = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
        try:
            await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
            await kit.agent.wait_for(lambda: kit.agent.state is State.CONNECTED, 20)
            media = kit.agent.media
            assert media is not None
            media.scene = SyntheticScene(blur=3.0)  # a shaking hand

            # The team asks; the kit's screen prompts the nurse with the body site.
            await team.client.send({"type": "request-photo", "body_site": "sacrum", "note": "Visa kanten"})
            await screen.wait_for_function(text_is("#photo-request-text"), arg="Teamet ber om en bild: Korsbenet",
                                           timeout=10000)
            assert "Visa kanten" in await screen.text_content("#photo-request-note")
            await screen.click("#photo-request-take")

            # A blurred still: the verdict says so, and how to do better.
            await screen.wait_for_function(text_is("#photo-verdict"),
                                           arg="Bilden är suddig. Håll stilla och ta om.", timeout=15000)
            assert await screen.get_attribute("#photo-verdict", "data-ok") == "false"
            assert await screen.input_value("#photo-site") == "sacrum"  # preselected from the request
            assert await screen.evaluate("() => document.getElementById('photo-preview').naturalWidth") > 0

            # Ta om, steadier, with the scale marker beside the wound.
            media.scene = SyntheticScene(marker_mm=20.0, pixels_per_mm=10.0)
            await screen.click("#photo-retake")
            await screen.wait_for_function(text_is("#photo-verdict"), arg="Bilden ser bra ut.", timeout=15000)
            assert await screen.get_attribute("#photo-verdict", "data-ok") == "true"
            assert "mm per bildpunkt" in await screen.text_content("#photo-scale")

            # Consent must be answered before the photo is kept.
            await screen.click("#photo-save")
            await screen.wait_for_function(text_is("#photo-error"), arg="har patienten sagt ja", timeout=5000)
            assert kit.agent.outbox is not None and kit.agent.outbox.items() == []
            await screen.fill("#photo-note", "Rodnad kant, 3 cm")
            await screen.check("#photo-consent input[value=yes]")
            ARTIFACTS.mkdir(exist_ok=True)
            await screen.screenshot(path=str(ARTIFACTS / "kit-photo-flow.png"))
            await screen.click("#photo-save")
            await screen.wait_for_selector("#photo-flow", state="hidden", timeout=10000)
            await screen.wait_for_function(text_is("#photo-toast"), arg="Bilden är sparad", timeout=5000)

            # The outbox has it, with what the nurse said; the screen lists it and the prompt is gone.
            outbox = Outbox.open(config.outbox_dir, verify=False)
            try:
                [item] = outbox.items()
                image = outbox.path_of(item).read_bytes() if item.state != "delivered" else None
            finally:
                outbox.close()
            m = item.metadata
            assert (m.consultation, m.body_site, m.consent, m.note) == (room, "sacrum", True, "Rodnad kant, 3 cm")
            assert m.device == "Kit 7" and m.content_type == "image/jpeg"
            assert m.mm_per_pixel is not None and abs(m.mm_per_pixel - 0.1) < 0.002
            assert m.quality["flags"] == [] and m.quality["sharpness"] > m.quality["sharpness_min"]
            if image is not None:
                decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
                assert decoded.shape == (STILL_HEIGHT, STILL_WIDTH, 3)
            assert await screen.is_hidden("#photo-request")
            assert kit.agent.photos.request is None

            # It goes to the team by itself; the screen says when it has arrived.
            await screen.wait_for_function(
                "id => document.querySelector(`#photo-queue li[data-id='${id}']`)?.textContent"
                ".includes('Korsbenet') && document.querySelector(`#photo-queue li[data-id='${id}']`)"
                ".textContent.includes('levererad')", arg=item.id, timeout=45000)
            token = server.token(room, "Dr A", "clinician")
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
                async with http.get(f"{server.url}/api/consultations/{room}/images") as response:
                    [stored] = (await response.json())["images"]
            assert (stored["body_site"], stored["note"], stored["consent"]) == ("sacrum", "Rodnad kant, 3 cm", "yes")
            assert (stored["width"], stored["height"]) == (STILL_WIDTH, STILL_HEIGHT)
            assert stored["quality"]["flags"] == [] and abs(stored["mm_per_pixel"] - 0.1) < 0.002
            await screen.screenshot(path=str(ARTIFACTS / "kit-photo-saved.png"))
        finally:
            await screen.close()  # the page's /events socket would hold up the kit page's shutdown
            await team.close()


async def test_a_failed_still_is_explained_and_the_flow_can_be_left(server: RunningServer, browser: Any,
                                                                     tmp_path: Path) -> None:
    _, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    async with running_kit(kit_config(server.url, credential, video="320x240")) as kit:
        await kit.agent.wait_for(lambda: kit.agent.media is not None and kit.agent.state is State.WAITING, 10)
        screen = await open_page(browser, kit.page_url, viewport={"width": 800, "height": 480})
        try:
            await the_flow_explains_a_failed_still_and_can_be_left(screen, kit)
        finally:
            await screen.close()  # the page's /events socket would hold up the kit page's shutdown


async def the_flow_explains_a_failed_still_and_can_be_left(screen: Any, kit: RunningKit) -> None:
    media = kit.agent.media
    assert media is not None
    media.scene = SyntheticScene(fail="unplugged")
    await screen.wait_for_function("() => !document.getElementById('photo').disabled", timeout=10000)
    await screen.click("#photo")
    await screen.wait_for_function(text_is("#photo-verdict"), arg="Kameran kunde inte ta bilden", timeout=10000)
    # A photo taken without any consultation yet has nowhere to go: the nurse is told, nothing is kept.
    media.scene = SyntheticScene()
    await screen.click("#photo-retake")
    await screen.wait_for_function(text_is("#photo-verdict"), arg="Bilden ser bra ut.", timeout=15000)
    await screen.select_option("#photo-site", "heel_left")
    await screen.check("#photo-consent input[value=no]")
    await screen.click("#photo-save")
    await screen.wait_for_function(text_is("#photo-error"), arg="har inte varit med i något samtal", timeout=5000)
    await screen.click("#photo-cancel")
    await screen.wait_for_selector("#photo-flow", state="hidden", timeout=5000)
    assert kit.agent.photos.pending is None  # the page dropped it before closing
    assert kit.agent.outbox is not None and kit.agent.outbox.items() == []
