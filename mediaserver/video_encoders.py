"""Nära's video encoders: VP8 (always) and H.264 (where PyAV has libx264), rates that follow the network.

Both take raw ``av.VideoFrame`` pictures and give ``EncodedFrame`` objects
that aiortc, or the SFU's own RTP writer, only transports. Targets change on
the fly:

* bitrate (30 kbit/s … 4 Mbit/s): no keyframe. VP8 retunes libvpx in place
  (``mediaserver.libvpx``). H.264 retunes x264's average rate in place
  within the rate cap it was opened with; a change beyond that cap, or of
  the frame rate, is carried out by reopening x264 at the next keyframe
  that is due anyway (and is bridged until then by scaling the rate it is
  given), so it too never costs an extra keyframe.
* frame rate: frames are kept on a grid of the target interval (media
  time); no keyframe.
* picture size: one keyframe (a decoder needs one to change size).

Keyframes come every ``keyframe_interval`` seconds and on request;
requests within half a second of the last keyframe are merged into one.
Input pictures of another size or pixel format are scaled and converted
to the target size in yuv420p.

``EncodedVideoTrack`` puts an encoder behind an aiortc sender: it follows
the REMB and PLI/FIR the sender receives, and at very low rates lowers
picture size and frame rate a step at a time (``SizeSteps``).
"""

from __future__ import annotations

import abc
import asyncio
import fractions
import functools
import threading
import time
from typing import Any

import av
from aiortc import RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from mediaserver import libvpx
from mediaserver.aiortc_adapter import follow_sender_feedback
from mediaserver.encoder_policy import (
    CLOCK_RATE,
    FramePacer,
    KeyframeSchedule,
    MediaClock,
    SizeSteps,
    clamp_bitrate,
    scaled_size,
    valid_framerate,
)
from mediaserver.video_payloads import EncodedFrame, h264_payloads, vp8_payloads

__all__ = [
    "EncodedFrame",
    "VideoEncoder",
    "Vp8Encoder",
    "H264Encoder",
    "EncodedVideoTrack",
    "available_codecs",
    "vp8_payloads",
    "h264_payloads",
]

VIDEO_TIME_BASE = fractions.Fraction(1, CLOCK_RATE)

_Coded = tuple[bytes, bool]  # a frame's bytes, and whether it is a keyframe


def _even(value: int) -> int:
    if value < 2:
        raise ValueError("picture sides must be at least 2 pixels")
    return value & ~1


class VideoEncoder(abc.ABC):
    """What Nära's video encoders share: targets, pacing, keyframe schedule, counters.

    ``encode`` may run on a worker thread while ``set_target`` and
    ``request_keyframe`` are called from the event loop; neither of those
    waits for an encode in progress. A frame handed to ``encode`` must not
    be encoded by another thread at the same time.
    """

    codec_name = ""

    def __init__(self, width: int, height: int, framerate: float, bitrate: int, keyframe_interval: float = 3.0) -> None:
        self._targets = threading.Lock()  # held only briefly: targets and keyframe requests
        self._codec = threading.Lock()  # held for a whole encode
        self._width, self._height = _even(width), _even(height)
        self._pacer = FramePacer(framerate)
        self._framerate = self._pacer.framerate
        self._bitrate = clamp_bitrate(bitrate)
        self._schedule = KeyframeSchedule(keyframe_interval)
        self._clock = MediaClock()
        self._last_pts = -1
        self._closed = False
        self.frames = 0  # encoded frames given out
        self.keyframes = 0
        self.bytes = 0
        self.dropped = 0  # frames the rate control left out
        self.skipped = 0  # frames left out to keep the target frame rate

    @property
    def bitrate(self) -> int:
        return self._bitrate

    @property
    def framerate(self) -> float:
        return self._framerate

    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    def set_target(
        self,
        *,
        bitrate: int | None = None,
        framerate: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        """New targets, taken up by the next frame.

        The bitrate is clamped to 30 kbit/s … 4 Mbit/s. Bitrate and frame
        rate changes cost no keyframe; a new picture size costs one.
        """
        with self._targets:
            if bitrate is not None:
                self._bitrate = clamp_bitrate(bitrate)
            if framerate is not None:
                self._framerate = valid_framerate(framerate)
            if width is not None:
                self._width = _even(width)
            if height is not None:
                self._height = _even(height)

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe (or, within 0.5 s of the last one, the first frame after that)."""
        with self._targets:
            self._schedule.request()

    def encode(self, frame: av.VideoFrame, timestamp: int) -> EncodedFrame | None:
        """Encode ``frame``, captured at ``timestamp`` (90 kHz); None when it is left out."""
        with self._codec:
            if self._closed:
                raise RuntimeError(f"this {self.codec_name} encoder is closed")
            with self._targets:
                bitrate, framerate = self._bitrate, self._framerate
                width, height = self._width, self._height
                now = self._clock.ticks(timestamp)
                self._pacer.framerate = framerate
                if not self._pacer.admit(now):
                    self.skipped += 1
                    return None
                keyframe = self._schedule.due(now)
            pts = max(now, self._last_pts + 1)
            self._last_pts = pts
            self._configure(bitrate, framerate, width, height, keyframe)
            if frame.width != width or frame.height != height or frame.format.name != "yuv420p":
                frame = frame.reformat(width=width, height=height, format="yuv420p")
            result = self._encode_picture(frame, pts, round(self._pacer.interval), keyframe)
            if result is None:
                self.dropped += 1
                return None
            data, is_key = result
            if is_key:
                with self._targets:
                    self._schedule.produced(now)
                self.keyframes += 1
            self.frames += 1
            self.bytes += len(data)
            return EncodedFrame(data=data, keyframe=is_key, timestamp=timestamp & 0xFFFFFFFF)

    def close(self) -> None:
        with self._codec:
            if not self._closed:
                self._closed = True
                self._release()

    # codec-specific parts, called with the codec lock held

    @abc.abstractmethod
    def _configure(self, bitrate: int, framerate: float, width: int, height: int, keyframe_due: bool) -> None:
        ...

    @abc.abstractmethod
    def _encode_picture(self, frame: av.VideoFrame, pts: int, duration: int, keyframe: bool) -> _Coded | None:
        ...

    @abc.abstractmethod
    def _release(self) -> None:
        ...


class Vp8Encoder(VideoEncoder):
    """VP8 through libvpx directly: realtime, CBR, error resilient, may drop frames at very low rates."""

    codec_name = "VP8"

    def __init__(
        self,
        width: int,
        height: int,
        framerate: float,
        bitrate: int,
        keyframe_interval: float = 3.0,
        *,
        cpu_used: int = -6,
        noise_sensitivity: int = 0,
    ) -> None:
        super().__init__(width, height, framerate, bitrate, keyframe_interval)
        self._vpx = libvpx.Vp8Codec(libvpx.Vp8Settings(
            width=self._width, height=self._height, bitrate=self._bitrate,
            cpu_used=cpu_used, noise_sensitivity=noise_sensitivity))
        self._applied = (self._bitrate, self._width, self._height)

    def last_quantizer(self) -> int:
        """libvpx's quantizer (0..63) for the last frame: high means coarse."""
        with self._codec:
            return self._vpx.last_quantizer()

    def _configure(self, bitrate: int, framerate: float, width: int, height: int, keyframe_due: bool) -> None:
        if (bitrate, width, height) != self._applied:
            self._vpx.reconfigure(bitrate=bitrate, width=width, height=height)
            self._applied = (bitrate, width, height)

    def _encode_picture(self, frame: av.VideoFrame, pts: int, duration: int, keyframe: bool) -> _Coded | None:
        planes = [(plane.buffer_ptr, plane.line_size) for plane in frame.planes]
        return self._vpx.encode(planes, pts, duration, keyframe)

    def _release(self) -> None:
        self._vpx.close()


class H264Encoder(VideoEncoder):
    """H.264 constrained baseline through PyAV's libx264: ultrafast, zero latency, no B-frames.

    Every keyframe is an IDR preceded by SPS and PPS, so a receiver can
    start on any of them; the output is an Annex B stream that packetization
    mode 1 carries. x264 takes a new average rate on a running encoder, but
    keeps the rate cap (VBV) and frame rate it was opened with; those are
    renewed by reopening at the next keyframe that is due anyway, and a
    new picture size reopens at once (one keyframe).
    """

    codec_name = "H264"

    def __init__(self, width: int, height: int, framerate: float, bitrate: int, keyframe_interval: float = 3.0) -> None:
        super().__init__(width, height, framerate, bitrate, keyframe_interval)
        self._ctx: Any = None
        self._opened = (0, 0.0, 0, 0)  # bitrate, framerate, width, height
        self._cap = 0  # the rate cap (VBV) x264 was opened with, bit/s
        self._open(self._bitrate, self._framerate, self._width, self._height)

    def _open(self, bitrate: int, framerate: float, width: int, height: int) -> None:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = fractions.Fraction(framerate).limit_denominator(1001)
        ctx.bit_rate = bitrate
        ctx.thread_count = 1
        ctx.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "profile": "baseline",
            "forced-idr": "1",
            # Constant rate: a VBV capped at the target. x264 then takes a lower rate on
            # the running encoder (measured), but never goes above this cap.
            "maxrate": str(bitrate),
            "bufsize": str(bitrate // 2),  # half a second at the target
            "x264-params": "keyint=infinite:scenecut=0:bframes=0:repeat-headers=1:annexb=1",
        }
        ctx.open()
        self._ctx = ctx
        self._opened = (bitrate, framerate, width, height)
        self._cap = bitrate

    def _configure(self, bitrate: int, framerate: float, width: int, height: int, keyframe_due: bool) -> None:
        _, opened_framerate, opened_width, opened_height = self._opened
        if (width, height) != (opened_width, opened_height):
            self._open(bitrate, framerate, width, height)
            return
        # x264 budgets bits per frame from the frame rate it was opened with.
        scaled = round(bitrate * opened_framerate / framerate)
        # Above the cap, or far below it (a buffer sized for the old rate allows long bursts):
        # renewed at the next keyframe that is due anyway.
        renew = framerate != opened_framerate or scaled > self._cap or scaled < self._cap // 2
        if renew and keyframe_due:
            self._open(bitrate, framerate, width, height)
        elif scaled != self._ctx.bit_rate:
            self._ctx.bit_rate = min(scaled, self._cap)

    def _encode_picture(self, frame: av.VideoFrame, pts: int, duration: int, keyframe: bool) -> _Coded | None:
        saved_pts, saved_time_base, saved_type = frame.pts, frame.time_base, frame.pict_type
        frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        try:
            packets = self._ctx.encode(frame)
        finally:  # the caller's frame is left as it was
            frame.pts, frame.pict_type = saved_pts, saved_type
            if saved_time_base is not None:
                frame.time_base = saved_time_base
        if not packets:
            return None
        return b"".join(bytes(p) for p in packets), any(p.is_keyframe for p in packets)

    def _release(self) -> None:
        self._ctx = None


@functools.cache
def _codecs() -> tuple[str, ...]:
    found = []
    try:
        libvpx.default_config()
        found.append("VP8")
    except (OSError, libvpx.LibvpxError):
        pass
    if "libx264" in av.codecs_available:
        found.append("H264")
    return tuple(found)


def available_codecs() -> list[str]:
    """The video codecs this machine can encode, e.g. ["VP8", "H264"]."""
    return list(_codecs())


class EncodedVideoTrack(MediaStreamTrack):
    """Frames from ``source``, encoded by ``encoder``, handed to aiortc as finished packets.

    aiortc's sender only packetises ``av.Packet`` objects and ignores REMB
    and keyframe requests for them, so ``attach`` routes those to this
    track: the encoder's rate follows the REMB less a spare share of it
    (``1 - headroom``, at most ``spare_most``; at least 30 kbit/s) and PLI/FIR
    ask for a keyframe. The spare is for libvpx's overshoot on a keyframe
    or a busy frame, a large share of a low rate's second; at 2 Mbit/s a
    tenth would leave 200 kbit/s of a link unused for nothing (Nära's
    server's cap already leaves the original a tenth over its rate). With ``steps`` (the default)
    picture size and frame rate come down at very low rates and go back up
    when the rate recovers. The track owns the encoder and closes it on
    ``stop``.
    """

    kind = "video"

    def __init__(
        self,
        source: MediaStreamTrack,
        encoder: VideoEncoder,
        *,
        steps: SizeSteps | None = None,
        adapt_size: bool = True,
        headroom: float = 0.9,
        spare_most: int = 60_000,
    ) -> None:
        super().__init__()
        self.source = source
        self.encoder = encoder
        self.steps = (steps or SizeSteps()) if adapt_size else None
        self.headroom = headroom
        self.spare_most = spare_most
        self.remb: int | None = None  # the last REMB heard, bit/s
        self._full_size = (encoder.width, encoder.height)
        self._full_framerate = encoder.framerate
        self._started = time.monotonic()

    def attach(self, sender: RTCRtpSender) -> None:
        """Follow the REMB and keyframe requests that ``sender`` receives."""
        follow_sender_feedback(sender, self.follow_remb, self.encoder.request_keyframe)

    def follow_remb(self, bitrate: int) -> None:
        self.remb = bitrate
        spare = min(bitrate * (1 - self.headroom), self.spare_most)
        self.encoder.set_target(bitrate=round(bitrate - spare))

    async def recv(self) -> av.Packet[Any]:
        loop = asyncio.get_running_loop()
        while True:
            frame = await self.source.recv()
            if self.readyState != "live":
                raise MediaStreamError
            if not isinstance(frame, av.VideoFrame):
                raise TypeError("EncodedVideoTrack needs a source of video frames")
            ticks = self._ticks(frame)
            if self.steps is not None:
                self._follow_steps(self.steps, ticks)
            encoded = await loop.run_in_executor(None, self.encoder.encode, frame, ticks & 0xFFFFFFFF)
            if encoded is None:
                continue
            packet = av.Packet(encoded.data)
            packet.pts = encoded.timestamp
            packet.time_base = VIDEO_TIME_BASE
            packet.is_keyframe = encoded.keyframe
            return packet

    def _ticks(self, frame: av.VideoFrame) -> int:
        if frame.pts is not None and frame.time_base is not None:
            return int(frame.pts * frame.time_base * CLOCK_RATE)
        return int((time.monotonic() - self._started) * CLOCK_RATE)

    def _follow_steps(self, steps: SizeSteps, ticks: int) -> None:
        step = steps.choose(self.encoder.bitrate, ticks)
        width, height = scaled_size(*self._full_size, step.divisor)
        framerate = self._full_framerate if step.max_framerate is None else min(
            self._full_framerate, step.max_framerate)
        enc = self.encoder
        if (width, height, framerate) != (enc.width, enc.height, enc.framerate):
            enc.set_target(width=width, height=height, framerate=framerate)

    def stop(self) -> None:
        self.source.stop()
        self.encoder.close()
        super().stop()
