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

Timing a callback costs two clock reads around each of them, which is why
this is not left on.
"""

from __future__ import annotations

import asyncio.events
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "NARA_LOOP_WATCH"
LONG_CALLBACK = 0.001  # seconds


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

    def uninstall(self) -> None:
        if self._plain_run is not None:
            asyncio.events.Handle._run = self._plain_run  # type: ignore[method-assign,assignment]
            self._plain_run = None
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = self.clock()
        elif self._gc_started is not None:
            self.collections.setdefault(info["generation"], Tally()).add(self.clock() - self._gc_started)
            self._gc_started = None

    def to_json(self) -> dict[str, Any]:
        return {"callbacks": {name: t.to_json() for name, t in self.callbacks.items()},
                "collections": {str(g): t.to_json() for g, t in self.collections.items()}}

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
    return {"callbacks": ranked, "collections": diff(before.get("collections", {}), after.get("collections", {}))}
