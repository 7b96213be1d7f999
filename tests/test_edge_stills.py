"""Stills at full resolution from the kit's camera while its call goes on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bench.synthetic import StampedVideoTrack, read_stamp
from edge.media import SYNTHETIC_TAG, VIDEO_QUEUE, Capture, StillFailed, largest_mode
from edge.reconnect import State
from edge.scene import STILL_HEIGHT, STILL_WIDTH, SyntheticScene

from .conftest import RunningServer
from .edge_helpers import KitWatcher, admin, enrolled_kit, kit_config
from .test_edge_agent import running_kit


async def test_a_still_during_a_call_leaves_the_calls_video_running(server: RunningServer, tmp_path: Path) -> None:
    kit_id, credential = await enrolled_kit(server.url, server.admin_key, tmp_path)
    room = server.consultation("Hembesök")
    await admin(server.url, server.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
    async with running_kit(kit_config(server.url, credential)) as kit:
        await kit.agent.wait_for(lambda: kit.agent.state is State.WAITING, 10)
        team = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"), kit_id)
        try:
            await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
            await team.wait_for(team.sees_kit, 20)
            media = kit.agent.media
            assert media is not None
            still = await media.still()
            assert still.shape == (STILL_HEIGHT, STILL_WIDTH, 3)
            taken = time.monotonic()
            await team.wait_for(lambda: sum(1 for t in team.video_at if t > taken) >= 10, 10)
            # A camera that fails during the still says why; the call and its video go on.
            media.scene = SyntheticScene(fail="the cable came loose")
            with pytest.raises(StillFailed, match="the cable came loose") as failed:
                await media.still()
            assert failed.value.code == "camera_failed"
            failed_at = time.monotonic()
            await team.wait_for(lambda: sum(1 for t in team.video_at if t > failed_at) >= 10, 10)
            assert kit.agent.state is State.CONNECTED and media.status.camera == "ok"
        finally:
            await team.close()


async def test_a_camera_reopened_for_a_still_feeds_the_same_call_track() -> None:
    """What a V4L2 camera goes through: streaming closed, the still taken, streaming opened again."""
    capture = Capture(StampedVideoTrack(SYNTHETIC_TAG, 320, 240, 15), VIDEO_QUEUE)
    call_video = capture.track()
    try:
        await asyncio.wait_for(call_video.recv(), 5)
        first = capture.source
        await capture.hold()
        assert first.readyState == "ended"  # the device is free for the still
        capture.resume(StampedVideoTrack(SYNTHETIC_TAG, 320, 240, 15))
        frame = await asyncio.wait_for(call_video.recv(), 5)
        assert read_stamp(frame.to_ndarray(format="yuv420p")[:240]).tag == SYNTHETIC_TAG
        assert call_video.readyState == "live"
    finally:
        call_video.stop()
        await capture.close()


@pytest.mark.parametrize(("modes", "chosen"), [
    ([("YUYV", 640, 480), ("MJPG", 2592, 1944), ("YUYV", 2592, 1944), ("MJPG", 1920, 1080)], ("MJPG", 2592, 1944)),
    ([("YUYV", 640, 480), ("YUYV", 1280, 720)], ("YUYV", 1280, 720)),
    ([("H264", 1920, 1080), ("MJPG", 1280, 720)], ("H264", 1920, 1080)),
    ([], None),
])
def test_a_v4l2_camera_takes_its_still_in_its_largest_mode(modes: list[tuple[str, int, int]],
                                                            chosen: tuple[str, int, int] | None) -> None:
    assert largest_mode(modes) == chosen
