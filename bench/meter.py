"""What one receiver got from one RTP stream, measured without decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mediaserver.aiortc_adapter import RtpPacket


@dataclass
class StreamMeter:
    clock_rate: int = 90000
    packets: int = 0
    bytes: int = 0
    frames: int = 0
    first_seq: int | None = None
    highest_seq: int | None = None  # extended (unwrapped) sequence numbers
    delays: list[float] = field(default_factory=list)
    _last_seq: int | None = None
    _seq_cycles: int = 0
    _last_ts: int | None = None
    _ts_cycles: int = 0

    def reset(self) -> None:
        self.packets = self.bytes = self.frames = 0
        self.first_seq = self.highest_seq = None
        self.delays = []

    def add(self, packet: RtpPacket, arrival: float | None = None) -> None:
        self.count(packet.sequence_number, packet.timestamp, bool(packet.marker), len(packet.payload),
                   time.monotonic() if arrival is None else arrival)

    def count(self, sequence_number: int, timestamp: int, marker: bool, size: int, arrival: float) -> None:
        """One packet, from its header alone (``size``: what is counted as its bytes)."""
        self.packets += 1
        self.bytes += size
        if marker:
            self.frames += 1
        seq = self._extend_seq(sequence_number)
        if self.first_seq is None or seq < self.first_seq:
            self.first_seq = seq
        if self.highest_seq is None or seq > self.highest_seq:
            self.highest_seq = seq
        ts = self._extend_ts(timestamp)
        # One-way delay up to a constant: arrival time minus media time.
        self.delays.append(arrival - ts / self.clock_rate)

    def _extend_seq(self, seq: int) -> int:
        if self._last_seq is not None:
            if seq < 0x1000 and self._last_seq > 0xF000:
                self._seq_cycles += 1
            elif seq > 0xF000 and self._last_seq < 0x1000:
                return (self._seq_cycles - 1) * 0x10000 + seq  # late packet from before the wrap
        self._last_seq = seq
        return self._seq_cycles * 0x10000 + seq

    def _extend_ts(self, ts: int) -> int:
        if self._last_ts is not None:
            if ts < 0x10000000 and self._last_ts > 0xF0000000:
                self._ts_cycles += 1
            elif ts > 0xF0000000 and self._last_ts < 0x10000000:
                return (self._ts_cycles - 1) * 0x100000000 + ts
        self._last_ts = ts
        return self._ts_cycles * 0x100000000 + ts

    def summary(self, seconds: float) -> dict[str, Any]:
        expected = 0 if self.first_seq is None or self.highest_seq is None else (
            self.highest_seq - self.first_seq + 1)
        delays = sorted(self.delays)
        base = delays[0] if delays else 0.0

        def quantile(q: float) -> float:
            return (delays[min(len(delays) - 1, int(q * len(delays)))] - base) * 1000 if delays else 0.0

        return {
            "packets": self.packets,
            "frames_per_second": self.frames / seconds,
            "kbit_per_second": self.bytes * 8 / seconds / 1000,
            "loss": max(0.0, 1 - self.packets / expected) if expected else 1.0,
            "delay_p50_ms": quantile(0.5),
            "delay_p95_ms": quantile(0.95),
        }
