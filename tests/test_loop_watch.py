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
