"""nara bench forward's publishers: independent frame clocks by default, all at once only when asked."""

from __future__ import annotations

import math
import random
import time

from bench.forward import FPS, ReplayVideoTrack

# A stand-in clip: 120 frames, keyframes at 0 and 60, each frame's bytes naming it.
CLIP = [(f"frame {i}".encode(), i % 60 == 0) for i in range(120)]


async def test_independent_publishers_send_at_phases_of_their_own() -> None:
    rng = random.Random(9)
    tracks = [ReplayVideoTrack(CLIP, rng) for _ in range(40)]
    for track in tracks:
        await track.recv()  # (the first frame: the clock starts at the track's own phase)
    phases = sorted((track.next_due or 0.0) * FPS % 1.0 for track in tracks)
    # Spread over the whole frame interval: no tenth of it holds more than a third of the publishers.
    assert max(sum(1 for p in phases if k / 10 <= p < (k + 1) / 10) for k in range(10)) < len(tracks) / 3
    # Started on a keyframe, not all on the same one.
    assert {track.next_frame for track in tracks} == {1, 61}


async def test_aligned_publishers_send_the_same_frame_at_the_same_instant() -> None:
    tracks = [ReplayVideoTrack(CLIP, random.Random(seed)) for seed in range(5)]
    for track in tracks:
        await track.recv()
    tick = math.floor(time.monotonic() * FPS) + 2
    for track in tracks:
        track.align(True, tick)
    dues = {track.next_due for track in tracks}
    assert len(dues) == 1  # one instant for all, on the shared clock's frame boundary
    due = dues.pop()
    assert due is not None and math.isclose(due * FPS, round(due * FPS))
    sent = [await track.recv() for track in tracks]
    assert len({bytes(packet) for packet in sent}) == 1
    # And back to phases of their own when asked.
    for track in tracks:
        track.align(False, tick + 1)
    assert len({track.next_due for track in tracks}) == len(tracks)
