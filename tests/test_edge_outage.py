"""The kit through outages: its whole link cut and restored, and the server killed and restarted mid-call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from edge.reconnect import State

from .conftest import RunningServer
from .edge_helpers import KitWatcher, ServerProcess, admin, agent_running, enrolled_kit, kit_config, kit_in_call

OUTAGE = 5.0
RECOVERY_GOAL = 3.0
RESTART_GOAL = 5.0


async def test_media_flows_again_within_3_s_of_the_link_coming_back(server: RunningServer, tmp_path: Path) -> None:
    async with kit_in_call(server, tmp_path) as call:
        link, agent, clinician = call.link, call.agent, call.clinician
        assert link.turn.allocations, "the kit's media goes through the relay"
        for _ in range(2):
            await clinician.wait_for(lambda: clinician.kit_video_after(time.monotonic() - 0.5) is not None)
            cut = time.monotonic()
            link.cut()
            # The kit notices within 3 s, by itself.
            await agent.wait_for(lambda: agent.state in (State.RECONNECTING, State.NO_NETWORK), 3.5)
            noticed = time.monotonic() - cut
            assert noticed <= 3.2, noticed
            await asyncio.sleep(OUTAGE - noticed)  # the rest of the outage
            link.restore()
            back = time.monotonic()
            await clinician.wait_for(lambda back=back: clinician.kit_video_after(back) is not None, 10)
            recovered = clinician.kit_video_after(back)
            assert recovered is not None and recovered - back < RECOVERY_GOAL, recovered
        reasons = [t.reason.split(":")[0] for t in agent.machine.transitions if t.new is State.RECONNECTING]
        assert set(reasons) <= {"heartbeat", "media", "unreachable"}


async def test_server_killed_mid_call_the_kit_is_back_within_5_s(tmp_path: Path) -> None:
    served = ServerProcess(tmp_path / "server")
    await asyncio.to_thread(served.start)
    try:
        kit_id, credential = await enrolled_kit(served.url, served.admin_key, tmp_path)
        consultation = await admin(served.url, served.admin_key, "POST", "/api/consultations",
                                   {"title": "Planerat", "scheduled_for": time.time()})
        room = consultation["id"]
        await admin(served.url, served.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
        async with agent_running(kit_config(served.url, credential)) as agent:
            clinician = await KitWatcher.join(served.url, room, await served.token(room), kit_id)
            await clinician.wait_for(clinician.sees_kit, 20)
            await clinician.close()
            served.kill()
            await agent.wait_for(lambda: agent.state is State.RECONNECTING, 3.5)
            await agent.wait_for(lambda: agent.machine.attempt >= 2, 10)  # retried at least once in vain
            ready = await asyncio.to_thread(served.start)
            clinician = await KitWatcher.join(served.url, room, await served.token(room), kit_id)
            try:
                await clinician.wait_for(lambda: clinician.kit_video_after(ready) is not None, 10)
                back = clinician.kit_video_after(ready)
                assert back is not None and back - ready < RESTART_GOAL, back - ready
                async with aiohttp.ClientSession() as http, http.get(f"{served.url}/healthz") as response:
                    assert response.status == 200
            finally:
                await clinician.close()
    finally:
        if served.process is not None:
            served.process.terminate()
            served.process.wait(timeout=20)
