"""A media worker's loop is never held by one long read of every participant (issue 9: the delay's tail).

Packets wait behind whatever the loop is running; near a worker's capacity a
stall is followed by several times its length of catching up. So the reads
asked for periodically or on demand (every participant's figures for the IT
staff page, the forwarding stats) take a turn of the loop after every few
participants, and still return every participant.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mediaserver.figures import FIGURES_SLICE
from mediaserver.peer import ParticipantInfo, Peer
from mediaserver.room import MediaServer
from mediaserver.worker_protocol import EncodedItems, encode_reply, figures_from_json, figures_json, read_message

ROOMS, PER_ROOM = 4, 6  # 24 participants: three slices of eight


async def crowded_server() -> MediaServer:
    media = MediaServer(host_addresses=["127.0.0.1"])

    async def signal(message: dict[str, Any]) -> None:
        pass

    async def failed(peer: Peer, code: str) -> None:
        pass

    for r in range(ROOMS):
        for p in range(PER_ROOM):
            info = ParticipantInfo(f"r{r}p{p}", "Åsa", "observer", can_publish=False)
            await media.join(f"room{r}", info, signal, failed)
    return media


class LoopTurns:
    """Counts the loop's turns while something runs: a callback that puts itself back each turn."""

    def __init__(self) -> None:
        self.turns = 0
        self.running = True
        asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        if self.running:
            self.turns += 1
            asyncio.get_running_loop().call_soon(self._turn)

    def stop(self) -> int:
        self.running = False
        return self.turns


async def test_every_participants_figures_are_read_with_turns_of_the_loop_between() -> None:
    media = await crowded_server()
    try:
        watch = LoopTurns()
        figures = await media.figures()
        turns = watch.stop()
        assert sorted(p.participant for c in figures for p in c.participants) == sorted(
            f"r{r}p{p}" for r in range(ROOMS) for p in range(PER_ROOM))
        assert turns >= ROOMS * PER_ROOM // FIGURES_SLICE  # (read at once, other callbacks got no turn)

        watch = LoopTurns()
        stats = await media.stats()
        turns = watch.stop()
        assert {room: sorted(people) for room, people in stats.items()} == {
            f"room{r}": sorted(f"r{r}p{p}" for p in range(PER_ROOM)) for r in range(ROOMS)}
        assert turns >= ROOMS
    finally:
        await media.close()


async def test_figures_encoded_a_consultation_at_a_time_read_back_the_same() -> None:
    media = await crowded_server()
    try:
        figures = await media.figures()
    finally:
        await media.close()
    items = [json.dumps(c).encode() for c in figures_json(figures)]
    reader = asyncio.StreamReader()
    reader.feed_data(encode_reply(7, EncodedItems(items)))
    reader.feed_eof()
    reply = await read_message(reader)
    assert reply is not None and reply["id"] == 7 and reply["ok"] is True
    assert figures_from_json(reply["result"]) == figures
