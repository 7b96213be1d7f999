"""Wound photos in real Chromium: the tablet kit page takes, describes and sends them through its
outbox; the clinician's page shows them as they arrive, at full resolution, beside last week's
image of the same body site, and asks the home for one."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np

from signalling.tokens import TokenError

from .conftest import RunningServer
from .test_browser_client import ARTIFACTS, browser, forged_token, join_call, open_page

__all__ = ["browser"]  # Chromium, with the same rule for when it may be missing

PATIENT = "pat-0042"
TABLET = {"width": 800, "height": 1280}
LOADED = "sel => { const img = document.querySelector(sel); return !!img && img.complete && img.naturalWidth > 0; }"


async def consultation(server: RunningServer, title: str, patient_ref: str = PATIENT) -> str:
    async with aiohttp.ClientSession() as http, http.post(
        f"{server.url}/api/consultations", json={"title": title, "patient_ref": patient_ref},
        headers={"Authorization": f"Bearer {server.admin_key}"},
    ) as response:
        assert response.status == 201, await response.text()
        room: str = (await response.json())["id"]
        return room


def wound_jpeg(width: int, height: int, seed: int) -> bytes:
    """A skin-coloured picture with a red wound and some grain, so it does not compress to nothing."""
    rng = np.random.default_rng(seed)
    picture = np.full((height, width, 3), (150, 170, 215), np.uint8)
    cv2.ellipse(picture, (width // 2, height // 2), (width // 6, height // 8), 20, 0, 360, (60, 60, 190), -1)
    picture = cv2.add(picture, rng.integers(0, 40, picture.shape, dtype=np.uint8))
    ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return bytes(encoded.tobytes())


async def upload(server: RunningServer, room: str, token: str, data: bytes, body_site: str, captured_at: str) -> str:
    """One image through the tus endpoint, as a kit would send it; the stored image's id."""
    metadata = {
        "consultation": room, "image_id": str(uuid.uuid4()), "sha256": hashlib.sha256(data).hexdigest(),
        "content_type": "image/jpeg", "body_site": body_site, "captured_at": captured_at, "consent": "yes",
        "device": "Kit 7",
    }
    encoded = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in metadata.items())
    tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/uploads", headers={
            **tus, "Upload-Length": str(len(data)), "Upload-Metadata": encoded,
        }) as created:
            assert created.status == 201, await created.text()
            location = created.headers["Location"]
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        async with http.patch(f"{server.url}{location}", data=data, headers={
            **tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
            "Upload-Checksum": f"sha256 {checksum}",
        }) as sent:
            assert sent.status == 204, await sent.text()
            return sent.headers["Nara-Image-Id"]


async def images_of(server: RunningServer, room: str) -> list[dict[str, Any]]:
    token = server.token(room, "Dr Kontroll", "clinician")
    async with aiohttp.ClientSession() as http, http.get(
        f"{server.url}/api/consultations/{room}/images", headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.status == 200, await response.text()
        images: list[dict[str, Any]] = (await response.json())["images"]
        return images


def kit_link(server: RunningServer, room: str) -> str:
    return f"{server.url}/kit/{room}#token={server.token(room, 'Surfplatta', 'kit', participant_id='tablet')}"


async def test_a_requested_photo_goes_from_the_tablet_to_the_gallery_and_beside_last_weeks(
    server: RunningServer, browser: Any
) -> None:
    last_week_room = await consultation(server, "Hembesök förra veckan")
    room = await consultation(server, "Hembesök")
    last_week = (datetime.now(UTC) - timedelta(days=7)).replace(microsecond=0)
    await upload(server, last_week_room, server.token(last_week_room, "Sköterska Sara", "nurse"),
                 wound_jpeg(1600, 1200, 1), "heel_left", last_week.isoformat())

    tablet = await open_page(browser, kit_link(server, room), viewport=TABLET)
    # Both pages share the browser's one fake camera, which runs at the size of whoever opened it
    # first; a real tablet has its camera to itself, so the tablet opens it before the doctor joins.
    await tablet.wait_for_function(
        "() => naraDebug.localStream?.getVideoTracks()[0]?.getSettings().width === 1280", timeout=20000)
    doctor = await join_call(browser, server, room, "Dr Berg", "clinician", "doctor")
    await tablet.wait_for_function("() => naraDebug.call?.state === 'connected'", timeout=20000)
    await doctor.wait_for_selector("#gallery-empty:not([hidden])")
    assert "#token" not in tablet.url, "the token is taken out of the tablet's address bar"

    # The doctor asks for a photo of the left heel: the tablet shows who asks, for what.
    await doctor.select_option("#request-site", "heel_left")
    await doctor.fill("#request-note", "Hälen, på nära håll")
    await doctor.click("#request-button")
    prompt = tablet.locator('[data-testid="photo-request"]')
    await prompt.wait_for(timeout=5000)
    asked = await prompt.inner_text()
    assert all(part in asked for part in ("Dr Berg", "Vänster häl", "Hälen, på nära håll"))
    await doctor.wait_for_selector('#request-status[data-state="delivered"]', timeout=5000)

    # The nurse takes it with the tablet's camera; the request chose the body site; consent is required.
    await tablet.click("#take-photo")
    await tablet.wait_for_selector('[data-testid="photo-form"]:not([hidden])')
    assert await tablet.input_value("#photo-site") == "heel_left"
    await tablet.click("#photo-send")
    assert "samtyckt" in await tablet.inner_text("#photo-form-problem")
    await tablet.check('input[name="consent"][value="yes"]')
    await tablet.fill("#photo-note", "Rodnaden har minskat")
    await tablet.click("#photo-send")
    delivered = tablet.locator('[data-testid="outbox-item"][data-state="delivered"]')
    await delivered.wait_for(timeout=20000)
    assert "Levererad" in await delivered.inner_text()
    assert await prompt.is_hidden(), "the answered request is no longer shown"
    sent = await tablet.evaluate("() => naraDebug.outbox.records.map(r => r.sha256)")

    # It is in the doctor's gallery without a reload, and it is the photo the tablet took.
    item = doctor.locator('[data-testid="gallery-item"]')
    await item.first.wait_for(timeout=5000)
    await doctor.wait_for_function(LOADED, arg='[data-testid="gallery-item"] img')
    [stored] = await images_of(server, room)
    assert [stored["sha256"]] == sent
    assert stored["width"] > 640, "a still at the camera's resolution, not a frame of the 640 px video"
    ARTIFACTS.mkdir(exist_ok=True)
    await doctor.screenshot(path=str(ARTIFACTS / "images-gallery.png"))

    # At full resolution, with what the nurse said about it.
    await item.first.click()
    await doctor.wait_for_selector('#pane-current .zoom-frame[data-loaded="true"]')
    assert await doctor.evaluate("() => document.querySelector('#pane-current img').naturalWidth") == stored["width"]
    details = await doctor.inner_text("#viewer-meta")
    assert all(text in details for text in ("Vänster häl", "Rodnaden har minskat", "Ja, patienten har samtyckt"))
    await doctor.click("#viewer-zoom")
    assert await doctor.get_attribute("#pane-current .zoom-frame", "data-zoom") == "actual"
    await doctor.screenshot(path=str(ARTIFACTS / "images-viewer.png"))

    # Beside last week's image of the same heel, each with its date.
    await doctor.click("#viewer-compare")
    earlier = doctor.locator('[data-testid="history-item"]')
    await earlier.first.wait_for(timeout=5000)
    assert await earlier.count() == 1
    await earlier.first.click()
    await doctor.wait_for_selector('#pane-earlier:not([hidden]) .zoom-frame[data-loaded="true"]')
    assert await doctor.evaluate("() => document.querySelector('#pane-earlier img').naturalWidth") == 1600
    dates = [await doctor.get_attribute(f"#{pane} figcaption time", "datetime")
             for pane in ("pane-current", "pane-earlier")]
    assert dates[0] == stored["captured_at"]
    assert dates[1] is not None and datetime.fromisoformat(dates[1]) == last_week
    await doctor.screenshot(path=str(ARTIFACTS / "images-compare.png"))
    await tablet.screenshot(path=str(ARTIFACTS / "images-tablet.png"))


async def test_a_photo_taken_offline_waits_in_the_tablet_and_goes_once_after_the_tab_is_opened_again(
    server: RunningServer, browser: Any, tmp_path: Path
) -> None:
    room = await consultation(server, "Hembesök")
    photo = tmp_path / "sår.jpg"
    photo.write_bytes(wound_jpeg(2400, 1800, 3))
    context = await browser.new_context(viewport=TABLET)
    tablet = await context.new_page()
    await tablet.goto(kit_link(server, room))
    await tablet.wait_for_selector("#screen-kit:not([hidden])")

    # No network: the photo from the camera app is kept and waits.
    await context.set_offline(True)
    await tablet.set_input_files("#photo-file", str(photo))
    await tablet.wait_for_selector('[data-testid="photo-form"]:not([hidden])')
    await tablet.select_option("#photo-site", "sacrum")
    await tablet.check('input[name="consent"][value="no"]')
    await tablet.click("#photo-send")
    await tablet.wait_for_selector("#outbox-waiting:not([hidden])", timeout=10000)
    assert "nätet" in await tablet.inner_text("#outbox-waiting")
    assert await tablet.get_attribute('[data-testid="outbox-item"]', "data-state") == "queued"
    await tablet.close()  # the tab is closed before the network is back

    # Opened again, with the network: it goes, and picks up where a broken chunk left it.
    await context.set_offline(False)
    tablet = await context.new_page()
    requests: list[tuple[str, str, str | None]] = []
    tablet.on("request", lambda r: requests.append((r.method, r.url, r.headers.get("upload-offset"))))
    patches = 0

    async def break_the_second_chunk(route: Any) -> None:
        nonlocal patches
        if route.request.method == "PATCH":
            patches += 1
            if patches == 2:
                await route.abort("connectionreset")
                return
        await route.continue_()

    await tablet.route("**/api/uploads/*", break_the_second_chunk)
    await tablet.goto(kit_link(server, room))
    await tablet.locator('[data-testid="outbox-item"][data-state="delivered"]').wait_for(timeout=20000)

    [stored] = await images_of(server, room)
    assert stored["sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert (stored["body_site"], stored["consent"], stored["width"]) == ("sacrum", "no", 2400)
    uploads = [(method, offset) for method, url, offset in requests if "/api/uploads" in url]
    broken_at = [i for i, (method, _) in enumerate(uploads) if method == "PATCH"][1]
    resumed = uploads[broken_at + 1:]
    assert resumed[0][0] == "HEAD", "after the broken chunk the tablet asks how far the server got"
    assert resumed[1][0] == "PATCH" and int(resumed[1][1] or 0) > 0, "and goes on from there, not from 0"
    assert [method for method, _ in uploads].count("POST") == 1
    await context.close()


async def test_only_the_care_team_gets_the_gallery_and_only_uploaders_the_kit_page(
    server: RunningServer, browser: Any
) -> None:
    room = await consultation(server, "Hembesök")
    # IT staff make the tablet's link with `nara token --role kit --link`: it opens the kit page.
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nara.cli", "token", "--data-dir", str(server.config.data_dir),
        "--public-url", server.url, "--room", room, "--name", "Surfplatta", "--role", "kit", "--link",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    link = (await cli.communicate())[0].decode().strip()
    assert cli.returncode == 0 and link.startswith(f"{server.url}/kit/{room}#token=")
    tablet = await open_page(browser, link, viewport=TABLET)
    await tablet.wait_for_selector("#take-photo:not([hidden])", timeout=10000)

    relative = await join_call(browser, server, room, "Anna", "relative", "anna")
    assert await relative.is_hidden("#gallery-button") and await relative.is_hidden("#gallery")
    nurse = await join_call(browser, server, room, "Sköterska Sara", "nurse", "sara")
    await nurse.wait_for_selector("#gallery-button:not([hidden])")

    page = await open_page(browser, f"{server.url}/kit/{room}#token={server.token(room, 'Anna', 'relative')}")
    await page.wait_for_selector('[data-testid="refusal"]:not([hidden])')
    assert "kan inte skicka bilder" in await page.inner_text("#screen-refusal")

    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/body-sites") as response:
        sites = (await response.json())["body_sites"]
    assert sites[0] == {"key": "sacrum", "label": {"sv": "Korsbenet", "en": "Sacrum"}} and len(sites) == 19


async def test_the_gallery_says_in_words_when_the_server_refuses_it(server: RunningServer, browser: Any) -> None:
    room = await consultation(server, "Hembesök")
    # A link that runs out a few seconds after the doctor has joined (the server allows 5 s of clock skew).
    token = forged_token(server, room, sub="doctor", name="Dr Berg", role="clinician", exp=int(time.time()) + 3)
    doctor = await open_page(browser, f"{server.url}/c/{room}#token={token}")
    await doctor.click("#join-button")
    await doctor.wait_for_selector("#gallery-empty:not([hidden])", timeout=20000)
    while True:  # until the server itself refuses the doctor's link
        try:
            server.hub.authority.verify(token, room)
        except TokenError:
            break
        await asyncio.sleep(0.2)

    await upload(server, room, server.token(room, "Sköterska Sara", "nurse"), wound_jpeg(800, 600, 2),
                 "sacrum", datetime.now(UTC).isoformat())
    problem = doctor.locator('[data-testid="gallery-item"] .thumb-problem')
    await problem.wait_for(timeout=5000)
    assert "Länken har gått ut" in await problem.inner_text() and "token_expired" in await problem.inner_text()
