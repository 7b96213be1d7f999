"""End to end: real server on loopback, three aiortc participants see and hear each other."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import numpy as np

from bench.synthetic import StampedVideoTrack, ToneAudioTrack, dominant_frequency, read_stamp
from signalling.client import ConsultationClient

from .conftest import RunningServer

TONES = {1: 440.0, 2: 660.0, 3: 880.0}


class Watcher:
    """Reads every remote track of one client and records what it decodes."""

    def __init__(self, client: ConsultationClient) -> None:
        self.client = client
        self.frames: dict[int, set[int]] = defaultdict(set)  # publisher tag -> frame numbers
        self.tones: dict[str, list[float]] = defaultdict(list)  # participant -> frequencies
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def follow(self) -> None:
        for mid, track in self.client.remote_tracks.items():
            if mid not in self.tasks:
                self.tasks[mid] = asyncio.ensure_future(self._read(mid, track))

    async def _read(self, mid: str, track) -> None:  # type: ignore[no-untyped-def]
        while True:
            frame = await track.recv()
            owner = self.client.owners.get(mid)
            if track.kind == "video":
                luma = frame.to_ndarray(format="yuv420p")[: frame.height]
                stamp = read_stamp(luma)
                self.frames[stamp.tag].add(stamp.frame)
            elif owner is not None:
                self.tones[owner[0]].append(dominant_frequency(frame))

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def test_three_participants_see_and_hear_each_other(server: RunningServer) -> None:
    room = server.consultation()
    clients: dict[int, ConsultationClient] = {}
    videos: dict[int, StampedVideoTrack] = {}
    for tag in (1, 2, 3):
        videos[tag] = StampedVideoTrack(tag, width=320, height=240, fps=15)
        token = server.token(room, f"P{tag}", participant_id=f"p{tag}")
        clients[tag] = ConsultationClient(
            server.url, room, token, video=videos[tag], audio=ToneAudioTrack(TONES[tag])
        )
        await clients[tag].join()
    watchers = {tag: Watcher(c) for tag, c in clients.items()}
    try:
        # every client ends up with the other two participants' audio and video
        for tag, client in clients.items():
            others = {f"p{t}" for t in clients if t != tag}
            await client.wait_for(
                lambda c=client, o=others: {p for p, _ in c.owners.values()} == o
                and len(c.remote_tracks) >= 4,
                timeout=15,
            )
            watchers[tag].follow()

        async def all_flowing() -> None:
            while not all(
                len(w.frames[t]) >= 30 for tag, w in watchers.items() for t in clients if t != tag
            ):
                await asyncio.sleep(0.1)

        await asyncio.wait_for(all_flowing(), timeout=20)
        # Measure a window: frames sent by each publisher against frames decoded by each receiver.
        sent_before = {tag: v.frames_sent for tag, v in videos.items()}
        seen_before = {tag: {t: set(w.frames[t]) for t in clients} for tag, w in watchers.items()}
        await asyncio.sleep(4)  # the measurement window itself, not synchronisation
        for tag, watcher in watchers.items():
            for publisher in clients:
                if publisher == tag:
                    assert not watcher.frames[publisher], "a participant must not receive itself"
                    continue
                window = set(range(sent_before[publisher], videos[publisher].frames_sent - 5))
                got = watcher.frames[publisher] - seen_before[tag][publisher]
                ratio = len(got & window) / len(window)
                assert ratio >= 0.9, f"p{tag} decoded {ratio:.0%} of p{publisher}'s frames"
            for publisher in clients:
                if publisher == tag:
                    continue
                freqs = watcher.tones[f"p{publisher}"][-50:]
                assert freqs, f"p{tag} heard nothing from p{publisher}"
                assert np.median(freqs) == pytest_approx(TONES[publisher])
    finally:
        for w in watchers.values():
            await w.stop()
        for c in clients.values():
            await c.close()


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, abs=30)
