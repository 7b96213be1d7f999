"""Shared fixtures: a real Nära server on loopback, with its own data directory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from mediaserver.aiortc_adapter import restrict_host_addresses
from signalling.app import build_app
from signalling.config import ServerConfig
from signalling.rest import ADMIN_KEY
from signalling.ws import HUB, SignallingHub


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    """Peers made in the test process gather ICE candidates on loopback, the only network the tests use.

    (aioice leaves loopback out by default, and a server started in this
    process would set the same; a test must not depend on which ran first.
    Set before every test: a test that tried other addresses and set them
    back to aioice's own left the next test's kit with no candidate at all.)
    """
    restrict_host_addresses(["127.0.0.1"])


@dataclass
class RunningServer:
    url: str
    app: web.Application
    config: ServerConfig

    @property
    def hub(self) -> SignallingHub:
        return self.app[HUB]

    @property
    def admin_key(self) -> str:
        return self.app[ADMIN_KEY]

    def consultation(self, title: str = "Test") -> str:
        return self.hub.store.create(title).id

    def token(self, room: str, name: str = "Test", role: str = "clinician", **kw: object) -> str:
        token, _ = self.hub.authority.mint(room, name, role, **kw)  # type: ignore[arg-type]
        return token


async def start_server(
    tmp_path: Path, port: int = 0, **overrides: object
) -> tuple[RunningServer, web.AppRunner]:
    # media_workers=0: the SFU runs in the test's own process (the embedded mode), so tests may look inside
    # server.hub.media.rooms[...]; tests/test_workers.py runs real `nara serve --workers 2` processes.
    config = ServerConfig(data_dir=tmp_path / "data", port=port, demo=False, media_workers=0)
    for key, value in overrides.items():
        setattr(config, key, value)
    app = build_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config.port = port
    return RunningServer(f"http://127.0.0.1:{port}", app, config), runner


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, runner = await start_server(tmp_path)
    yield running
    await runner.cleanup()


@pytest.fixture
async def forwarding_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server that forwards every original untouched (adaptation off): for tests of forwarding
    itself (routing, repair, keyframes, leaks) that read the stamps only an original carries
    unscaled. Adaptation has its own tests (test_ladder.py, the bench)."""
    running, runner = await start_server(tmp_path, adaptation=False)
    yield running
    await runner.cleanup()


def in_ci() -> bool:
    return bool(os.environ.get("CI"))
