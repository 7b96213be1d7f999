"""A media worker's collector: participants' long-lived objects frozen out of its full passes, and every
one that left collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from mediaserver.worker import Collector


class Connection:
    """Stands for a participant's connection: objects that refer to one another, as aiortc's do."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # (what this test froze goes back to the collector)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_joined_participants_are_left_out_of_full_passes_and_collected_when_one_leaves(thawed: None) -> None:
    clock = Clock()
    collector = Collector(clock, every=600.0)
    ours = Connection()
    alive = weakref.ref(ours)
    collector.tick({1})  # one joined
    assert gc.get_freeze_count() > 0
    del ours  # (as a connection that closed: garbage only the collector can free, frozen out of its passes)
    gc.collect()
    assert alive() is not None
    clock.now += 2
    collector.tick({1})  # nothing changed: no pass, nothing thawed
    gc.collect()
    assert collector.passes == 0 and alive() is not None
    collector.tick(set())  # it left: thawed, collected, and what lives frozen again
    assert alive() is None
    assert collector.passes == 1 and gc.get_freeze_count() > 0


def test_without_a_leave_what_was_frozen_is_collected_every_so_often(thawed: None) -> None:
    clock = Clock()
    collector = Collector(clock, every=600.0)
    collector.tick({1, 2})
    stray = Connection()
    gc.freeze()  # (frozen by a later join, then dropped)
    collector.tick({1, 2, 3})
    alive = weakref.ref(stray)
    del stray
    clock.now += 599
    collector.tick({1, 2, 3})
    assert alive() is not None
    clock.now += 1
    collector.tick({1, 2, 3})
    assert alive() is None and collector.passes == 1
