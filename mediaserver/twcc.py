"""Transport-wide congestion control feedback: the packet, what the receiver keeps, what the sender keeps.

Every RTP packet on one connection carries a transport-wide sequence number
(a header extension, ``TRANSPORT_CC_URI``); the receiver tells the sender when
each one arrived, every 50-100 ms, in an RTCP transport feedback packet
(RTPFB, FMT 15, draft-holmer-rmcat-transport-wide-cc-extensions-01). Its
FCI:

* base sequence number (16 bits) and packet status count (16 bits): the
  packets described, from the base on;
* reference time (signed 24 bits, in 64 ms) and feedback packet count
  (8 bits, to notice lost feedback);
* packet status chunks of 16 bits: a run length chunk (``0``, a 2-bit
  symbol, a 13-bit count) or a status vector chunk (``1``, then ``0`` and
  fourteen 1-bit symbols, or ``1`` and seven 2-bit symbols). A symbol says
  not received (0), received with a small delta (1: one unsigned byte) or
  with a large or negative one (2: two bytes, signed);
* one receive delta per received packet, in 250 µs, the first from the
  reference time, each later one from the packet before it;
* zero padding to a multiple of 32 bits.

``FeedbackRecorder`` (the receiver) and ``SendHistory`` (the sender) are plain
data driven by the caller's clock; the adapter (mediaserver/aiortc_adapter.py,
"transport-wide congestion control") puts them on aiortc's connections.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

TRANSPORT_CC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
RTCP_RTPFB = 205
TRANSPORT_FEEDBACK_FMT = 15

NOT_RECEIVED, SMALL_DELTA, LARGE_DELTA = 0, 1, 2
DELTA_TICK_US = 250  # a receive delta counts quarter milliseconds
REFERENCE_TICK_US = 64_000  # the reference time counts 64 ms
MAX_RUN = 0x1FFF
MAX_STATUS_COUNT = 0xFFFF

_HEADER = struct.Struct("!BBHLL")
_FCI_HEAD = struct.Struct("!HHL")


class FeedbackError(ValueError):
    """A transport feedback packet that does not parse (code ``twcc_malformed``)."""

    code = "twcc_malformed"


@dataclass(frozen=True)
class TransportFeedback:
    """One parsed feedback packet. ``arrivals``: for each packet from ``base_sequence`` on, in order,
    its arrival in microseconds on the receiver's clock (reference time plus deltas), or None if lost."""

    sender_ssrc: int
    media_ssrc: int
    base_sequence: int
    feedback_count: int
    reference_time: int  # signed 24-bit, in 64 ms
    arrivals: list[int | None]

    def packets(self) -> list[tuple[int, int | None]]:
        """(16-bit sequence number, arrival µs or None) for every packet described."""
        return [((self.base_sequence + i) & 0xFFFF, at) for i, at in enumerate(self.arrivals)]


# --- the packet ------------------------------------------------------------------


def encode_feedback(sender_ssrc: int, media_ssrc: int, base_sequence: int, feedback_count: int,
                    arrivals: list[int | None]) -> bytes:
    """An RTCP transport feedback packet for ``arrivals`` (µs on the receiver's clock, None: lost)
    of the packets from ``base_sequence`` on. The first arrival must be a packet that came; every
    delta must fit two bytes (8.19 s either way): ``FeedbackRecorder`` cuts a packet short there."""
    if not arrivals or len(arrivals) > MAX_STATUS_COUNT:
        raise ValueError("a feedback packet describes 1 to 65535 packets")
    first = next((at for at in arrivals if at is not None), None)
    if first is None:
        raise ValueError("a feedback packet needs at least one packet that came")
    reference = first // REFERENCE_TICK_US
    previous = reference * (REFERENCE_TICK_US // DELTA_TICK_US)  # in ticks
    symbols: list[int] = []
    deltas = bytearray()
    for at in arrivals:
        if at is None:
            symbols.append(NOT_RECEIVED)
            continue
        ticks = round(at / DELTA_TICK_US)
        delta, previous = ticks - previous, ticks
        if 0 <= delta <= 0xFF:
            symbols.append(SMALL_DELTA)
            deltas.append(delta)
        elif -0x8000 <= delta <= 0x7FFF:
            symbols.append(LARGE_DELTA)
            deltas += struct.pack("!h", delta)
        else:
            raise ValueError("a receive delta does not fit two bytes")
    chunks = _encode_chunks(symbols)
    fci = _FCI_HEAD.pack(base_sequence & 0xFFFF, len(arrivals),
                         ((reference & 0xFFFFFF) << 8) | (feedback_count & 0xFF))
    body = fci + b"".join(struct.pack("!H", chunk) for chunk in chunks) + bytes(deltas)
    body += bytes(-len(body) % 4)
    length = (8 + len(body)) // 4  # in 32-bit words, minus one
    return _HEADER.pack(0x80 | TRANSPORT_FEEDBACK_FMT, RTCP_RTPFB, length, sender_ssrc, media_ssrc) + body


def _encode_chunks(symbols: list[int]) -> list[int]:
    """Status chunks, greedily: a run where seven or more symbols repeat, else the densest vector."""
    chunks: list[int] = []
    i, n = 0, len(symbols)
    while i < n:
        run = 1
        while i + run < n and symbols[i + run] == symbols[i] and run < MAX_RUN:
            run += 1
        if run >= 7 or i + run == n:
            chunks.append((symbols[i] << 13) | run)
            i += run
            continue
        window = symbols[i:i + 14]
        if all(s <= SMALL_DELTA for s in window):
            chunk = 0x8000
            for k, symbol in enumerate(window):
                chunk |= symbol << (13 - k)
            chunks.append(chunk)
            i += len(window)
        else:
            chunk = 0xC000
            for k, symbol in enumerate(symbols[i:i + 7]):
                chunk |= symbol << (12 - 2 * k)
            chunks.append(chunk)
            i += min(7, n - i)
    return chunks


def is_transport_feedback(data: bytes, at: int = 0) -> bool:
    return len(data) >= at + 2 and data[at + 1] == RTCP_RTPFB and data[at] & 0x1F == TRANSPORT_FEEDBACK_FMT


def parse_feedback(data: bytes) -> TransportFeedback:
    """Parse one RTCP transport feedback packet (``data`` starts at its header). Raises FeedbackError."""
    if len(data) < 20:
        raise FeedbackError("transport feedback shorter than its fixed part")
    first, packet_type, length, sender_ssrc, media_ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2 or packet_type != RTCP_RTPFB or first & 0x1F != TRANSPORT_FEEDBACK_FMT:
        raise FeedbackError("not an RTCP transport feedback packet")
    end = (length + 1) * 4
    if end > len(data):
        raise FeedbackError("transport feedback longer than the data")
    if first & 0x20:  # padding: its count is the last byte
        end -= data[end - 1]
    base, count, packed = _FCI_HEAD.unpack_from(data, 12)
    reference = packed >> 8
    if reference & 0x800000:
        reference -= 1 << 24
    symbols: list[int] = []
    at = 20
    while len(symbols) < count:
        if at + 2 > end:
            raise FeedbackError("transport feedback ends inside its status chunks")
        chunk = (data[at] << 8) | data[at + 1]
        at += 2
        if chunk & 0x8000 == 0:
            symbol, run = (chunk >> 13) & 0x3, chunk & MAX_RUN
            if symbol == 3:
                raise FeedbackError("transport feedback uses the reserved status symbol")
            symbols.extend([symbol] * min(run, count - len(symbols)))
        elif chunk & 0x4000 == 0:
            symbols.extend((chunk >> (13 - k)) & 1 for k in range(14))
        else:
            for k in range(7):
                symbol = (chunk >> (12 - 2 * k)) & 0x3
                if symbol == 3 and len(symbols) < count:
                    raise FeedbackError("transport feedback uses the reserved status symbol")
                symbols.append(symbol)
    del symbols[count:]
    ticks = reference * (REFERENCE_TICK_US // DELTA_TICK_US)
    arrivals: list[int | None] = []
    for symbol in symbols:
        if symbol == NOT_RECEIVED:
            arrivals.append(None)
            continue
        size = 1 if symbol == SMALL_DELTA else 2
        if at + size > end:
            raise FeedbackError("transport feedback ends inside its receive deltas")
        ticks += data[at] if size == 1 else struct.unpack_from("!h", data, at)[0]
        at += size
        arrivals.append(ticks * DELTA_TICK_US)
    return TransportFeedback(sender_ssrc, media_ssrc, base, packed & 0xFF, reference, arrivals)


def transport_feedbacks(compound: bytes) -> list[TransportFeedback]:
    """Every well-formed transport feedback packet in a compound RTCP datagram (others are skipped)."""
    found: list[TransportFeedback] = []
    at = 0
    while at + 4 <= len(compound):
        end = at + (((compound[at + 2] << 8) | compound[at + 3]) + 1) * 4
        if end > len(compound):
            break
        if is_transport_feedback(compound, at):
            try:
                found.append(parse_feedback(compound[at:end]))
            except FeedbackError:
                pass
        at = end
    return found


# --- the receiver -----------------------------------------------------------------


class FeedbackRecorder:
    """What a receiver keeps to describe its arrivals: each transport-wide sequence number's arrival,
    until the next feedback packet (``feedback``, every 50-100 ms) has told the sender."""

    def __init__(self, sender_ssrc: int) -> None:
        self.sender_ssrc = sender_ssrc
        self.media_ssrc = 0
        self.count = 0  # feedback packets built
        self._arrivals: dict[int, int] = {}  # unwrapped sequence number -> arrival µs
        self._highest: int | None = None
        self._next: int | None = None  # the first sequence number the next feedback describes

    def on_packet(self, sequence: int, arrival_us: int, media_ssrc: int = 0) -> None:
        if media_ssrc:
            self.media_ssrc = media_ssrc
        if self._highest is None:
            unwrapped = sequence
        else:
            unwrapped = self._highest + ((sequence - self._highest + 0x8000) & 0xFFFF) - 0x8000
        if self._next is not None and unwrapped < self._next:
            return  # described already (as lost): too late to tell
        if self._highest is None or unwrapped > self._highest:
            self._highest = unwrapped
        if self._next is None or (self.count == 0 and unwrapped < self._next):
            self._next = unwrapped  # (before the first feedback, a reordered first packet lowers the start)
        self._arrivals.setdefault(unwrapped, arrival_us)
        if len(self._arrivals) > 4 * MAX_STATUS_COUNT // 8:  # a sender far ahead: start over from here
            self._arrivals = {unwrapped: arrival_us}
            self._next = self._highest = unwrapped

    def feedback(self) -> bytes | None:
        """The next feedback packet, or None when nothing new arrived."""
        if self._highest is None or self._next is None or not self._arrivals:
            return None
        start = self._next
        arrivals: list[int | None] = []
        last_ticks: int | None = None
        seq = start
        while seq <= self._highest and len(arrivals) < MAX_STATUS_COUNT:
            at = self._arrivals.get(seq)
            if at is not None:
                ticks = round(at / DELTA_TICK_US)
                if last_ticks is not None and not -0x8000 <= ticks - last_ticks <= 0x7FFF:
                    break  # the rest goes in the next packet, with its own reference time
                last_ticks = ticks
            arrivals.append(at)
            seq += 1
        while arrivals and arrivals[-1] is None:
            arrivals.pop()
        packet = encode_feedback(self.sender_ssrc, self.media_ssrc, start, self.count, arrivals)
        self.count += 1
        self._next = start + len(arrivals)
        for described in [s for s in self._arrivals if s < self._next]:
            del self._arrivals[described]
        return packet


# --- the sender -------------------------------------------------------------------


@dataclass(frozen=True)
class PacketResult:
    """One sent packet as a feedback packet describes it."""

    sequence: int  # unwrapped
    sent: float  # seconds, the sender's clock
    size: int  # bytes on the wire
    copy: bool  # a copy of a packet sent before (a probe's padding, or a resend): see SendHistory.take
    arrival: float | None  # seconds, the receiver's clock (only differences mean anything); None: lost


class SendHistory:
    """The packets sent on one connection, by transport-wide sequence number, in a bounded ring:
    send time, size and whether it was a copy. ``take`` runs once per packet sent, on the
    forwarding hot path: it writes into preallocated arrays and allocates nothing."""

    __slots__ = ("next", "_times", "_sizes", "_copies", "_seqs", "_mask", "_last_arrival_base")

    def __init__(self, capacity: int = 8192) -> None:
        if capacity & (capacity - 1) or capacity > 0x8000:
            raise ValueError("the ring's capacity is a power of two up to 32768")
        self.next = 0  # unwrapped
        self._times = array("d", bytes(8 * capacity))
        self._sizes = array("l", bytes(array("l").itemsize * capacity))
        self._copies = bytearray(capacity)
        self._seqs = array("q", [-1]) * capacity
        self._mask = capacity - 1
        self._last_arrival_base: tuple[int, int] | None = None  # (reference time, its unwrapped 64 ms count)

    def take(self, now: float, size: int, copy: bool = False) -> int:
        """Record a packet about to be sent; its 16-bit transport-wide sequence number.

        ``copy``: the packet repeats one sent before, with the same stream and sequence number (a probe's
        padding, or a resend). A receiver that has the original drops the copy as a replay (SRTP's replay
        check) before noting its arrival, so its feedback reads lost whether or not the link carried it:
        not a loss to count."""
        seq = self.next
        i = seq & self._mask
        self._times[i] = now
        self._sizes[i] = size
        self._copies[i] = copy
        self._seqs[i] = seq
        self.next = seq + 1
        return seq & 0xFFFF

    def results(self, feedback: TransportFeedback) -> list[PacketResult]:
        """The packets ``feedback`` describes that are still in the ring, with their send records
        (none for a feedback describing more packets than the ring holds: a few bytes of run
        length can describe 65535, and matching them all would cost far more than reading them)."""
        if len(feedback.arrivals) > 2 * len(self._copies):
            return []
        base = self._unwrap(feedback.base_sequence)
        offset = self._unwrap_reference(feedback.reference_time)
        found: list[PacketResult] = []
        for k, at in enumerate(feedback.arrivals):
            seq = base + k
            i = seq & self._mask
            if self._seqs[i] != seq:
                continue  # (not sent yet, or overwritten: too old)
            arrival = None if at is None else (at + offset) / 1e6
            found.append(PacketResult(seq, self._times[i], self._sizes[i], bool(self._copies[i]), arrival))
        return found

    def _unwrap(self, sequence: int) -> int:
        newest = self.next - 1
        return newest + ((sequence - newest + 0x8000) & 0xFFFF) - 0x8000

    def _unwrap_reference(self, reference: int) -> int:
        """Microseconds to add to a feedback's arrivals so they stay continuous where the 24-bit
        reference time wraps (every 12 days)."""
        last = self._last_arrival_base
        if last is None:
            unwrapped = reference
        else:
            unwrapped = last[1] + ((reference - last[0] + (1 << 23)) & 0xFFFFFF) - (1 << 23)
        self._last_arrival_base = (reference, unwrapped)
        return (unwrapped - reference) * REFERENCE_TICK_US
