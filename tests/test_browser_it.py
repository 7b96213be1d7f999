"""IT staff's page in real headless Chromium, during a live call between two aiortc participants."""

from __future__ import annotations

from typing import Any

from .conftest import RunningServer
from .media_helpers import Watcher, join_publisher, receiving_from
from .test_browser_client import ARTIFACTS, browser, open_page

__all__ = ["browser"]  # Chromium, with the same rule for when it may be missing


async def test_it_page_signs_in_lists_the_call_and_charts_each_participants_link(
    server: RunningServer, browser: Any
) -> None:
    room = server.hub.store.create("Hemsjukvård Pajala", None, "pat-7f3a").id
    joined = [await join_publisher(server, room, tag) for tag in (1, 2)]
    clients = [client for client, _ in joined]
    watchers = [Watcher(c) for c in clients]
    try:
        for client, watcher, other in zip(clients, watchers, ("p2", "p1"), strict=True):
            await receiving_from(client, {other})
            watcher.follow()
        await watchers[0].wait_for(lambda: len(watchers[0].frames[2]) >= 5)

        page = await open_page(browser, f"{server.url}/it/")
        await page.fill("#admin-key", "not-the-admin-key")
        await page.click("#sign-in-form button[type=submit]")
        problem = page.locator('[data-testid="sign-in-problem"]')
        await problem.wait_for(state="visible")
        assert await problem.get_attribute("data-code") == "admin_key_invalid"
        assert "godtogs inte" in await problem.inner_text()
        assert await page.evaluate("sessionStorage.getItem('nara.it.key')") is None

        await page.fill("#admin-key", server.admin_key)
        await page.click("#sign-in-form button[type=submit]")
        consultation = page.locator(f'[data-consultation="{room}"]')
        await consultation.wait_for()
        assert server.admin_key not in page.url
        assert await page.evaluate("sessionStorage.getItem('nara.it.key')") == server.admin_key
        for pid in ("p1", "p2"):
            card = consultation.locator(f'[data-participant="{pid}"]')
            await card.wait_for()
            heading = await card.locator("h3").inner_text()
            assert "läkare" in heading and pid in heading
        # The charts fill as samples come in, and the latest bitrate both ways is above zero.
        chart = consultation.locator('[data-participant="p1"] canvas[data-chart="bitrate"]')
        first = int(await chart.get_attribute("data-points") or 0)
        await page.wait_for_function(
            """([room, first]) => {
                const c = document.querySelector(`[data-consultation="${room}"] [data-participant="p1"] `
                                                  + 'canvas[data-chart="bitrate"]');
                const h = naraDebug.history.get(`${room}/p1`);
                return c && Number(c.dataset.points) >= first + 2 && h.up.at(-1) > 0 && h.down.at(-1) > 0
                       && h.rtt.at(-1) > 0;
            }""", arg=[room, first], timeout=20000)
        painted = await page.evaluate("""(room) => {
            const c = document.querySelector(`[data-consultation="${room}"] [data-participant="p1"] `
                                              + 'canvas[data-chart="bitrate"]');
            const pixels = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let lit = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) lit++;
            return lit;
        }""", room)
        assert painted > 200
        text = await page.locator("main").inner_text()
        assert "Hemsjukvård Pajala" not in text and "pat-7f3a" not in text and "P1" not in text
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "it-page.png"), full_page=True)

        # A reload keeps the sign-in of this tab; signing out forgets it.
        await page.reload()
        await consultation.wait_for()
        await page.click("#sign-out")
        await page.locator("#admin-key").wait_for()
        assert await page.evaluate("sessionStorage.getItem('nara.it.key')") is None
    finally:
        for watcher in watchers:
            await watcher.stop()
        for client in clients:
            await client.close()
