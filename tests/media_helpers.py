"""Test helpers: participants with synthetic media and a watcher of what they decode."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from aiortc import RTCIceServer

from bench.synthetic import StampedVideoTrack, ToneAudioTrack, dominant_frequency, read_stamp
from bench.turn import ImpairingTurnServer
from mediaserver.encoders import OpusTrack
from signalling.client import ConsultationClient

from .conftest import RunningServer

TONES = {1: 440.0, 2: 660.0, 3: 880.0, 4: 1100.0, 5: 1320.0, 6: 1540.0, 7: 1760.0, 8: 1980.0}


class Watcher:
    """Reads every remote track of one client and records what it decodes."""

    def __init__(self, client: ConsultationClient) -> None:
        self.client = client
        self.frames: dict[int, set[int]] = defaultdict(set)  # publisher tag -> frame numbers
        self.first_frame_at: float | None = None
        self.frames_from: dict[str, int] = defaultdict(int)  # participant -> decoded video frames
        self.tones: dict[str, list[float]] = defaultdict(list)  # participant -> frequencies
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.changed = asyncio.Condition()

    def follow(self) -> None:
        for mid, track in self.client.remote_tracks.items():
            if mid not in self.tasks:
                self.tasks[mid] = asyncio.ensure_future(self._read(mid, track))

    async def _read(self, mid: str, track: Any) -> None:
        while True:
            frame = await track.recv()
            owner = self.client.owners.get(mid)
            if track.kind == "video":
                if owner is not None:
                    self.frames_from[owner[0]] += 1
                stamp = read_stamp(frame.to_ndarray(format="yuv420p")[: frame.height])
                self.frames[stamp.tag].add(stamp.frame)
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
            elif owner is not None:
                self.tones[owner[0]].append(dominant_frequency(frame))
            async with self.changed:
                self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def share_decoded(watcher: Watcher, tag: int, video: StampedVideoTrack, seconds: float) -> float:
    """The share of the frames ``video`` sends over the next ``seconds`` that ``watcher`` decodes."""
    start = video.frames_sent
    await asyncio.sleep(seconds)  # the measurement window itself
    window = set(range(start, video.frames_sent - 5))  # the last few may still be on their way
    return len(watcher.frames[tag] & window) / len(window)


async def join_publisher(
    server: RunningServer, room: str, tag: int, width: int = 320, height: int = 240, fps: int = 15,
    participant_id: str | None = None, **client_kw: Any,
) -> tuple[ConsultationClient, StampedVideoTrack]:
    video = StampedVideoTrack(tag, width=width, height=height, fps=fps)
    token = server.token(room, f"P{tag}", participant_id=participant_id or f"p{tag}")
    client = ConsultationClient(server.url, room, token, video=video, audio=ToneAudioTrack(TONES[tag]),
                                **client_kw)
    await client.join()
    return client, video


async def join_over_link(server: RunningServer, room: str, who: str, relay: ImpairingTurnServer | None = None,
                         link: str = "fast", publish: bool = False) -> ConsultationClient:
    """``who`` joins ``room`` with Nära's receive path, through ``relay``'s ``link`` profile when given
    (relayed only, so the emulated link is the only way); a publisher sends a stamped camera and a tone."""
    kw: dict[str, Any] = {"nara_receive": True}  # Nära's receive path: aiortc's own stalls behind holes
    if relay is not None:
        kw |= {"ice_servers": [RTCIceServer(urls=relay.url, username=f"{link}/{who}", credential=relay.password)],
               "relay_only": True}
    media: dict[str, Any] = {}
    if publish:
        media = {"video": StampedVideoTrack(1, 640, 480, 15), "audio": OpusTrack(ToneAudioTrack(440))}
    client = ConsultationClient(server.url, room, server.token(room, who, "kit" if publish else "clinician",
                                                               participant_id=who), **kw, **media)
    await client.join()
    return client


async def receiving_from(client: ConsultationClient, participants: set[str], timeout: float = 15) -> None:
    """Wait until ``client`` has audio and video slots for exactly these participants."""
    await client.wait_for(
        lambda: {p for p, _ in client.owners.values()} == participants
        and all(mid in client.remote_tracks for mid in client.owners),
        timeout=timeout,
    )
