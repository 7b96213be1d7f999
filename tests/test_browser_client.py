"""The consultation page in real headless Chromium (fake camera and microphone)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from bench.turn import ImpairingTurnServer
from mediaserver.aiortc_adapter import selected_local_candidate_type
from signalling.client import ConsultationClient

from .conftest import RunningServer, in_ci, start_server
from .media_helpers import Watcher

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.async_api") if not in_ci() else __import__(
    "playwright.async_api", fromlist=["async_playwright"])
Page = Any


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        if in_ci():
            pytest.fail("Chromium is required in CI: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed here")
    async with playwright_api.async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        await instance.close()


async def open_page(browser: Any, url: str, viewport: dict[str, int] | None = None) -> Page:
    context = await browser.new_context(viewport=viewport or {"width": 1280, "height": 800})
    page = await context.new_page()
    await page.goto(url)
    return page


async def join_call(
    browser: Any, server: RunningServer, room: str, name: str, role: str, pid: str,
    keyboard: bool = False, viewport: dict[str, int] | None = None,
) -> Page:
    token = server.token(room, name, role, participant_id=pid)
    page = await open_page(browser, f"{server.url}/c/{room}#token={token}", viewport)
    if keyboard:  # the join button takes the focus once the camera is ready: Enter joins
        await page.wait_for_function("() => document.activeElement?.id === 'join-button'")
        await page.keyboard.press("Enter")
    else:
        await page.click("#join-button")
    await page.wait_for_function(
        "() => naraDebug.call && naraDebug.call.state === 'connected'", timeout=20000)
    return page


async def stat(page: Page, participant: str, key: str) -> float:
    value = await page.evaluate(
        "([id, key]) => naraDebug.stats.participants.get(id)?.[key] ?? 0", [participant, key])
    return float(value)


async def rising(page: Page, participant: str, key: str, by: float, timeout: float = 20) -> None:
    """Wait until a getStats() figure for ``participant`` has grown by ``by``."""
    start = await stat(page, participant, key)
    await page.wait_for_function(
        "([id, key, min]) => (naraDebug.stats.participants.get(id)?.[key] ?? 0) > min",
        arg=[participant, key, start + by], timeout=timeout * 1000)


async def kit_client(server: RunningServer, room: str) -> ConsultationClient:
    client = ConsultationClient(
        server.url, room, server.token(room, "Hemkit", "kit", participant_id="kit"),
        video=StampedVideoTrack(5, 320, 240, 15), audio=ToneAudioTrack(500))
    await client.join()
    return client


async def test_two_browsers_and_an_aiortc_client_see_and_hear_each_other(
    server: RunningServer, browser: Any
) -> None:
    room = server.consultation("Hemsjukvård Pajala")
    doctor = await join_call(browser, server, room, "Dr Berg", "clinician", "doctor")
    tablet = {"width": 800, "height": 1280}
    relative = await join_call(browser, server, room, "Anna", "relative", "anna", keyboard=True,
                               viewport=tablet)
    kit = await kit_client(server, room)
    watcher = Watcher(kit)
    try:
        for page, others in ((doctor, ("anna", "kit")), (relative, ("doctor", "kit"))):
            await page.wait_for_selector(f'[data-participant="{others[1]}"]')
            for other in others:
                await rising(page, other, "framesDecoded", 30)
                await rising(page, other, "totalSamplesReceived", 48000)
        await kit.wait_for(lambda: {p for p, _ in kit.owners.values()} == {"doctor", "anna"})
        watcher.follow()
        await watcher.wait_for(
            lambda: watcher.frames_from["doctor"] >= 20 and watcher.frames_from["anna"] >= 20)
        names = await doctor.locator('[data-testid="tile"] .name').all_text_contents()
        assert sorted(names) == ["Anna", "Hemkit"]
        # Chromium tells the server when each packet arrived (transport-wide congestion control
        # feedback), and the server reads it: GET /api/stats counts what it matched to what it sent.
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        async with aiohttp.ClientSession(headers=headers) as http, http.get(f"{server.url}/api/stats") as response:
            participants = (await response.json())["rooms"][room]
        assert participants["doctor"]["transport_feedback"]["packets"] > 10
        assert participants["anna"]["transport_feedback"]["packets"] > 10
        await doctor.click("#details-button")
        rows = await doctor.locator("#details-body tr").all_inner_texts()
        assert len(rows) == 2 and all(any(ch.isdigit() for ch in row) for row in rows)
        await doctor.click("#details-button")
        ARTIFACTS.mkdir(exist_ok=True)
        await doctor.screenshot(path=str(ARTIFACTS / "three-party-call.png"))
        await relative.screenshot(path=str(ARTIFACTS / "three-party-call-tablet.png"))
    finally:
        await watcher.stop()
        await kit.close()


async def test_mute_camera_off_and_hang_up_are_seen_by_the_others(
    server: RunningServer, browser: Any
) -> None:
    room = server.consultation()
    doctor = await join_call(browser, server, room, "Dr Berg", "clinician", "doctor")
    relative = await join_call(browser, server, room, "Anna", "relative", "anna")
    kit = await kit_client(server, room)
    try:
        await relative.wait_for_selector('[data-participant="doctor"]')
        await doctor.click("#mute-button")
        assert await doctor.get_attribute("#mute-button", "aria-pressed") == "true"
        await relative.wait_for_selector(
            '[data-participant="doctor"][data-muted="true"] .muted-badge:not([hidden])')
        await kit.wait_for(lambda: any(e.get("type") == "mute" and e["participant_id"] == "doctor"
                                       and e["kind"] == "audio" and e["muted"] for e in kit.events))
        await doctor.click("#camera-button")
        await relative.wait_for_selector(
            '[data-participant="doctor"][data-camera-off="true"] .placeholder:not([hidden])')
        await kit.wait_for(lambda: any(e.get("type") == "mute" and e["kind"] == "video" for e in kit.events))
        hung_up = time.monotonic()
        await doctor.click("#hangup-button")
        await relative.wait_for_selector('[data-participant="doctor"]', state="detached", timeout=5000)
        elapsed = time.monotonic() - hung_up
        assert elapsed < 2.0, f"the tile stayed {elapsed:.2f} s after hang-up"
        await kit.wait_for(lambda: any(e.get("type") == "participant-left" for e in kit.events))
        assert await doctor.is_visible("#screen-left")
    finally:
        await kit.close()


def forged_token(server: RunningServer, room: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "p", "name": "X", "role": "relative", "room": room, "iss": "nara", "aud": "nara",
               "iat": now - 7200, "exp": now + 600, "jti": "j", **claims}
    return jwt.encode(payload, server.hub.authority.keys.signing_key, algorithm="HS256")


async def test_expired_and_other_room_links_show_the_refusal_page(
    server: RunningServer, browser: Any
) -> None:
    room, other = server.consultation(), server.consultation()
    expired = forged_token(server, room, exp=int(time.time()) - 60)
    for token, code, swedish in (
        (expired, "token_expired", "Länken har gått ut"),
        (server.token(other, "Anna", "relative"), "token_wrong_room", "annan konsultation"),
    ):
        page = await open_page(browser, f"{server.url}/c/{room}#token={token}")
        await page.wait_for_selector('[data-testid="refusal"]:not([hidden])')
        text = await page.inner_text("#screen-refusal")
        assert swedish in text and code in text
        assert "#token" not in page.url, "the token is taken out of the address bar"
        await page.select_option("#lang-select", "en")
        assert "does not work" in await page.inner_text("#screen-refusal")
        assert await page.evaluate("document.documentElement.lang") == "en"


async def test_page_rejoins_by_itself_after_losing_the_websocket(
    server: RunningServer, browser: Any
) -> None:
    room = server.consultation()
    doctor = await join_call(browser, server, room, "Dr Berg", "clinician", "doctor")
    relative = await join_call(browser, server, room, "Anna", "relative", "anna")
    await rising(doctor, "anna", "framesDecoded", 20)
    await server.hub.sessions[(room, "doctor")].ws.close()  # the server drops the doctor's socket
    await doctor.wait_for_function("() => naraDebug.stateLog.includes('reconnecting')")
    await doctor.wait_for_function("() => naraDebug.call.state === 'connected'", timeout=20000)
    await rising(doctor, "anna", "framesDecoded", 30)
    await rising(relative, "doctor", "framesDecoded", 30)


async def test_page_rejoins_after_a_server_restart(tmp_path: Path, browser: Any) -> None:
    server, runner = await start_server(tmp_path)
    port = server.config.port
    room = server.consultation()
    tokens = {pid: server.token(room, pid, "clinician", participant_id=pid) for pid in ("a", "b")}
    pages = {}
    for pid, token in tokens.items():
        pages[pid] = await open_page(browser, f"{server.url}/c/{room}#token={token}")
        await pages[pid].click("#join-button")
        await pages[pid].wait_for_function("() => naraDebug.call && naraDebug.call.state === 'connected'")
    await rising(pages["a"], "b", "framesDecoded", 20)
    await runner.cleanup()
    await pages["a"].wait_for_function("() => naraDebug.call.state !== 'connected'")
    server, runner = await start_server(tmp_path, port=port)  # same data directory: same secret and rooms
    try:
        for pid, other in (("a", "b"), ("b", "a")):
            await pages[pid].wait_for_function("() => naraDebug.call.state === 'connected'", timeout=30000)
            await rising(pages[pid], other, "framesDecoded", 30, timeout=30)
    finally:
        await runner.cleanup()


async def test_browser_reaches_the_others_only_through_the_relay(tmp_path: Path, browser: Any) -> None:
    relay = ImpairingTurnServer(seed=2)
    await relay.start()
    ice = [{"urls": [relay.url], "username": "loopback/browser", "credential": relay.password}]
    server, runner = await start_server(tmp_path, ice_servers=ice, ice_transport_policy="relay")
    try:
        room = server.consultation()
        kit = await kit_client(server, room)  # also relay-only: the server tells every client
        page = await join_call(browser, server, room, "Dr Berg", "clinician", "doctor")
        await rising(page, "kit", "framesDecoded", 30)
        local_type = await page.evaluate("""async () => {
            const stats = await naraDebug.call.pc.getStats();
            let pair = null; const candidates = new Map();
            stats.forEach(s => {
                if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
                if (s.type === "local-candidate") candidates.set(s.id, s.candidateType);
            });
            return pair && candidates.get(pair.localCandidateId);
        }""")
        assert local_type == "relay"
        assert selected_local_candidate_type(kit.pc) == "relay"
        carrying = {label for label, _, down in relay.links() if down.counters.delivered > 100}
        assert carrying == {"loopback/browser"}, "browser and kit media both cross the relay"
        assert sum(1 for label, _, _ in relay.links() if label == "loopback/browser") >= 2
        await kit.close()
    finally:
        await runner.cleanup()
        relay.close()


async def test_the_page_says_when_a_weak_link_pauses_someones_video(server: RunningServer, browser: Any) -> None:
    from .test_ladder import join, link_profile

    relay = ImpairingTurnServer(seed=5, profiles=link_profile)
    await relay.start()
    room = server.consultation()
    kit = await join(server, room, "kit", publish=True)
    doctor = await join_call(browser, server, room, "Doktor", "clinician", "doctor")
    relative = await join(server, room, "thin", relay, "weak")  # 55 kbit/s: too thin for video
    try:
        badge = '[data-participant="thin"] [data-testid="paused-badge"]'
        await doctor.wait_for_selector(f"{badge}:not([hidden])", timeout=20000)
        assert await doctor.text_content(badge) == "Tar inte emot video: svag anslutning"
        # The doctor publishes too: the page says whom its own video does not reach, and why.
        await doctor.wait_for_selector("#self-paused:not([hidden])", timeout=20000)
        assert await doctor.text_content("#self-paused") == "Din video är pausad för thin: svag anslutning"
        await doctor.screenshot(path=str(ARTIFACTS / "video-paused-weak-link.png"))
    finally:
        await relative.close()
        await kit.close()
        relay.close()
