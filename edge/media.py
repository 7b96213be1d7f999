"""The kit's camera and microphone, and what it publishes from them in a call.

Sources:

* V4L2 cameras (USB webcams) through PyAV, on a reader thread;
* the Raspberry Pi camera through picamera2, when it is installed (the Pi 5
  has no hardware H.264 encoder, so frames are taken raw and encoded in
  software like any other);
* ALSA microphones through PyAV;
* synthetic sources for tests and demos (``bench/synthetic.py``: stamped
  pictures a receiver can identify, and a voiced tone).

A camera that is missing or fails is not a crash: the kit carries on with
audio only and says so on its screen (``MediaStatus``).

A capture runs for the agent's whole life, so the self view works between
calls and a reconnect does not reopen the camera. Each call gets fresh
tracks from it: Nära's VP8 encoder (``EncodedVideoTrack``, following the
server's REMB and keyframe requests) and Nära's Opus (24 kbit/s with FEC).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from mediaserver.encoders import OpusTrack
from mediaserver.video_encoders import EncodedVideoTrack, Vp8Encoder

logger = logging.getLogger(__name__)

START_BITRATE = 300_000  # VP8 starts here on a new connection, then follows the server's REMB
SYNTHETIC_TAG = 7  # the stamp synthetic kit pictures carry
SYNTHETIC_TONE = 550.0  # Hz, a whole number of 50 Hz bins (20 ms frames), unlike the bench's tones
VIDEO_QUEUE = 2  # frames a slow reader may fall behind before the oldest are dropped
AUDIO_QUEUE = 25  # 20 ms frames: half a second


class CameraUnavailable(Exception):
    """No picture can be had from the configured camera."""


@dataclass
class MediaStatus:
    camera: str = "off"  # "ok", "off" (configured none) or "missing"
    camera_detail: str = ""
    microphone: str = "off"  # "ok", "off" or "missing"
    microphone_detail: str = ""

    def public(self) -> dict[str, str]:
        return {"camera": self.camera, "camera_detail": self.camera_detail,
                "microphone": self.microphone, "microphone_detail": self.microphone_detail}


# --- device sources -----------------------------------------------------------------


class ThreadedSource(MediaStreamTrack):
    """Frames read by a blocking reader on a thread of its own, handed to the event loop."""

    def __init__(self, kind: str, read: Callable[[], Iterator[av.VideoFrame | av.AudioFrame]],
                 close: Callable[[], None]) -> None:
        super().__init__()
        self.kind = kind
        self._event_loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[av.VideoFrame | av.AudioFrame | None] = asyncio.Queue(maxsize=50)
        self._close = close
        self._running = True
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(read,), name=f"nara-{kind}", daemon=True)
        self._thread.start()

    def _run(self, read: Callable[[], Iterator[av.VideoFrame | av.AudioFrame]]) -> None:
        try:
            for frame in read():
                if not self._running:
                    break
                self._event_loop.call_soon_threadsafe(self._offer, frame)
        except Exception as exc:  # a device that fails mid-way ends the source, never the agent
            self.error = str(exc) or type(exc).__name__
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may already be closed
                self._event_loop.call_soon_threadsafe(self._offer, None)

    def _offer(self, frame: av.VideoFrame | av.AudioFrame | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(frame)

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        frame = await self._queue.get()
        if frame is None:
            self._queue.put_nowait(None)
            raise MediaStreamError(self.error or "the device stopped")
        return frame

    def stop(self) -> None:
        self._running = False
        self._close()
        super().stop()


def open_v4l2(device: str, width: int, height: int, fps: int) -> ThreadedSource:
    """A USB/V4L2 camera through PyAV."""
    if not Path(device).exists():
        raise CameraUnavailable(f"{device} does not exist")
    try:
        container = av.open(device, format="v4l2", options={
            "video_size": f"{width}x{height}", "framerate": str(fps), "input_format": "mjpeg"})
    except (av.FFmpegError, OSError, ValueError):
        try:  # not every camera offers MJPEG; take its default format
            container = av.open(device, format="v4l2",
                                options={"video_size": f"{width}x{height}", "framerate": str(fps)})
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise CameraUnavailable(f"{device} cannot be opened: {exc}") from None

    def read() -> Iterator[av.VideoFrame]:
        yield from container.decode(video=0)

    return ThreadedSource("video", read, container.close)


def open_picamera2(width: int, height: int, fps: int) -> ThreadedSource:
    """The Raspberry Pi camera (CSI) through picamera2, raw YUV420 frames."""
    try:
        picamera2: Any = importlib.import_module("picamera2")  # optional: only on a Raspberry Pi
    except ImportError:
        raise CameraUnavailable("picamera2 is not installed") from None
    try:
        camera = picamera2.Picamera2()
        camera.configure(camera.create_video_configuration(
            main={"size": (width, height), "format": "YUV420"},
            controls={"FrameDurationLimits": (1_000_000 // fps, 1_000_000 // fps)}))
        camera.start()
    except Exception as exc:  # picamera2 raises many kinds when no camera is attached
        raise CameraUnavailable(f"the Pi camera cannot be started: {exc}") from None
    began = time.monotonic()

    def read() -> Iterator[av.VideoFrame]:
        while True:
            pixels = camera.capture_array("main")
            frame = av.VideoFrame.from_ndarray(pixels, format="yuv420p")
            frame.pts = int((time.monotonic() - began) * 90_000)
            frame.time_base = fractions.Fraction(1, 90_000)
            yield frame

    def close() -> None:
        with contextlib.suppress(Exception):
            camera.stop()
            camera.close()

    return ThreadedSource("video", read, close)


def open_alsa(name: str) -> ThreadedSource:
    """A microphone through ALSA (``default``, ``hw:1,0`` …)."""
    try:
        container = av.open(name, format="alsa", options={"sample_rate": "48000", "channels": "1"})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise CameraUnavailable(f"the microphone {name} cannot be opened: {exc}") from None

    def read() -> Iterator[av.AudioFrame]:
        yield from container.decode(audio=0)

    return ThreadedSource("audio", read, container.close)


def open_camera(spec: str, width: int, height: int, fps: int) -> MediaStreamTrack:
    """The configured camera; "auto" tries /dev/video0…3, then the Pi camera. Raises CameraUnavailable."""
    if spec == "synthetic":
        return StampedVideoTrack(SYNTHETIC_TAG, width=width, height=height, fps=fps)
    if spec == "picamera2":
        return open_picamera2(width, height, fps)
    if spec != "auto":
        return open_v4l2(spec, width, height, fps)
    tried = []
    for device in (f"/dev/video{n}" for n in range(4)):
        if Path(device).exists():
            try:
                return open_v4l2(device, width, height, fps)
            except CameraUnavailable as exc:
                tried.append(str(exc))
    try:
        return open_picamera2(width, height, fps)
    except CameraUnavailable as exc:
        tried.append(str(exc))
    raise CameraUnavailable("no camera found (" + "; ".join(tried or ["no /dev/video device"]) + ")")


def open_microphone(spec: str) -> MediaStreamTrack:
    if spec == "synthetic":
        return ToneAudioTrack(SYNTHETIC_TONE, voiced=True)
    return open_alsa("default" if spec == "auto" else spec)


# --- one capture, many readers ----------------------------------------------------------------


class Capture:
    """Reads a source for as long as the agent runs and hands every frame to whoever reads it now."""

    def __init__(self, source: MediaStreamTrack, queue_size: int,
                 on_end: Callable[[str], None] | None = None) -> None:
        self.source = source
        self.kind = source.kind
        self.queue_size = queue_size
        self.on_end = on_end
        self.latest: Any = None  # the newest frame, for the self view
        self.frames = 0
        self._readers: set[LiveTrack] = set()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.source.recv()
                self.latest = frame
                self.frames += 1
                for reader in list(self._readers):
                    reader.offer(frame)
        except MediaStreamError as exc:
            logger.warning("%s source ended: %s", self.kind, exc or "no reason given")
            if self.on_end is not None:
                self.on_end(str(exc) or "the device stopped")
        except Exception as exc:  # a source that fails ends the capture, never the agent, and says why
            logger.exception("%s source failed", self.kind)
            if self.on_end is not None:
                self.on_end(f"{type(exc).__name__}: {exc}")
        finally:
            for reader in list(self._readers):
                reader.offer(None)

    def track(self) -> LiveTrack:
        """A new track that gets every frame from now on."""
        reader = LiveTrack(self)
        self._readers.add(reader)
        return reader

    def _forget(self, reader: LiveTrack) -> None:
        self._readers.discard(reader)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.source.stop()


class LiveTrack(MediaStreamTrack):
    """One reader of a ``Capture``; a slow reader loses the oldest frames, never holds up the others."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.kind = capture.kind
        self._capture = capture
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=capture.queue_size)

    def offer(self, frame: Any) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(frame)

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame

    def stop(self) -> None:
        self._capture._forget(self)
        super().stop()


# --- the kit's media --------------------------------------------------------------------------


class KitMedia:
    """The kit's camera and microphone captures, their status, and fresh tracks for each call."""

    def __init__(self, width: int, height: int, fps: int) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.status = MediaStatus()
        self.video: Capture | None = None
        self.audio: Capture | None = None

    @classmethod
    async def open(cls, camera: str, microphone: str, width: int, height: int, fps: int) -> KitMedia:
        media = cls(width, height, fps)
        if camera == "none":
            media.status.camera, media.status.camera_detail = "off", "no camera configured"
        else:
            try:
                source = open_camera(camera, width, height, fps)
            except CameraUnavailable as exc:
                logger.warning("no camera, audio only: %s", exc)
                media.status.camera, media.status.camera_detail = "missing", str(exc)
            else:
                media.video = Capture(source, VIDEO_QUEUE, media._camera_lost)
                media.status.camera, media.status.camera_detail = "ok", camera
        if microphone == "none":
            media.status.microphone, media.status.microphone_detail = "off", "no microphone configured"
        else:
            try:
                source = open_microphone(microphone)
            except CameraUnavailable as exc:
                logger.warning("no microphone: %s", exc)
                media.status.microphone, media.status.microphone_detail = "missing", str(exc)
            else:
                media.audio = Capture(source, AUDIO_QUEUE, media._microphone_lost)
                media.status.microphone, media.status.microphone_detail = "ok", microphone
        return media

    def _camera_lost(self, reason: str) -> None:
        self.status.camera, self.status.camera_detail = "missing", f"the camera stopped: {reason}"

    def _microphone_lost(self, reason: str) -> None:
        self.status.microphone, self.status.microphone_detail = "missing", f"the microphone stopped: {reason}"

    def call_tracks(self) -> tuple[MediaStreamTrack | None, EncodedVideoTrack | None]:
        """(audio, video) for a new call, encoded by Nära's encoders; the call stops them when it ends."""
        audio = OpusTrack(self.audio.track()) if self.audio is not None and self.status.microphone == "ok" else None
        video = None
        if self.video is not None and self.status.camera == "ok":
            encoder = Vp8Encoder(self.width, self.height, self.fps, START_BITRATE)
            video = EncodedVideoTrack(self.video.track(), encoder)
        return audio, video

    def self_view(self) -> av.VideoFrame | None:
        return self.video.latest if self.video is not None and self.status.camera == "ok" else None

    async def close(self) -> None:
        for capture in (self.video, self.audio):
            if capture is not None:
                await capture.close()
