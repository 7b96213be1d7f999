"""How many objects a piece of the hot path leaves for the garbage collector's next young pass to walk."""

from __future__ import annotations

import gc
from collections.abc import Callable


def young_objects_after(action: Callable[[], object]) -> int:
    """The objects in the youngest generation once ``action`` has run, with no pass in between: what it made
    and kept (issue 9: rings of tracked objects piled up there and made a busy worker's young passes long)."""
    gc.collect()
    gc.disable()  # (every object made from here on, and kept, waits in the youngest generation)
    try:
        action()
        return len(gc.get_objects(generation=0))
    finally:
        gc.enable()
