"""The media worker's loop watch (a bench instrument): long callbacks by name, collector passes by generation."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

from mediaserver.loop_watch import LoopWatch, window


class SteppedClock:
    """Time moves only when a callback says how long it ran."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_long_callback_is_named_and_short_ones_are_not(tmp_path: Path) -> None:
    clock = SteppedClock()
    watch = LoopWatch(tmp_path, clock)
    watch.install()
    try:
        async def figures_for_everyone() -> None:
            clock.now += 0.012  # a 12 ms walk over every participant

        ran: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def short() -> None:
            clock.now += 0.0002
            ran.set_result(None)

        await asyncio.ensure_future(figures_for_everyone())
        asyncio.get_running_loop().call_soon(short)
        await ran
        gc.collect(2)
    finally:
        watch.uninstall()
    assert watch.callbacks["test_a_long_callback_is_named_and_short_ones_are_not.<locals>.figures_for_everyone"] \
        .to_json() == [1, 0.012, 0.012]
    assert not any(name.endswith("<locals>.short") for name in watch.callbacks)
    assert watch.collections[2].count >= 1
    watch.write()
    assert json.loads(watch.path.read_text())["callbacks"]


def test_a_window_holds_what_happened_in_it_only() -> None:
    before = {"callbacks": {"a": [2, 0.004, 0.002], "b": [1, 0.003, 0.003]}, "collections": {"2": [1, 0.02, 0.02]}}
    after = {"callbacks": {"a": [5, 0.010, 0.002], "b": [1, 0.003, 0.003], "c": [1, 0.030, 0.030]},
             "collections": {"2": [1, 0.02, 0.02], "0": [9, 0.009, 0.001]}}
    seen = window(before, after)
    assert list(seen["callbacks"]) == ["c", "a"]  # the longest in all first; b ran no long callback in between
    assert seen["callbacks"]["a"][0] == 3
    assert seen["collections"] == {"0": [9, 0.009, 0.001]}


async def test_a_turn_is_timed_with_the_sockets_its_select_found_ready(tmp_path: Path) -> None:
    import socket

    from mediaserver.loop_watch import TURN_BUCKETS, turn_shares

    clock = SteppedClock()
    watch = LoopWatch(tmp_path, clock)
    loop = asyncio.get_running_loop()
    all_read: asyncio.Future[None] = loop.create_future()
    read = []

    class Publisher(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            clock.now += 0.003  # a packet's fan-out, 3 ms
            read.append(data)
            if len(read) == 3 and not all_read.done():
                all_read.set_result(None)

    endpoints = [await loop.create_datagram_endpoint(Publisher, local_addr=("127.0.0.1", 0)) for _ in range(3)]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    watch.install()
    try:
        for transport, _ in endpoints:  # three publishers' packets at once: one select finds all three ready
            sender.sendto(b"rtp", transport.get_extra_info("sockname"))
        await asyncio.wait_for(all_read, 5)
    finally:
        watch.uninstall()
        sender.close()
        for transport, _ in endpoints:
            transport.close()
    nine_ms = next(i for i, bound in enumerate(TURN_BUCKETS) if bound >= 0.009)
    assert watch.turns[nine_ms][:2] == [1, 3]  # one turn of 9 ms, with the three sockets in it
    label, _, share_of_ready, share_of_time = turn_shares(watch.turns)[nine_ms]
    assert label == "<=10 ms" and share_of_ready > 0.5 and share_of_time > 0.5
    assert "turns" in window({}, watch.to_json())
