"""What the kit receives from the care team: pictures for its screen, voices for its speaker.

Every remote track of a call is read by a task of its own. Video keeps only
the newest picture (the local page fetches it as a JPEG a few times a
second); audio from everyone is mixed, 20 ms at a time, and written to the
speaker through ALSA on a thread. A kit without a working speaker still
reads (and drops) the audio, so nothing backs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

logger = logging.getLogger(__name__)

AUDIO_RATE = 48000
CHUNK = AUDIO_RATE // 50 * 2  # 20 ms of interleaved stereo: what the mixer takes from each voice at a time
MIX_BACKLOG = 10  # 20 ms chunks kept per voice before the oldest are dropped


@dataclass
class RemotePicture:
    frame: av.VideoFrame
    owner: str | None
    at: float  # time.monotonic() when it arrived


def mix(chunks: list[np.ndarray]) -> np.ndarray:
    """Sum interleaved s16 chunks of equal length, clipped to the s16 range."""
    total = np.zeros(chunks[0].shape, dtype=np.int32)
    for chunk in chunks:
        total += chunk.astype(np.int32)
    return np.clip(total, -32768, 32767).astype(np.int16)


class Voice:
    """One remote voice's sound waiting to be mixed, cut into 20 ms chunks whatever length its frames come in
    (a packet of 40 ms, a frame the receive path lengthened by a period or two)."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)

    def add(self, samples: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, samples])[-MIX_BACKLOG * CHUNK:]

    def take(self) -> np.ndarray | None:
        """The next 20 ms, or None when less is waiting."""
        if len(self._pending) < CHUNK:
            return None
        chunk, self._pending = self._pending[:CHUNK], self._pending[CHUNK:]
        return chunk


class Speaker:
    """The kit's speaker through ALSA, written on a thread; ``working`` is False when there is none."""

    def __init__(self, device: str = "default") -> None:
        self.device = device
        self.working = False
        self.detail = ""
        self._chunks: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=25)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nara-speaker", daemon=True)
        self.working = True
        self._thread.start()

    def play(self, chunk: np.ndarray) -> None:
        if not self.working:
            return
        with contextlib.suppress(queue.Full):
            self._chunks.put_nowait(chunk)

    def _run(self) -> None:
        try:
            container = av.open(self.device, "w", format="alsa")
            stream: Any = container.add_stream("pcm_s16le", rate=AUDIO_RATE)
            stream.layout = "stereo"
            while (chunk := self._chunks.get()) is not None:
                frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="stereo")
                frame.sample_rate = AUDIO_RATE
                for packet in stream.encode(frame):
                    container.mux(packet)
            container.close()
        except Exception as exc:  # no sound card: the call goes on without sound on the kit
            self.working = False
            self.detail = str(exc) or type(exc).__name__
            logger.warning("no speaker: %s", self.detail)

    def stop(self) -> None:
        if self._thread is not None and self.working:
            with contextlib.suppress(queue.Full):
                self._chunks.put_nowait(None)


class RemoteMedia:
    """Follows a call's remote tracks; holds the newest picture and mixes the voices."""

    def __init__(self, speaker: Speaker | None = None) -> None:
        self.speaker = speaker
        self.picture: RemotePicture | None = None
        self.video_frames = 0
        self.audio_frames = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._voices: dict[str, Voice] = {}
        self._mixer: asyncio.Task[None] | None = None

    def follow(self, mid: str, track: MediaStreamTrack, owner: Callable[[], str | None]) -> None:
        if mid in self._tasks:
            return
        self._tasks[mid] = asyncio.ensure_future(self._read(mid, track, owner))
        if track.kind == "audio" and self._mixer is None:
            self._mixer = asyncio.ensure_future(self._mix())

    def forget_all(self) -> None:
        """The call ended: stop reading its tracks (the picture stays until the next one arrives)."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._voices.clear()
        if self._mixer is not None:
            self._mixer.cancel()
            self._mixer = None

    async def _read(self, mid: str, track: MediaStreamTrack, owner: Callable[[], str | None]) -> None:
        try:
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    self.video_frames += 1
                    self.picture = RemotePicture(frame, owner(), time.monotonic())
                elif isinstance(frame, av.AudioFrame):
                    self.audio_frames += 1
                    self._voices.setdefault(mid, Voice()).add(frame.to_ndarray().reshape(-1))
        except MediaStreamError:
            pass
        finally:
            self._voices.pop(mid, None)

    async def _mix(self) -> None:
        """Every 20 ms, one chunk from each voice that has one, summed, to the speaker."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += 0.02
            await asyncio.sleep(max(0.0, due - loop.time()))
            chunks = [chunk for voice in self._voices.values() if (chunk := voice.take()) is not None]
            if chunks and self.speaker is not None:
                self.speaker.play(mix(chunks))
