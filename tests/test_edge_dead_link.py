"""The kit's judgement of a dead link: a signalling connection that stalls while the call's media still flows
(a pong stuck behind a photo's bytes on a thin uplink) is not an outage."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from edge.reconnect import State

from .conftest import RunningServer
from .edge_helpers import kit_in_call

STALL = 5.0  # longer than the 2.8 s without a pong that alone once ended the call


async def test_a_stalled_signalling_connection_with_media_flowing_keeps_the_call(
        server: RunningServer, tmp_path: Path) -> None:
    async with kit_in_call(server, tmp_path) as call:
        agent, clinician = call.agent, call.clinician
        await agent.wait_for(lambda: agent.state is State.CONNECTED, 10)
        call.link.proxy.cut()  # the signalling goes quiet; the media, through the relay, flows on
        stalled = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await agent.wait_for(lambda: agent.state is not State.CONNECTED, STALL)
        assert agent.state is State.CONNECTED, f"rebuilt after {time.monotonic() - stalled:.1f} s"
        assert clinician.kit_video_after(time.monotonic() - 1.0) is not None  # and the clinician still sees it
