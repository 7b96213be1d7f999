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

A wound photo is a still at the camera's full resolution (``KitMedia.still``):
a V4L2 camera is closed, opened in its largest mode for the still and opened
again for streaming; the Pi camera switches mode between two video frames;
the synthetic camera renders a wound scene (``edge/scene.py``). Meanwhile the
call's video holds its last picture. A still that fails raises
``StillFailed`` with the reason; the call goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import fractions
import importlib
import logging
import os
import queue
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from mediaserver.encoders import NORMAL, OpusProfile, OpusTrack
from mediaserver.video_encoders import EncodedVideoTrack, Vp8Encoder

from .scene import Image, SyntheticScene, render_scene

logger = logging.getLogger(__name__)

START_BITRATE = 300_000  # VP8 starts here on a new connection, then follows the server's REMB
SYNTHETIC_TAG = 7  # the stamp synthetic kit pictures carry
SYNTHETIC_TONE = 550.0  # Hz, a whole number of 50 Hz bins (20 ms frames), unlike the bench's tones
VIDEO_QUEUE = 2  # frames a slow reader may fall behind before the oldest are dropped
AUDIO_QUEUE = 25  # 20 ms frames: half a second
STILL_WARMUP = 1.0  # seconds a V4L2 camera runs in its still mode before the picture is taken (exposure settles)
STILL_TIMEOUT = 15.0
_EPOCH = time.monotonic()  # V4L2 frames are stamped from here, so a camera opened again continues the timeline


class CameraUnavailable(Exception):
    """No picture can be had from the configured camera."""


class StillFailed(Exception):
    """The camera did not give a still. ``code``: ``no_camera``, ``camera_busy`` or ``camera_failed``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


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
        self.device: str | None = None  # the V4L2 device it reads, if one
        self.still_requests: queue.SimpleQueue[concurrent.futures.Future[Image]] | None = None  # the Pi camera's
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

    async def stopped(self, timeout: float = 5.0) -> bool:
        """Wait (after ``stop``) until the reader thread has let go of the device."""
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        return not self._thread.is_alive()


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
        for frame in container.decode(video=0):
            frame.pts = int((time.monotonic() - _EPOCH) * 90_000)
            frame.time_base = fractions.Fraction(1, 90_000)
            yield frame

    source = ThreadedSource("video", read, container.close)
    source.device = device
    return source


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
    stills: queue.SimpleQueue[concurrent.futures.Future[Image]] = queue.SimpleQueue()

    def read() -> Iterator[av.VideoFrame]:
        while True:
            while not stills.empty():  # between two video frames: the still at full resolution, then back
                wanted = stills.get_nowait()
                try:
                    still = camera.switch_mode_and_capture_array(
                        camera.create_still_configuration(main={"format": "RGB888"}), "main")  # BGR in memory
                except Exception as exc:  # the video goes on; the nurse is told the still failed
                    wanted.set_exception(StillFailed("camera_failed", f"the Pi camera's still failed: {exc}"))
                else:
                    wanted.set_result(np.ascontiguousarray(still[:, :, :3], dtype=np.uint8))
            pixels = camera.capture_array("main")
            frame = av.VideoFrame.from_ndarray(pixels, format="yuv420p")
            frame.pts = int((time.monotonic() - began) * 90_000)
            frame.time_base = fractions.Fraction(1, 90_000)
            yield frame

    def close() -> None:
        with contextlib.suppress(Exception):
            camera.stop()
            camera.close()

    source = ThreadedSource("video", read, close)
    source.still_requests = stills
    return source


# --- stills at full resolution from a V4L2 camera ------------------------------------------------

_V4L2_CAPTURE = 1  # V4L2_BUF_TYPE_VIDEO_CAPTURE
_FMTDESC = struct.Struct("III32sII3I")  # struct v4l2_fmtdesc
_FRMSIZE = struct.Struct("III6I2I")  # struct v4l2_frmsizeenum
_FRMSIZE_DISCRETE = 1
_INPUT_FORMATS = {"MJPG": "mjpeg", "YUYV": "yuyv422", "H264": "h264"}  # V4L2 fourcc -> FFmpeg's input_format


def _iowr(number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("V") << 8) | number


_VIDIOC_ENUM_FMT = _iowr(2, _FMTDESC.size)
_VIDIOC_ENUM_FRAMESIZES = _iowr(74, _FRMSIZE.size)


def v4l2_modes(device: str) -> list[tuple[str, int, int]]:
    """(fourcc, width, height) of every size the camera offers (the largest of a stepwise range)."""
    modes = []
    fd = os.open(device, os.O_RDWR | os.O_NONBLOCK)
    try:
        for index in range(64):
            try:
                desc = bytearray(_FMTDESC.pack(index, _V4L2_CAPTURE, 0, b"", 0, 0, 0, 0, 0))
                fcntl.ioctl(fd, _VIDIOC_ENUM_FMT, desc)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    break
                raise
            pixel_format = _FMTDESC.unpack(desc)[4]
            fourcc = pixel_format.to_bytes(4, "little").decode("ascii", "replace")
            for size_index in range(256):
                try:
                    size = bytearray(_FRMSIZE.pack(size_index, pixel_format, 0, 0, 0, 0, 0, 0, 0, 0, 0))
                    fcntl.ioctl(fd, _VIDIOC_ENUM_FRAMESIZES, size)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        break
                    raise
                fields = _FRMSIZE.unpack(size)
                if fields[2] == _FRMSIZE_DISCRETE:
                    modes.append((fourcc, fields[3], fields[4]))
                else:  # stepwise or continuous: min_width, max_width, step, min_height, max_height, step
                    modes.append((fourcc, fields[4], fields[7]))
                    break
    finally:
        os.close(fd)
    return modes


def largest_mode(modes: list[tuple[str, int, int]]) -> tuple[str, int, int] | None:
    """The mode with the most pixels; at equal size a compressed one (MJPEG), which USB carries fastest."""
    usable = [m for m in modes if m[1] > 0 and m[2] > 0]
    if not usable:
        return None
    return max(usable, key=lambda m: (m[1] * m[2], m[0] == "MJPG", m[0] in _INPUT_FORMATS))


def v4l2_still(device: str, warmup: float = STILL_WARMUP) -> Image:
    """A still from ``device`` in its largest mode (blocking; the device must not be streaming)."""
    try:
        mode = largest_mode(v4l2_modes(device))
    except OSError as exc:
        raise StillFailed("camera_failed", f"{device} cannot be asked for its modes: {exc.strerror or exc}") from None
    if mode is None:
        raise StillFailed("camera_failed", f"{device} offers no picture size")
    fourcc, width, height = mode
    options = {"video_size": f"{width}x{height}"}
    if fourcc in _INPUT_FORMATS:
        options["input_format"] = _INPUT_FORMATS[fourcc]
    try:
        container = av.open(device, format="v4l2", options=options)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise StillFailed("camera_failed", f"{device} cannot be opened at {width}x{height}: {exc}") from None
    try:
        began: float | None = None
        for frame in container.decode(video=0):
            began = began if began is not None else time.monotonic()
            if time.monotonic() - began >= warmup:
                return np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise StillFailed("camera_failed", f"{device} failed during the still: {exc}") from None
    finally:
        container.close()
    raise StillFailed("camera_failed", f"{device} stopped giving pictures in its still mode")


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
        self._holding = False
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
            if not self._holding:
                for reader in list(self._readers):
                    reader.offer(None)

    async def hold(self) -> None:
        """Stop reading and close the source; readers keep their tracks, which get no frame until ``resume``."""
        self._holding = True
        try:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.source.stop()
        finally:
            self._holding = False

    def resume(self, source: MediaStreamTrack) -> None:
        """Read from ``source`` (the device opened again) for the same readers."""
        self.source = source
        self._task = asyncio.ensure_future(self._run())

    def end(self, reason: str) -> None:
        """The source could not be opened again: the readers' tracks end, as when a device fails."""
        logger.warning("%s source not reopened: %s", self.kind, reason)
        for reader in list(self._readers):
            reader.offer(None)
        if self.on_end is not None:
            self.on_end(reason)

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
        self.scene = SyntheticScene()  # what the synthetic camera's stills show
        self.stills = 0
        self.audio_profile = NORMAL  # how the call's audio is encoded now
        self._audio_tracks: weakref.WeakSet[OpusTrack] = weakref.WeakSet()
        self._still_lock = asyncio.Lock()

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
        audio = None
        if self.audio is not None and self.status.microphone == "ok":
            audio = OpusTrack(self.audio.track())
            audio.use(self.audio_profile)
            self._audio_tracks.add(audio)
        video = None
        if self.video is not None and self.status.camera == "ok":
            encoder = Vp8Encoder(self.width, self.height, self.fps, START_BITRATE)
            video = EncodedVideoTrack(self.video.track(), encoder)
        return audio, video

    def use_audio(self, profile: OpusProfile) -> None:
        """Encode the call's audio as ``profile`` says, from the next packet on, in this call and the next."""
        self.audio_profile = profile
        for track in list(self._audio_tracks):
            track.use(profile)

    def self_view(self) -> av.VideoFrame | None:
        return self.video.latest if self.video is not None and self.status.camera == "ok" else None

    async def still(self) -> Image:
        """A still at the camera's full resolution (BGR); raises ``StillFailed`` with the reason.

        The call's video holds its last picture meanwhile and goes on afterwards.
        """
        if self._still_lock.locked():
            raise StillFailed("camera_busy", "a still is being taken already")
        async with self._still_lock:
            capture = self.video
            if capture is None or self.status.camera != "ok":
                raise StillFailed("no_camera", self.status.camera_detail or "there is no camera")
            source = capture.source
            loop = asyncio.get_running_loop()
            self.stills += 1
            if isinstance(source, StampedVideoTrack):
                scene, number = self.scene, self.stills
                if scene.fail:
                    raise StillFailed("camera_failed", f"the camera failed during the still: {scene.fail}")
                return await loop.run_in_executor(None, render_scene, scene, number)
            if isinstance(source, ThreadedSource) and source.still_requests is not None:
                wanted: concurrent.futures.Future[Image] = concurrent.futures.Future()
                source.still_requests.put(wanted)
                try:
                    return await asyncio.wait_for(asyncio.wrap_future(wanted), STILL_TIMEOUT)
                except TimeoutError:
                    raise StillFailed("camera_failed", "the Pi camera gave no still in time") from None
            if isinstance(source, ThreadedSource) and source.device is not None:
                return await self._v4l2_still(capture, source, source.device)
            raise StillFailed("camera_failed", "this camera cannot take stills")

    async def _v4l2_still(self, capture: Capture, source: ThreadedSource, device: str) -> Image:
        """Free the device, take the still in its largest mode, and stream again."""
        loop = asyncio.get_running_loop()
        await capture.hold()
        try:
            if not await source.stopped():
                raise StillFailed("camera_failed", f"{device} did not stop streaming for the still")
            return await asyncio.wait_for(loop.run_in_executor(None, v4l2_still, device), STILL_TIMEOUT)
        except TimeoutError:
            raise StillFailed("camera_failed", f"{device} gave no still in time") from None
        finally:
            try:
                capture.resume(open_v4l2(device, self.width, self.height, self.fps))
            except CameraUnavailable as exc:
                capture.end(str(exc))

    async def close(self) -> None:
        for capture in (self.video, self.audio):
            if capture is not None:
                await capture.close()
