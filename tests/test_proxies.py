"""The client's address behind a trusted TLS proxy: what the image access log records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from signalling.config import ServerConfig
from signalling.proxies import client_address, parse_networks
from signalling.settings import validate

from .conftest import start_server

PROXIES = parse_networks(["127.0.0.1/32", "10.20.0.0/24", "::1"])


@pytest.mark.parametrize(("peer", "header", "client"), [
    ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),                      # nginx on the same host
    ("127.0.0.1", ["203.0.113.7, 10.20.0.4"], "203.0.113.7"),           # through a second trusted proxy
    ("127.0.0.1", ["198.51.100.9, 203.0.113.7"], "203.0.113.7"),        # the client's own claim is not believed
    ("127.0.0.1", ["198.51.100.9", "203.0.113.7"], "203.0.113.7"),      # the header given twice
    ("127.0.0.1", ["203.0.113.7, not-an-address"], "127.0.0.1"),        # garbage ends the walk at the proxy
    ("127.0.0.1", [], "127.0.0.1"),                                     # a proxy's own request
    ("::1", ["2001:db8::5"], "2001:db8::5"),
    ("203.0.113.50", ["192.0.2.1"], "203.0.113.50"),                    # not a proxy: the header is ignored
    (None, ["192.0.2.1"], None),
])
def test_client_address(peer: str | None, header: list[str], client: str | None) -> None:
    assert client_address(peer, header, PROXIES) == client


def test_a_trusted_proxy_that_is_no_address_is_refused_with_its_field() -> None:
    problems = validate(ServerConfig(trusted_proxies=["127.0.0.1", "nginx.local"]))
    assert [(p.field, p.code) for p in problems] == [("server.trusted_proxies", "invalid_network")]
    assert "'nginx.local' is not an IP address or network" in problems[0].message


async def refusals_logged_from(tmp_path: Path, forwarded_for: str, **config: Any) -> list[str | None]:
    """A request for an image without a token, as the proxy passes it on; the remote addresses the
    access log then shows IT staff."""
    running, runner = await start_server(tmp_path, **config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{running.url}/api/images/img-1", params={"consultation": "c-1"},
                                headers={"X-Forwarded-For": forwarded_for}) as r:
                assert r.status == 401
            async with http.get(f"{running.url}/api/audit/image-access",
                                headers={"Authorization": f"Bearer {running.admin_key}"}) as r:
                entries: list[dict[str, Any]] = (await r.json())["entries"]
        return [e["remote"] for e in entries if e["outcome"] == "refused"]
    finally:
        await runner.cleanup()


async def test_access_log_records_the_client_behind_a_trusted_proxy(tmp_path: Path) -> None:
    assert await refusals_logged_from(tmp_path, "203.0.113.7", trusted_proxies=["127.0.0.1/32"]) == ["203.0.113.7"]


async def test_without_trusted_proxies_the_header_changes_nothing(tmp_path: Path) -> None:
    assert await refusals_logged_from(tmp_path, "203.0.113.7") == ["127.0.0.1"]


async def test_the_websocket_works_through_a_trusted_proxy(tmp_path: Path) -> None:
    running, runner = await start_server(tmp_path, trusted_proxies=["127.0.0.1/32"])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{running.url}/ws", headers={"X-Forwarded-For": "203.0.113.7"}) as ws:
                await ws.send_json({"type": "join", "room": "no-such-room", "token": "x"})
                answer = await ws.receive_json(timeout=5)
        assert answer["code"] == "room_not_found", answer
    finally:
        await runner.cleanup()
