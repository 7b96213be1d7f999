"""Recently forwarded packets of one published stream, for answering NACKs.

One cache per published stream, shared by every subscriber: a subscriber's
NACK is mapped back to the source sequence number and served from here.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .aiortc_adapter import RtpPacket

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

    def holds(self, seq: int) -> bool:
        return self._seqs[seq & self._mask] == seq

    def get(self, seq: int) -> T | None:
        slot = seq & self._mask
        if self._seqs[slot] != seq:
            return None
        return self._items[slot]

    def clear(self) -> None:
        self._seqs = [-1] * len(self._seqs)
        self._items = [None] * len(self._items)


class RtpPacketCache:
    """A ``PacketCache`` of RTP packets that gives the garbage collector nothing to walk.

    A cache holds each packet for seconds and replaces one with another tens of
    times a second per stream. Kept as aiortc's ``RtpPacket`` objects (each with
    its attribute dict, header extensions and CSRC list), every packet stored is
    a new object the collector tracks, while its count of objects (new less
    freed) hardly moves: its passes came seldom and walked every packet stored
    since the last, 6-12 ms at a time on a busy worker, holding every arriving
    packet meanwhile (docs/benchmarks.md, "The delay's tail"). So a packet is
    kept as plain values in columns (numbers and bytes, which the collector
    does not track), and built again as an ``RtpPacket`` only when a NACK asks
    for it.
    """

    def __init__(self, size: int = 512) -> None:
        self._seqs: PacketCache[None] = PacketCache(size)  # (which sequence number each slot holds)
        self._mask = size - 1
        self._payload_types = [0] * size
        self._markers = [0] * size
        self._timestamps = [0] * size
        self._ssrcs = [0] * size
        self._padding = [0] * size
        # aiortc's (voice activity, level) as one number, -1 for none: a tuple per audio packet would be an object
        # the collector tracks, waiting in its youngest generation for the next pass to walk it.
        self._audio_levels = [-1] * size
        self._payloads = [b""] * size

    def store(self, seq: int, packet: RtpPacket) -> bool:
        """Keep ``packet``; False if this sequence number is already held (a duplicate)."""
        if not self._seqs.store(seq, None):
            return False
        slot = seq & self._mask
        self._payload_types[slot] = packet.payload_type
        self._markers[slot] = packet.marker
        self._timestamps[slot] = packet.timestamp
        self._ssrcs[slot] = packet.ssrc
        self._padding[slot] = packet.padding_size
        level = packet.extensions.audio_level
        self._audio_levels[slot] = -1 if level is None else int(level[0]) << 7 | level[1]
        self._payloads[slot] = packet.payload
        return True

    def get(self, seq: int) -> RtpPacket | None:
        if not self._seqs.holds(seq):
            return None
        slot = seq & self._mask
        packet = RtpPacket(self._payload_types[slot], self._markers[slot], seq, self._timestamps[slot],
                           self._ssrcs[slot], self._payloads[slot])
        packet.padding_size = self._padding[slot]
        level = self._audio_levels[slot]
        packet.extensions.audio_level = None if level < 0 else (bool(level >> 7), level & 0x7F)
        return packet

    def clear(self) -> None:
        self._seqs.clear()
        self._payloads = [b""] * len(self._payloads)
        self._audio_levels = [-1] * len(self._audio_levels)
