"""Where a media worker's event loop is held up: long callbacks and the collector's pauses.

A bench instrument, off unless ``NARA_LOOP_WATCH`` names a directory
(``nara bench forward --loop-watch``). Every packet that reaches a worker waits
behind whatever callback the loop is running; near a worker's capacity a
stall of S ms leaves the loop behind for about S / (1 - load) ms in all, so a
10 ms callback at 80 % load holds the copies of about 50 ms of arrivals. This
records every callback that ran longer than ``LONG_CALLBACK`` by name (a
task's coroutine, or the function), and every pass of the garbage collector
by generation, and the worker writes them to ``loop-<pid>.json`` in that
directory every few seconds, for the benchmark to read over its window.

It also records the loop's turns (from one ``select`` returning to the next
call): how long each took and how many sockets the select found ready. A
datagram read in one turn is handled in the next (aiortc's receive task
takes it from aioice's queue), after the work of the turn it was read in, so
the turns' lengths, weighted by the datagrams read in them, are what a packet
waits for the loop (``TURN_BUCKETS``).

Timing a callback costs two clock reads around each of them, which is why
this is not left on.
"""

from __future__ import annotations

import asyncio.events
import gc
import json
import os
import selectors
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .forwarding_delay import DelayHistogram, DelaySnapshot

ENV = "NARA_LOOP_WATCH"
LONG_CALLBACK = 0.001  # seconds
# Upper bounds (seconds) of the buckets a turn's length falls in; the last bucket holds the rest.
TURN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.010, 0.020)


class Tally:
    """Count, total and longest of some durations, in seconds."""

    __slots__ = ("count", "total", "longest")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.longest = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.longest = max(self.longest, seconds)

    def to_json(self) -> list[float]:
        return [self.count, self.total, self.longest]


def callback_name(callback: Callable[..., Any]) -> str:
    """A readable name for what a loop's callback runs: a task's coroutine, or the function itself."""
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        return getattr(coro, "__qualname__", type(coro).__name__)
    return getattr(callback, "__qualname__", type(callback).__name__)


class LoopWatch:
    def __init__(self, directory: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.path = directory / f"loop-{os.getpid()}.json"
        self.clock = clock
        self.callbacks: dict[str, Tally] = {}
        self.collections: dict[int, Tally] = {}
        self._gc_started: float | None = None
        self._plain_run: Callable[[asyncio.events.Handle], None] | None = None
        # Per bucket of TURN_BUCKETS (and one over): [turns, sockets ready in them, seconds in them]
        self.turns = [[0, 0, 0.0] for _ in range(len(TURN_BUCKETS) + 1)]
        self._turn_started: float | None = None
        self._turn_ready = 0
        self._plain_select: Any = None
        # How long each datagram read had waited in its socket (the media worker fills it in:
        # aiortc_adapter.watch_socket_waits), before the forwarding delay's stamp.
        self.socket_waits = DelayHistogram()

    def install(self) -> None:
        """Time every callback the process's event loops run (``Handle._run``), and the collector."""
        run = self._plain_run = asyncio.events.Handle._run
        watch = self

        def timed_run(handle: asyncio.events.Handle) -> None:
            started = watch.clock()
            run(handle)
            took = watch.clock() - started
            if took >= LONG_CALLBACK:
                name = callback_name(handle._callback)  # type: ignore[attr-defined]
                watch.callbacks.setdefault(name, Tally()).add(took)

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
        gc.callbacks.append(self._on_collection)
        if hasattr(selectors, "EpollSelector"):  # (asyncio's selector on Linux; not uvloop's)
            select = self._plain_select = selectors.EpollSelector.select

            def timed_select(selector: selectors.EpollSelector, timeout: float | None = None) -> Any:
                watch.turn_ended(watch.clock())
                events = select(selector, timeout)
                watch._turn_started, watch._turn_ready = watch.clock(), len(events)
                return events

            selectors.EpollSelector.select = timed_select  # type: ignore[method-assign,assignment]

    def turn_ended(self, now: float) -> None:
        """A turn of the loop ends (its next select is called): note its length and what was ready in it."""
        if self._turn_started is None:
            return
        took = now - self._turn_started
        bucket = self.turns[next((i for i, bound in enumerate(TURN_BUCKETS) if took <= bound), len(TURN_BUCKETS))]
        bucket[0] += 1
        bucket[1] += self._turn_ready
        bucket[2] += took
        self._turn_started = None

    def uninstall(self) -> None:
        if self._plain_run is not None:
            asyncio.events.Handle._run = self._plain_run  # type: ignore[method-assign,assignment]
            self._plain_run = None
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        if self._plain_select is not None:
            selectors.EpollSelector.select = self._plain_select  # type: ignore[method-assign]
            self._plain_select = None

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = self.clock()
        elif self._gc_started is not None:
            self.collections.setdefault(info["generation"], Tally()).add(self.clock() - self._gc_started)
            self._gc_started = None

    def to_json(self) -> dict[str, Any]:
        return {"callbacks": {name: t.to_json() for name, t in self.callbacks.items()},
                "collections": {str(g): t.to_json() for g, t in self.collections.items()},
                "turns": self.turns, "socket_waits": self.socket_waits.snapshot().to_json()}

    def write(self) -> None:
        self.path.write_text(json.dumps(self.to_json()))


def from_environment() -> LoopWatch | None:
    """The watch ``NARA_LOOP_WATCH`` asks for, installed; None when it is not set."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    watch = LoopWatch(Path(directory))
    watch.install()
    return watch


def window(before: dict[str, Any], after: dict[str, Any], top: int = 8) -> dict[str, Any]:
    """What happened between two readings of ``to_json``: the longest callbacks by their total time, and
    the collector's passes per generation (each as [count, total seconds, longest seconds])."""

    def diff(b: dict[str, list[float]], a: dict[str, list[float]]) -> dict[str, list[float]]:
        out = {}
        for name, (count, total, longest) in a.items():
            was = b.get(name, [0, 0.0, 0.0])
            if count > was[0]:
                out[name] = [count - was[0], total - was[1], longest]  # (longest: since the start)
        return out

    callbacks = diff(before.get("callbacks", {}), after.get("callbacks", {}))
    ranked = dict(sorted(callbacks.items(), key=lambda kv: -kv[1][1])[:top])
    turns_before = before.get("turns") or [[0, 0, 0.0]] * len(after.get("turns", []))
    turns = [[a - b for a, b in zip(after_bucket, before_bucket, strict=True)]
             for after_bucket, before_bucket in zip(after.get("turns", []), turns_before, strict=True)]
    waits = DelaySnapshot.from_json(after["socket_waits"]).since(
        DelaySnapshot.from_json(before["socket_waits"]) if "socket_waits" in before else DelaySnapshot.empty()
    ) if "socket_waits" in after else DelaySnapshot.empty()
    return {"callbacks": ranked, "collections": diff(before.get("collections", {}), after.get("collections", {})),
            "turns": turns, "socket_waits": waits.to_json()}


def turn_shares(turns: list[list[float]]) -> list[tuple[str, float, float, float]]:
    """Per bucket of a window's ``turns``: its label, its share of the turns, of the sockets found ready
    (of the datagrams read: each is handled after about a turn of that length), and of the time the turns
    took (of the datagrams arriving: one that arrives during a turn waits in its socket for the rest of it,
    which the forwarding delay, stamped when the datagram is read, does not count)."""
    count = sum(t[0] for t in turns) or 1
    ready = sum(t[1] for t in turns) or 1
    seconds = sum(t[2] for t in turns) or 1.0
    bounds = [f"<={b * 1000:g} ms" for b in TURN_BUCKETS] + [f">{TURN_BUCKETS[-1] * 1000:g} ms"]
    return [(label, t[0] / count, t[1] / ready, t[2] / seconds) for label, t in zip(bounds, turns, strict=True)]
