"""The kit's judgement of a dead link: a signalling connection that stalls while the call's media still flows
(a pong stuck behind a photo's bytes on a thin uplink) is not an outage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench.edge import KitLink
from edge.agent import KitAgent
from edge.config import EdgeConfig
from edge.reconnect import State

from .conftest import RunningServer
from .edge_helpers import KitWatcher, admin, enrolled_kit, kit_config

STALL = 5.0  # longer than the 2.8 s without a pong that alone once ended the call


@contextlib.asynccontextmanager
async def agent_running(config: EdgeConfig) -> AsyncIterator[KitAgent]:
    agent = KitAgent(config)
    task = asyncio.ensure_future(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_stalled_signalling_connection_with_media_flowing_keeps_the_call(
        server: RunningServer, tmp_path: Path) -> None:
    link = KitLink(server.url)
    await link.start()
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation()
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
    clinician = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
    config = kit_config(link.server_url, credential, turn=link.relay)
    try:
        async with agent_running(config) as agent:
            await clinician.wait_for(clinician.sees_kit, 20)
            await agent.wait_for(lambda: agent.state is State.CONNECTED, 10)
            link.proxy.cut()  # the signalling goes quiet; the media, through the relay, flows on
            stalled = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await agent.wait_for(lambda: agent.state is not State.CONNECTED, STALL)
            assert agent.state is State.CONNECTED, f"rebuilt after {time.monotonic() - stalled:.1f} s"
            assert clinician.kit_video_after(time.monotonic() - 1.0) is not None  # and the clinician still sees it
    finally:
        await clinician.close()
        await link.close()
