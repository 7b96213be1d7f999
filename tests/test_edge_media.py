"""The kit's media pieces: camera fallback, one capture for many readers, mixing, JPEGs, its credential file."""

from __future__ import annotations

import asyncio
import errno
import fractions
import json
import os
import stat
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bench.synthetic import read_stamp, source_luma
from edge.device_api import CredentialError, DeviceCredential, classify, read_credential, write_credential
from edge.media import SYNTHETIC_TAG, Capture, KitMedia
from edge.page import encode_jpeg
from edge.reconnect import Failure
from edge.remote import CHUNK, MIX_BACKLOG, Voice, mix


async def test_a_missing_camera_leaves_sound_only() -> None:
    media = await KitMedia.open("/dev/video-missing", "synthetic", 320, 240, 15)
    try:
        assert (media.status.camera, media.status.microphone) == ("missing", "ok")
        assert "/dev/video-missing does not exist" in media.status.camera_detail
        audio, video = media.call_tracks()
        assert audio is not None and video is None
        packet = await asyncio.wait_for(audio.recv(), 5)  # Opus from the microphone
        assert len(bytes(packet)) > 0
        audio.stop()
        assert media.self_view() is None
    finally:
        await media.close()


async def test_auto_without_any_camera_says_none_was_found() -> None:
    media = await KitMedia.open("auto", "none", 320, 240, 15)
    try:
        if media.status.camera == "ok":
            pytest.fail("this machine has a camera; the test expects none")
        assert media.status.camera == "missing" and "no camera found" in media.status.camera_detail
        assert media.status.microphone == "off"
        assert media.call_tracks() == (None, None)
    finally:
        await media.close()


async def test_each_call_gets_its_own_encoded_tracks_from_one_capture() -> None:
    media = await KitMedia.open("synthetic", "none", 320, 240, 15)
    try:
        first = media.call_tracks()[1]
        second = media.call_tracks()[1]
        assert first is not None and second is not None and first is not second
        packets = [await asyncio.wait_for(track.recv(), 5) for track in (first, second)]
        assert all(p.is_keyframe for p in packets)  # a new connection starts with a picture of its own
        first.stop()  # one call ends: the capture and the other call go on
        for _ in range(3):
            await asyncio.wait_for(second.recv(), 5)
        picture = media.self_view()
        assert picture is not None and read_stamp(picture.to_ndarray(format="yuv420p")[:240]).tag == SYNTHETIC_TAG
        second.stop()
    finally:
        await media.close()


def test_voices_are_summed_and_clipped() -> None:
    a = np.array([1000, -1000, 30000, -30000], dtype=np.int16)
    b = np.array([500, 500, 10000, -10000], dtype=np.int16)
    assert mix([a, b]).tolist() == [1500, -500, 32767, -32768]
    assert mix([a]).tolist() == a.tolist()


def test_a_voice_reaches_the_mixer_in_20_ms_chunks_whatever_its_frames_are_long() -> None:
    """A 40 ms packet, and a frame the receive path lengthened by a period (here 21.5 ms), play whole and in order."""
    voice = Voice()
    sound = np.arange(3 * CHUNK + 172, dtype=np.int16)
    voice.add(sound[:2 * CHUNK])  # a 40 ms packet
    voice.add(sound[2 * CHUNK:])  # a 20 ms frame lengthened by 1.8 ms (86 stereo samples)
    chunks = []
    while (chunk := voice.take()) is not None:
        chunks.append(chunk)
    assert [len(c) for c in chunks] == [CHUNK] * 3
    assert np.concatenate(chunks).tolist() == sound[:3 * CHUNK].tolist()
    voice.add(np.zeros(CHUNK - 172, dtype=np.int16))  # the next frame completes the fourth chunk
    fourth = voice.take()
    assert fourth is not None and fourth[:172].tolist() == sound[3 * CHUNK:].tolist()


def test_a_voice_keeps_only_its_newest_sound_when_the_speaker_falls_behind() -> None:
    voice = Voice()
    for n in range(MIX_BACKLOG + 5):
        voice.add(np.full(CHUNK, n, dtype=np.int16))
    taken = []
    while (chunk := voice.take()) is not None:
        taken.append(int(chunk[0]))
    assert taken == list(range(5, MIX_BACKLOG + 5))


def test_jpeg_of_a_picture_is_scaled_to_the_page() -> None:
    frame = av.VideoFrame.from_ndarray(np.full((720, 1280, 3), 200, dtype=np.uint8), format="rgb24")
    data = encode_jpeg(frame, max_width=640)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    decoded = next(av.open(__import__("io").BytesIO(data), format="mjpeg").decode(video=0))
    assert (decoded.width, decoded.height) == (640, 360)


def test_credential_is_written_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "kit" / "credential.json"
    credential = DeviceCredential("http://127.0.0.1:8080", "kit-abc", "s" * 43, "Kit 7")
    write_credential(path, credential)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_credential(path) == credential
    assert "s" * 43 not in repr(credential)
    os.chmod(path, 0o644)
    read_credential(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize(("content", "words"), [
    (None, "nara edge enrol"), ("{", "not JSON"), (json.dumps({"server": "x"}), "lacks")])
def test_an_unusable_credential_says_what_to_do(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "credential.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CredentialError, match=words):
        read_credential(path)


def test_network_errors_are_sorted_for_reconnecting() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("x", 1, False, True, None, None, None)
    unreachable = aiohttp.ClientConnectorError(key, OSError(errno.ENETUNREACH, "Network is unreachable"))
    refused = aiohttp.ClientConnectorError(key, OSError(errno.ECONNREFUSED, "Connection refused"))
    assert classify(unreachable).failure is Failure.NO_NETWORK
    assert classify(refused).failure is Failure.UNREACHABLE
    assert classify(TimeoutError()).failure is Failure.UNREACHABLE
    assert classify(OSError(errno.EHOSTUNREACH, "No route to host")).failure is Failure.NO_NETWORK


class FailingCamera(MediaStreamTrack):
    """A camera that gives a few frames, then fails the way a driver or a bug does."""

    kind = "video"

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.left = frames

    async def recv(self) -> av.VideoFrame:
        if self.left == 0:
            raise OverflowError("the device returned garbage")
        self.left -= 1
        frame = av.VideoFrame(64, 48, "yuv420p")
        frame.pts, frame.time_base = 0, fractions.Fraction(1, 90000)
        return frame


async def test_a_camera_that_fails_mid_call_ends_in_sound_only_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    media = await KitMedia.open("none", "synthetic", 64, 48, 15)
    try:
        media.video = Capture(FailingCamera(3), 4, media._camera_lost)
        media.status.camera = "ok"
        reader = media.video.track()
        for _ in range(3):
            await asyncio.wait_for(reader.recv(), 5)
        with pytest.raises(MediaStreamError):  # the call's video ends instead of waiting for ever
            await asyncio.wait_for(reader.recv(), 5)
        assert media.status.camera == "missing" and "OverflowError" in media.status.camera_detail
        assert "video source failed" in caplog.text
        audio, video = media.call_tracks()  # the next call: sound only
        assert audio is not None and video is None
        audio.stop()
    finally:
        await media.close()


def test_the_synthetic_camera_runs_past_eighteen_minutes() -> None:
    # 16384 frames at 15 fps: the picture's shift once outgrew its 16-bit arithmetic there
    for frame in (16383, 16384, 10**6):
        luma = source_luma(64, 48, frame)
        assert luma.dtype == np.uint8 and int(luma[0, 0]) == (frame * 4) % 200 + 28
