"""Tracks that play a received stream through Nära's receive path.

The thin shell around ``mediaserver.receive``: packets go in with the time
they arrived; audio comes out paced by the playout buffer's clock, one
packet's frames at a time (now and then lengthened to grow the delay),
decoded by libopus with FEC and concealment; video comes out as pictures
decoded from whole frames only. ``nara_receive_track`` in
``aiortc_adapter`` connects one to an aiortc receiver.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import fractions
import logging
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .opus import OpusDecodeError, OpusDecoder, has_fec, packet_samples
from .receive import (
    AssembledFrame,
    AssemblyCounters,
    AudioPlayout,
    FrameSource,
    PlayoutCounters,
    PlayoutFrame,
    VideoFrameAssembler,
    VideoPlayout,
)
from .stretch import lengthen, shorten

logger = logging.getLogger(__name__)

AUDIO_RATE = 48000
VIDEO_CLOCK = 90000
MAX_QUEUED_PICTURES = 30


class ReceivedAudioTrack(MediaStreamTrack):
    """Opus received through an adaptive playout buffer: one packet's sound at a time, never a stall.

    Right after ``recv`` returns, ``last_frame_source`` says where that frame
    came from: "packet", "stretch" or "shorten" (its packet, lengthened to grow
    the delay or shortened to bring it down: ``mediaserver.stretch``), "fec"
    (rebuilt from the next packet), "conceal"
    (made up for a lost packet: a gap a listener hears) or "silence" (the
    sender paused); ``last_frame_concealed`` is True for "conceal". ``counters``
    adds them up. Frames are as long as their packets, a lengthened one longer
    and a shortened one shorter (by a whole number of the sound's periods). (PyAV's
    ``frame.opaque`` is not used: it does not survive another frame being
    freed.)

    ``request_retransmission(sequence_numbers)``, if given, is called to ask
    the sender for missing packets again (a generic NACK); the playout delay
    then makes room for their return when the link is lossy.
    """

    kind = "audio"

    def __init__(self, channels: int = 2, playout: AudioPlayout | None = None,
                 request_retransmission: Callable[[list[int]], None] | None = None) -> None:
        super().__init__()
        self.playout = playout if playout is not None else AudioPlayout(can_recover=has_fec,
                                                                        packet_samples=_opus_samples,
                                                                        can_stretch=True)
        if request_retransmission is not None:
            self.playout.on_missing = request_retransmission
        self.channels = channels
        self.decode_errors = 0
        self.last_frame_source: FrameSource | None = None
        self._decoder = OpusDecoder(AUDIO_RATE, channels)
        self._layout = "mono" if channels == 1 else "stereo"
        self._arrived = asyncio.Event()
        self._samples = 0
        self._history = np.zeros((0, channels), dtype=np.int16)  # the sound played last, for a stretch to reach into
        self._ask_timer: asyncio.TimerHandle | None = None

    @property
    def counters(self) -> PlayoutCounters:
        return self.playout.counters

    @property
    def round_trip_time(self) -> float | None:
        return self.playout.round_trip_time

    @round_trip_time.setter
    def round_trip_time(self, seconds: float | None) -> None:
        """Tell the playout the round-trip time (otherwise learned from how long retransmissions take)."""
        self.playout.round_trip_time = seconds

    @property
    def last_frame_concealed(self) -> bool:
        return self.last_frame_source == "conceal"

    def add_packet(self, sequence_number: int, timestamp: int, payload: bytes, now: float,
                   ssrc: int | None = None) -> None:
        if self.readyState != "live":
            return
        self.playout.push(sequence_number, timestamp, payload, now, ssrc)
        self._arrived.set()
        self._schedule_requests()

    def _schedule_requests(self) -> None:
        """Wake up when a missing packet is to be asked for again."""
        if self._ask_timer is not None:
            self._ask_timer.cancel()
            self._ask_timer = None
        when = self.playout.next_request_due()
        if when is not None:
            self._ask_timer = asyncio.get_running_loop().call_at(when, self._ask_again)

    def _ask_again(self) -> None:
        self._ask_timer = None
        if self.readyState == "live":
            self.playout.request_missing(asyncio.get_running_loop().time())
            self._schedule_requests()

    def _resize(self, pcm: np.ndarray, source: FrameSource) -> np.ndarray:
        """The decoded packet lengthened by about a frame, or shortened; the playout is told by how much."""
        frame = pcm.reshape(-1, self.channels)
        if source == "stretch":
            resized = lengthen(self._history, frame, self.playout.frame_samples, AUDIO_RATE)
        else:
            resized = shorten(frame, AUDIO_RATE)
        self.playout.resized((len(resized) - len(frame)) / AUDIO_RATE)
        return resized.reshape(-1)

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            due = self.playout.next_due()
            if due is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the playout clock: frames leave at their time
                continue
            step = self.playout.pop(loop.time())
            self._schedule_requests()
            if step is not None:
                return self._frame(step)

    def stop(self) -> None:
        super().stop()
        if self._ask_timer is not None:
            self._ask_timer.cancel()
            self._ask_timer = None
        self._arrived.set()

    def _frame(self, step: PlayoutFrame) -> av.AudioFrame:
        source = step.source
        if step.new_stream:
            self._decoder.reset()
            self._history = self._history[:0]
        samples = step.samples
        try:
            if source in ("packet", "stretch", "shorten"):
                assert step.payload is not None
                pcm = self._decoder.decode(step.payload)
            elif source == "fec":
                assert step.payload is not None
                pcm = self._decoder.decode_fec(step.payload, samples)
            else:
                pcm = self._decoder.conceal(samples)
        except OpusDecodeError as exc:
            logger.debug("undecodable Opus packet: %s", exc)
            self.decode_errors += 1
            source = "conceal"
            pcm = self._decoder.conceal(samples)
        if source in ("stretch", "shorten"):
            pcm = self._resize(pcm, source)
        self._history = pcm.reshape(-1, self.channels)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=self._layout)
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._samples
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._samples += frame.samples
        self.last_frame_source = source
        return frame


class ReceivedVideoTrack(MediaStreamTrack):
    """VP8 received through Nära's frame assembler, decoded on a worker thread, shown on time.

    ``request_keyframe`` is called (throttled) when the picture is broken and
    only a keyframe can mend it; ``request_retransmission(sequence_numbers)``,
    if given, asks the sender again for packets still missing. Decoded
    pictures come out of ``recv`` at the time the playout gives each frame
    (its own clock, a delay that covers late and repaired frames); when the
    reader falls behind, the oldest waiting pictures are dropped (decoding is
    unaffected).
    """

    kind = "video"

    def __init__(self, request_keyframe: Callable[[], None], assembler: VideoFrameAssembler | None = None,
                 request_retransmission: Callable[[list[int]], None] | None = None,
                 playout: VideoPlayout | None = None) -> None:
        super().__init__()
        self.assembler = assembler if assembler is not None else VideoFrameAssembler(request_keyframe)
        if request_retransmission is not None:
            self.assembler.on_missing = request_retransmission
        self.playout = playout if playout is not None else VideoPlayout(VIDEO_CLOCK)
        self.frames_decoded = 0
        self.decode_errors = 0
        self.pictures_dropped = 0  # decoded but not read in time
        self._pictures: asyncio.Queue[av.VideoFrame | None] = asyncio.Queue()
        self._to_decode: asyncio.Queue[tuple[AssembledFrame, float]] = asyncio.Queue()
        self._to_show: collections.deque[tuple[float, av.VideoFrame]] = collections.deque()  # (due, picture)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nara-vp8")
        self._decoder: Any = av.CodecContext.create("vp8", "r")
        self._timer: asyncio.TimerHandle | None = None
        self._show_timer: asyncio.TimerHandle | None = None
        self._first_timestamp: int | None = None
        self._worker = asyncio.ensure_future(self._decode_frames())

    @property
    def counters(self) -> AssemblyCounters:
        return self.assembler.counters

    @property
    def round_trip_time(self) -> float | None:
        return self.assembler.round_trip_time

    @round_trip_time.setter
    def round_trip_time(self, seconds: float | None) -> None:
        """Tell the assembler the round-trip time, so holes wait as long as a retransmission takes."""
        self.assembler.round_trip_time = seconds

    def add_packet(self, sequence_number: int, timestamp: int, marker: bool, payload: bytes, now: float,
                   ssrc: int | None = None) -> None:
        if self.readyState != "live":
            return
        self._queue_frames(self.assembler.push(sequence_number, timestamp, marker, payload, now, ssrc))

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        picture = await self._pictures.get()
        if picture is None:
            raise MediaStreamError
        return picture

    def stop(self) -> None:
        if self.readyState == "live":
            for timer in (self._timer, self._show_timer):
                if timer is not None:
                    timer.cancel()
            self._worker.cancel()
            self._executor.shutdown(wait=False)
            self._pictures.put_nowait(None)
        super().stop()

    def _queue_frames(self, frames: list[AssembledFrame]) -> None:
        for frame in frames:
            floor = self.assembler.repair_delay(frame.completed_at)
            self._to_decode.put_nowait((frame, self.playout.schedule(frame.timestamp, frame.completed_at, floor)))
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        times = [t for t in (self.assembler.next_deadline(), self.assembler.next_request_due()) if t is not None]
        if times:
            self._timer = loop.call_at(max(min(times), loop.time()), self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self.readyState == "live":
            now = asyncio.get_running_loop().time()
            self.assembler.request_missing(now)
            self._queue_frames(self.assembler.poll(now))

    def _show_due(self) -> None:
        """Hand the reader every picture whose time has come; wake up for the next."""
        self._show_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._to_show and self._to_show[0][0] <= now:
            if self._pictures.qsize() >= MAX_QUEUED_PICTURES:
                self._pictures.get_nowait()
                self.pictures_dropped += 1
            self._pictures.put_nowait(self._to_show.popleft()[1])
        if self._to_show:
            self._show_timer = loop.call_at(self._to_show[0][0], self._show_due)

    async def _decode_frames(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame, due = await self._to_decode.get()
            try:
                pictures = await loop.run_in_executor(self._executor, self._decode, frame.data)
            except av.FFmpegError as exc:
                logger.info("undecodable VP8 frame at %d: %s", frame.timestamp, exc)
                self.decode_errors += 1
                self.assembler.decode_failed(loop.time())
                continue
            for picture in pictures:
                if self._first_timestamp is None:
                    self._first_timestamp = frame.timestamp
                picture.pts = (frame.timestamp - self._first_timestamp) % (1 << 32)
                picture.time_base = fractions.Fraction(1, VIDEO_CLOCK)
                self.frames_decoded += 1
                self._to_show.append((due, picture))
            if self._show_timer is not None:
                self._show_timer.cancel()
            self._show_due()

    def _decode(self, data: bytes) -> list[av.VideoFrame]:
        return list(self._decoder.decode(av.Packet(data)))


async def stop_when_ended(source: MediaStreamTrack, track: MediaStreamTrack) -> None:
    """Stop ``track`` when ``source`` ends (its ``recv`` raises MediaStreamError)."""
    with contextlib.suppress(MediaStreamError):
        while True:
            await source.recv()
    track.stop()


def _opus_samples(payload: bytes) -> int:
    """How many samples an Opus packet holds at 48 kHz (0 if it is not one)."""
    try:
        return packet_samples(payload, AUDIO_RATE)
    except OpusDecodeError:
        return 0
