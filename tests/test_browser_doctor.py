"""The network doctor's page in real headless Chromium, against a local server and a real coturn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from signalling.doctor import mint_doctor_token

from .conftest import RunningServer, start_server
from .coturn import Coturn, coturn_or_skip
from .test_browser_client import browser, open_page

__all__ = ["browser"]  # Chromium, with the same rule for when it may be missing



@pytest.fixture
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    coturn_or_skip()
    turn = Coturn(tmp_path_factory.mktemp("coturn"))
    turn.start()
    yield turn
    turn.stop()


@pytest.fixture
async def server_with_turn(tmp_path: Path, coturn: Coturn) -> AsyncIterator[RunningServer]:
    running, runner = await start_server(tmp_path, turn_urls=coturn.urls, turn_static_auth_secret=coturn.secret)
    yield running
    await runner.cleanup()


async def results(page: Any) -> dict[str, dict[str, Any]]:
    checks = await page.evaluate("() => naraDoctor.checks")
    return {c["kind"]: c for c in checks}


async def test_the_doctor_page_finds_direct_udp_and_turn_and_sums_it_up_for_it_staff(
        browser: Any, server_with_turn: RunningServer, coturn: Coturn) -> None:
    token, _ = mint_doctor_token(server_with_turn.hub.authority)
    page = await open_page(browser, f"{server_with_turn.url}/doctor/?seconds=1#token={token}")
    assert "#token" not in page.url  # kept out of the address bar and history
    await page.wait_for_function("() => naraDoctor.done", timeout=60000)
    checks = await results(page)
    for kind in ("http", "websocket", "udp-direct", "turn-udp"):
        assert checks[kind]["state"] == "ok", checks[kind]
        assert 0 < checks[kind]["rttMs"] < 1000
    assert checks["turn-udp"]["url"] == coturn.urls[0]
    assert "turn-tls" in checks  # shown either way; Chromium decides itself whether it trusts the test's certificate
    for kind in ("bandwidth-down", "bandwidth-up"):
        assert checks[kind]["state"] == "ok" and checks[kind]["kbps"] > 500, checks[kind]
        assert checks[kind]["via"] == "udp-direct"

    rows = page.locator("#rows tr")
    assert await rows.count() == len(checks)
    assert await page.locator("tr[data-kind='turn-udp'] .state").inner_text() == "OK"
    verdict = await page.get_by_test_id("verdict").inner_text()
    assert verdict.startswith("Samtal är möjliga härifrån. Samtal går direkt över UDP (svarstid")
    summary = await page.get_by_test_id("summary").input_value()
    assert f"Nätverkskontroll: {server_with_turn.url}" in summary
    assert any(line.startswith("UDP direkt") and "OK" in line for line in summary.splitlines())
    assert any(line.startswith("TURN/UDP") and coturn.urls[0] in line for line in summary.splitlines())
    assert "Samtal är möjliga härifrån." in summary

    await page.select_option("#lang-select", "en")
    assert (await page.get_by_test_id("verdict").inner_text()).startswith(
        "Calls are possible from here. Calls go directly over UDP")


async def test_without_a_token_the_doctor_page_asks_for_one_and_takes_a_join_link(
        browser: Any, server_with_turn: RunningServer) -> None:
    page = await open_page(browser, f"{server_with_turn.url}/doctor/?seconds=1")
    await page.locator("#token-input").wait_for(state="visible")
    await page.fill("#token-input", "not-a-token")
    await page.click("#token-form button")
    await page.wait_for_function("() => naraDoctor.done")
    assert await page.locator("tr[data-kind='credential'] .state").inner_text() == "Misslyckades"
    assert (await page.get_by_test_id("verdict").inner_text()).startswith(
        "Inga samtal är möjliga härifrån. Servern godtog inte länken eller koden (felkod token_malformed)")

    room = server_with_turn.consultation()
    link = f"{server_with_turn.url}/c/{room}#token={server_with_turn.token(room, role='nurse')}"
    await page.locator("#token-input").wait_for(state="visible")  # offered again, for another token
    await page.fill("#token-input", link)
    await page.click("#token-form button")
    await page.wait_for_function(
        "() => naraDoctor.checks.find(c => c.kind === 'udp-direct')?.state === 'ok'", timeout=30000)
    await page.locator("#token-form").wait_for(state="hidden")



async def test_when_the_server_sends_every_call_through_turn_the_page_measures_that_path(
        browser: Any, tmp_path: Path, coturn: Coturn) -> None:
    running, runner = await start_server(tmp_path, turn_urls=coturn.urls, turn_static_auth_secret=coturn.secret,
                                         ice_transport_policy="relay")
    try:
        token, _ = mint_doctor_token(running.hub.authority)
        page = await open_page(browser, f"{running.url}/doctor/?seconds=1#token={token}")
        await page.wait_for_function("() => naraDoctor.done", timeout=60000)
        checks = await results(page)
        assert checks["udp-direct"]["state"] == "ok" and checks["turn-udp"]["state"] == "ok"
        assert checks["bandwidth-down"]["via"] == "turn-udp"  # the path calls take, not the direct one
        verdict = await page.get_by_test_id("verdict").inner_text()
        assert verdict.startswith("Samtal är möjliga härifrån. Servern skickar alla samtal via TURN: här över UDP "
                                  f"på port {coturn.port}")
    finally:
        await runner.cleanup()
