"""Recently forwarded packets of one published stream, for answering NACKs.

One cache per published stream, shared by every subscriber: a subscriber's
NACK is mapped back to the source sequence number and served from here.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class PacketCache(Generic[T]):
    """A ring of the last ``size`` packets, indexed by 16-bit sequence number."""

    def __init__(self, size: int = 512) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError("cache size must be a power of two")
        self._mask = size - 1
        self._seqs: list[int] = [-1] * size
        self._items: list[T | None] = [None] * size

    def store(self, seq: int, item: T) -> bool:
        """Keep ``item``; False if this sequence number is already held (a duplicate)."""
        slot = seq & self._mask
        if self._seqs[slot] == seq:
            return False
        self._seqs[slot] = seq
        self._items[slot] = item
        return True

    def get(self, seq: int) -> T | None:
        slot = seq & self._mask
        if self._seqs[slot] != seq:
            return None
        return self._items[slot]

    def clear(self) -> None:
        self._seqs = [-1] * len(self._seqs)
        self._items = [None] * len(self._items)
