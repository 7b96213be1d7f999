"""Sequence number and timestamp rewriting for one outbound stream.

Every subscriber's outbound stream has its own SSRC and must see one
continuous sequence of sequence numbers and timestamps, even when the source
behind it changes (another publisher reuses the slot, or a publisher comes
back with a new SSRC). Within one source the offsets stay fixed, so gaps and
reordering pass through unchanged and the subscriber's NACKs map straight
back to the source's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32


def seq_newer(a: int, b: int) -> bool:
    """True when 16-bit sequence number ``a`` comes after ``b`` (RFC 1982)."""
    return a != b and ((a - b) % SEQ_MOD) < SEQ_MOD // 2


@dataclass
class StreamRewriter:
    clock_rate: int
    seq_offset: int = 0
    ts_offset: int = 0
    source_ssrc: int | None = None
    last_out_seq: int | None = None
    last_out_ts: int | None = None
    last_out_time: float | None = None

    def switch_source(self, ssrc: int, first_seq: int, first_ts: int, now: float) -> None:
        """Continue the outbound numbering from packet (first_seq, first_ts) of ``ssrc``."""
        self.source_ssrc = ssrc
        if self.last_out_seq is None or self.last_out_ts is None or self.last_out_time is None:
            self.seq_offset = 0
            self.ts_offset = 0
            return
        self.seq_offset = (self.last_out_seq + 1 - first_seq) % SEQ_MOD
        elapsed = max(now - self.last_out_time, 1 / 90)  # at least one frame interval
        next_ts = (self.last_out_ts + int(elapsed * self.clock_rate)) % TS_MOD
        self.ts_offset = (next_ts - first_ts) % TS_MOD

    def rewrite(self, seq: int, ts: int, now: float) -> tuple[int, int]:
        """Outbound (sequence number, timestamp) for a source packet."""
        out_seq = (seq + self.seq_offset) % SEQ_MOD
        out_ts = (ts + self.ts_offset) % TS_MOD
        if self.last_out_seq is None or seq_newer(out_seq, self.last_out_seq):
            self.last_out_seq = out_seq
            self.last_out_ts = out_ts
            self.last_out_time = now
        return out_seq, out_ts

    def source_seq(self, out_seq: int) -> int:
        """The source sequence number behind an outbound one (for NACKs)."""
        return (out_seq - self.seq_offset) % SEQ_MOD
