"""What a receiver does with the packets it gets: plays audio on time and hands on whole video frames.

Two policies, pure and driven by the time passed in, so tests run them with
a fake clock; the aiortc shell around them is in ``aiortc_adapter``.

Audio (``AudioPlayout``): one 20 ms frame comes out on every tick of a steady
playout clock, whatever the network did (or one packet of 40 or 60 ms, from a
sender that packs more frames into each packet on a thin uplink; the clock then
ticks at the packet's length). The clock runs a small target delay
behind the fastest packets seen, grown when packets arrive late and shrunk
slowly when they stop doing so. For each tick: the packet itself if it is
here; else the packet after it, if here, rebuilds it from its in-band FEC;
else the decoder conceals the gap. Given a way to ask for packets again, a
packet is asked for as soon as it is missing (a gap in sequence numbers, or
half a frame overdue) and once more a round trip later, while its frame is
still to play; when retransmissions are what
fills the gaps, the target delay makes room for one (up to a quarter of a
second for 20 ms packets, more for longer ones, which show a loss later: 330 ms
for 60 ms packets), and gives it back slowly once the link is clean. A stream that
comes later for good (a sender that lost time, after a stall, without its
timestamps showing it) is measured even while each packet is asked for
before it comes, and once every packet has come too late for a second, at
the stream's pace, the playout takes the stream up as it comes.

Video (``VideoFrameAssembler``): packets in, whole VP8 frames out, in order.
A frame with a hole waits a short, round-trip-aware time for the
retransmission that aiortc's NACK asks for (given a way to ask, the hole is
asked for twice more, a repair time apart, so a lost retransmission costs a
round trip and not the picture), then is given up; after that only
a keyframe can be decoded cleanly, so later frames are not handed on until
one arrives, and the sender is asked for one, and asked again at each frame
it cannot use until one comes (two round trips apart, 0.3 to 1 s). A later
complete keyframe never waits behind an older broken frame.

Video (``VideoPlayout``): when each whole frame is shown. Frames come out on
their own clock (their RTP timestamps) a target delay behind the fastest
frames seen; the delay covers how late most frames come, and so, on a lossy
link, the retransmissions that complete them, as a browser's jitter buffer
does. A repaired frame then shows on time instead of standing the picture
still for a round trip. While holes are being found, the delay has room for
one repair (and the frame interval it may take a hole to show) from the start
of the stream, a guess until a repair has been measured; room made ahead of
need is grown into a little per frame, so the picture slows instead of
standing still.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .vp8 import is_keyframe_data, parse_descriptor

STRAYS_BEFORE_RESYNC = 3  # packets in a row not of the stream (far from it, or off its frames) before a resync
REPAIR_MEMORY = 10.0  # seconds after the last hole found or repaired that a video stream counts as one with holes
REPAIR_ROOM = 1.2  # ... and its playout delay leaves this much more than a repair takes
ASSUMED_REPAIR = 0.1  # seconds a video repair is taken to need before one has been measured
# Seconds after a hole's first ask (aiortc's NACK, sent as the hole shows) that it is asked for once more. On a
# link that loses one packet in twenty each way, one ask in twenty is lost too; the next ask, a repair's time
# later, came too late for the frame's turn: three of the four freezes of a 5 %-loss run (docs/benchmarks.md,
# issue 5, "A lost ask"). Apart by this much, the two asks are seldom lost together; the server answers the
# first that reaches it and counts the pair as one ask.
ECHO_GAP = 0.03
# Seconds between keyframe requests while a broken picture waits for one: two round trips (the request's way,
# and the keyframe's, several packets), within these bounds. A request inside that time would ask for the
# keyframe already on its way; one asked only every second left a subscriber whose every keyframe could
# lose a packet (resends shed) without a picture for seconds.
KEYFRAME_ASK_MIN = 0.3
KEYFRAME_ASK_MAX = 1.0


class _Unwrapper:
    """Extends a wrapping RTP counter to an unbounded integer, nearest the highest value accepted."""

    def __init__(self, bits: int) -> None:
        self.modulus = 1 << bits
        self.highest: int | None = None

    def extend(self, value: int) -> int:
        if self.highest is None:
            return value
        delta = (value - self.highest) % self.modulus
        if delta >= self.modulus // 2:
            delta -= self.modulus
        return self.highest + delta

    def accept(self, extended: int) -> None:
        if self.highest is None or extended > self.highest:
            self.highest = extended


# --- audio -------------------------------------------------------------------------

FrameSource = Literal["packet", "stretch", "shorten", "fec", "conceal", "silence"]
GUESS_PAUSE = 2.0  # seconds without asking for overdue packets after one turned out only late
STALE_TIMING = 0.5  # seconds without a packet measured (each asked for first) before the newest are measured anyway
RESYNC_AFTER = 1.0  # seconds of every packet coming too late, at the stream's pace, before the playout takes it up
# A queue that fills now and then (a sender's estimate at the top of its climb, a probe, a keyframe on a thin link)
# holds the audio behind it for a few tenths of a second. Each time, the packets that came too late are sound lost
# for good, and the jitter figures forget the spike within seconds, so the next one finds the same delay. Much as
# NetEQ's peak detector does, the late packets of PEAKS_TO_HOLD such spikes within PEAK_MEMORY seconds hold the
# target at the delay the highest of them needed and a frame more (up to ``max_delay``): the next spike stretches
# the sound while its packets are on their way. Spikes less than PEAK_MERGE seconds apart are one. (On a
# 150 kbit/s link, 0.5-4 % of the sound was lost this way, each spike 0.1-0.6 s of it. Holding after two spikes
# halved that; after one, with the frame to spare, it fell by a further 40 % in five runs each.)
PEAK_MEMORY = 20.0
PEAKS_TO_HOLD = 1
PEAK_MERGE = 1.0
# Seconds at least between two frames lengthened to grow the delay (each by about a frame): a delay 50 ms short
# of its target grows in under a quarter of a second, and the sound is never slowed for long at a stretch.
# (On nara bench adapt's 150 kbit/s thin150, the delay sat 40-50 ms under its target for seconds at a time, grown
# only when a packet the queue held back was missing at its turn: one or two concealed frames per run.)
STRETCH_INTERVAL = 0.08
PAUSE_PACKET_SIZE = 2  # an Opus packet this small carries no audio: the sender goes quiet (DTX)


@dataclass(frozen=True)
class PlayoutFrame:
    """What to play on one tick.

    ``source``: "packet" (decode ``payload``), "stretch" or "shorten" (decode
    ``payload``, lengthen it by about a frame or shorten it by up to most of one,
    ``mediaserver.stretch``, then tell the playout how much with
    ``AudioPlayout.resized``), "fec" (rebuild the frame from the
    FEC data in ``payload``, the packet after it), "conceal" (a lost frame:
    the decoder's concealment) or "silence" (the sender paused, DTX: the
    decoder's concealment, which fades to comfort noise).
    """

    source: FrameSource
    payload: bytes | None
    timestamp: int  # RTP timestamp of the frame, as sent
    new_stream: bool = False  # reset the decoder before this frame
    samples: int = 960  # how much sound it stands for: what "fec", "conceal" and "silence" are to make up

    @property
    def concealed(self) -> bool:
        return self.source == "conceal"


@dataclass
class PlayoutCounters:
    played: int = 0  # frames decoded from their own packet
    stretched: int = 0  # of those, frames lengthened to grow the delay ahead of need (played sound, not a gap)
    shortened: int = 0  # ... and frames shortened by a few periods to bring it down (no frame passed over)
    recovered_fec: int = 0  # lost frames rebuilt from the next packet's FEC
    concealed: int = 0  # frames the decoder had to make up: gaps a listener hears
    silent: int = 0  # ticks in a pause the sender announced (DTX), not losses
    late_dropped: int = 0  # packets that arrived after their time to play
    duplicates: int = 0
    skipped: int = 0  # frames passed over to bring the delay down or to catch up with the reader
    resets: int = 0  # new streams (new SSRC or a jump) after the first
    nacked: int = 0  # missing packets asked for again (each counted once, however often asked)
    recovered_retransmission: int = 0  # of the frames played from their packet, those that came again when asked
    resyncs: int = 0  # times every packet came too late for a while and the playout took the stream up as it came


PacketFateKind = Literal["kept", "repaired", "late", "duplicate", "stray"]


@dataclass(frozen=True)
class PacketFate:
    """What became of one arriving packet, and the playout's timing then (for benchmarks' records).

    ``fate``: "kept" (in time), "repaired" (in time, asked for again), "late" (its time to play had passed),
    "duplicate", or "stray" (not of the stream, held until it shows a new one). ``transit``: arrival less
    media time, on the arrival clock (its least over the window is ``base``); ``delay`` and ``target``
    are the playout's delay and its target, seconds behind the fastest packets.
    """

    at: float
    sequence_number: int
    timestamp: int
    fate: PacketFateKind
    asked: bool  # asked for again (as lost, or as overdue: then perhaps the original, late)
    transit: float
    base: float
    delay: float
    target: float


@dataclass
class _AudioPacket:
    seq: int
    ts: int
    payload: bytes
    repaired: bool = False  # came again after we asked for it
    samples: int = 960  # its length, in samples


@dataclass
class _Request:
    """A missing packet we asked for again."""

    ts: int  # extended timestamp of its frame (the earliest it can be, if the sender paused in between)
    first: float  # when we first asked
    last: float  # when we last asked
    asks: int = 1


class AudioPlayout:
    """An adaptive playout buffer for one audio stream of frames of ``frame_samples`` (Opus at 20 ms).

    A packet may hold several frames (Opus at 40 or 60 ms a packet): ``packet_samples(payload)``
    says how long each one is (every packet one frame, without it). The stream's packets are then
    expected that far apart: a lost one is rebuilt or concealed whole.

    ``push`` each packet as it arrives; call ``pop(now)`` when ``next_due()``
    has come, and play what it returns. Times are seconds on any monotonic clock.
    ``can_recover(packet)`` says whether a packet carries FEC for the frame
    before it (``mediaserver.opus.has_fec`` for Opus).

    With ``can_stretch``, the player can lengthen and shorten a frame (``mediaserver.stretch``): while
    the delay is more than half a frame below its target, a packet now and then comes out as "stretch",
    and the player says by how much it lengthened it (``resized``). The delay then grows before the
    packets a filling queue holds back are due, instead of by concealment once one of them is missing.
    When the delay is to come down, a packet comes out as "shorten" instead of being passed over.
    """

    def __init__(
        self,
        *,
        clock_rate: int = 48000,
        frame_samples: int = 960,
        start_delay: float = 0.06,
        min_delay: float = 0.04,
        max_delay: float = 0.2,
        jitter_window: float = 5.0,
        jitter_quantile: float = 0.95,
        shrink_interval: float = 1.0,
        catch_up_after: float = 0.5,
        can_recover: Callable[[bytes], bool] = lambda packet: True,
        packet_samples: Callable[[bytes], int] | None = None,
        on_missing: Callable[[list[int]], None] | None = None,
        max_requests: int = 3,
        max_repair_delay: float = 0.25,
        repair_window: float = 10.0,
        repair_quantile: float = 0.9,
        assumed_round_trip: float = 0.1,
        can_stretch: bool = False,
        stretch_interval: float = STRETCH_INTERVAL,
    ) -> None:
        if not 0 < min_delay <= start_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= start_delay <= max_delay")
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.clock_rate = clock_rate
        self.frame_samples = frame_samples
        self.frame_duration = frame_samples / clock_rate
        self.start_delay = start_delay
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.jitter_window = jitter_window
        self.jitter_quantile = jitter_quantile
        self.shrink_interval = shrink_interval
        self.catch_up_after = catch_up_after
        self.can_recover = can_recover
        self.packet_samples = packet_samples
        self.on_missing = on_missing
        self.max_requests = max_requests
        self.max_repair_delay = max_repair_delay
        self.repair_window = repair_window
        self.repair_quantile = repair_quantile
        self.assumed_round_trip = assumed_round_trip
        self.can_stretch = can_stretch
        self.stretch_interval = stretch_interval
        self.round_trip_time: float | None = None  # seconds; set it when known
        self.repair_time: float | None = None  # what most recent asks took, from first asking to arrival
        self.counters = PlayoutCounters()
        self._asked = False  # the packet being taken in was asked for again
        self.on_packet: Callable[[PacketFate], None] | None = None  # told what became of each packet
        self._jump = int((max(max_delay, max_repair_delay) + 3.0 + 0.5) * clock_rate)  # farther: not this stream
        self._repairs: deque[tuple[float, float]] = deque()  # (arrival, delay it needed) of packets asked for
        self._repair_samples: deque[float] = deque(maxlen=20)  # times from asking for a packet to its arrival
        self._resend_samples: deque[float] = deque(maxlen=20)  # ... of those that came behind a later packet
        self._started = False
        self._clear()

    def _clear(self) -> None:
        self._ssrc: int | None = None
        self._seq = _Unwrapper(16)
        self._ts = _Unwrapper(32)
        self._packets: dict[int, _AudioPacket] = {}  # by extended timestamp
        self._recent: deque[int] = deque(maxlen=256)  # extended sequence numbers seen lately
        self._transits: deque[tuple[float, float]] = deque()  # (arrival, arrival - media time)
        self._base_transit = 0.0
        self._playhead: int | None = None  # extended timestamp of the next frame to play
        self._origin = 0.0  # local time at which media time 0 would play
        self._reference: _AudioPacket | None = None  # the last packet played
        self._last_shrink: float | None = None
        self._last_stretch: float | None = None
        self._new_stream = False
        self._strays: list[tuple[int, int, bytes, float, int | None]] = []
        self._highest_ts = 0  # extended timestamp of the packet with the highest sequence number
        self._stride = self.frame_samples  # the length of that packet: how far apart the stream's packets are
        self._highest_pauses = False  # that packet announces a pause (DTX): nothing is due after it
        self._guessed: deque[int] = deque(maxlen=64)  # asked for because overdue, not because of a gap
        self._guessing_after = 0.0  # no asking for overdue packets before this time
        self._last_arrival = 0.0
        self._peaks: deque[tuple[float, float]] = deque()  # (last late arrival, delay it needed) of each spike
        self._answered_after: float | None = None  # the packet being taken in came this long after it was asked for
        self._held: int | None = None  # the slot the playout last waited on (played one frame later)
        self._requests: dict[int, _Request] = {}  # by extended sequence number
        self._given_up: dict[int, float] = {}  # asked for, frame played without it: seq -> when first asked
        self._late_since: float | None = None  # first arrival of the packets in a row that all came too late
        self._late_count = 0  # how many of them

    # --- packets in ---------------------------------------------------------------

    def push(self, sequence_number: int, timestamp: int, payload: bytes, now: float,
             ssrc: int | None = None) -> None:
        self._asked = False
        fate = self._take(sequence_number, timestamp, payload, now, ssrc)
        if self.on_packet is not None and self._playhead is not None:
            self.on_packet(PacketFate(now, sequence_number, timestamp, fate, self._asked,
                                      now - timestamp / self.clock_rate, self._base_transit, self.delay,
                                      self.target_delay))

    def _take(self, sequence_number: int, timestamp: int, payload: bytes, now: float,
              ssrc: int | None) -> PacketFateKind:
        if ssrc is not None and self._ssrc is not None and ssrc != self._ssrc:
            self._restart()
        if self._playhead is None:
            self._begin(sequence_number, timestamp, now, ssrc)
        assert self._playhead is not None
        seq = self._seq.extend(sequence_number)
        ts = self._ts.extend(timestamp)
        # Far from the playhead, or between this stream's frames (a publisher who rejoined, its new
        # timestamps carried on by the server from the old ones): not this stream.
        if abs(ts - self._playhead) > self._jump or (ts - self._playhead) % self.frame_samples:
            self._strays.append((sequence_number, timestamp, payload, now, ssrc))
            if len(self._strays) >= STRAYS_BEFORE_RESYNC:
                strays = self._strays
                self._restart()
                for stray in strays:
                    self.push(*stray)
            return "stray"
        if self._strays:
            self.counters.late_dropped += len(self._strays)
            self._strays = []
        highest = self._seq.highest
        self._seq.accept(seq)
        self._ts.accept(ts)
        if seq in self._recent:
            if seq in self._guessed:
                # Asked for as overdue, and here twice: it was only late. The stream runs late
                # (a queue is filling); asking for what is late would fill it faster.
                self._guessing_after = now + GUESS_PAUSE
            self.counters.duplicates += 1
            return "duplicate"
        self._recent.append(seq)
        newest = highest is None or seq > highest
        repaired = self._note_sequence(seq, ts, highest, now)
        self._asked = repaired
        if repaired and self._answered_after is not None:
            if not newest:
                self._resend_samples.append(self._answered_after)
            elif seq in self._guessed and self._answered_after < min(self._resend_samples,
                                                                     default=self.assumed_round_trip):
                # Asked for as overdue, and here before any packet sent after it, sooner than any resend came:
                # the original, only late. The same as coming twice, where the copy never shows: SRTP refuses
                # a copy of a packet already here as a replay.
                self._guessing_after = now + GUESS_PAUSE
        samples = self._length_of(payload)
        if newest:
            self._highest_pauses = len(payload) <= PAUSE_PACKET_SIZE
            self._stride = samples
        self._last_arrival = now
        if repaired:
            # Kept out of the jitter figures: how late a retransmission comes is the repair's own measure.
            self._repairs.append((now, now - ts / self.clock_rate - self._base_transit))
        if not repaired or (newest and self._transits and now - self._transits[-1][0] > STALE_TIMING):
            # Nothing measured for a while, and this packet asked for as overdue is the newest yet: it may
            # well be the original, only late, and nothing of the stream came sooner. Kept out, a stream
            # that comes later than the figures say has each packet asked for before it comes, and they
            # never learn it again (all of it dropped as late, for good).
            self._observe_transit(now, now - ts / self.clock_rate)
        self.request_missing(now)
        if ts < self._playhead < ts + samples and self._playhead not in self._packets:
            # The playhead stands inside this packet (a catch-up landed between a long packet's frames):
            # back to its start, or every packet of the stream would come a frame too late, for good.
            self._playhead = ts
        if ts < self._playhead and not self._late_for_good(now):
            self.counters.late_dropped += 1
            if self._held_by_queue(seq, repaired):
                self._note_peak(now, ts)
            return "late"
        if ts < self._playhead:
            self._resync(ts, now)
        if self._held_by_queue(seq, repaired) and (ts == self._held or self._saved_by_peak(now, ts)):
            # Waited for, or in time only for the delay a spike before it left: a spike the hold saved is a
            # spike all the same, and keeps it held.
            self._note_peak(now, ts)
        self._late_since = None
        if ts in self._packets:
            self.counters.duplicates += 1
            return "duplicate"
        self._packets[ts] = _AudioPacket(seq, ts, payload, repaired, samples)
        return "repaired" if repaired else "kept"

    def _late_for_good(self, now: float) -> bool:
        """True once every packet has come too late for ``RESYNC_AFTER`` while they came at the stream's pace
        (at least every other one): the stream runs later than the playout, whatever made it so."""
        if self._late_since is None:
            self._late_since, self._late_count = now, 0
        self._late_count += 1
        span = now - self._late_since
        return span >= RESYNC_AFTER and self._late_count >= span / self._stride_duration / 2

    def _resync(self, ts: int, now: float) -> None:
        """Play the stream as it comes now: this packet next, the starting delay after it; the figures
        keep only what came since it broke."""
        assert self._late_since is not None
        since = self._late_since
        self.counters.resyncs += 1
        transit = now - ts / self.clock_rate
        self._transits = deque(t for t in self._transits if t[0] >= since) or deque([(now, transit)])
        self._base_transit = min(t for _, t in self._transits)
        self._repairs.clear()  # measured against the old timing
        self._peaks.clear()
        self._origin = transit + self.start_delay
        self._playhead = ts
        self._last_shrink = now

    def _length_of(self, payload: bytes) -> int:
        """The packet's length in samples: a whole number of frames, else one frame."""
        if self.packet_samples is None or len(payload) <= PAUSE_PACKET_SIZE:
            return self.frame_samples
        try:
            samples = self.packet_samples(payload)
        except (ValueError, ArithmeticError):
            return self.frame_samples
        if samples <= 0 or samples % self.frame_samples or samples > self.frame_samples * 6:
            return self.frame_samples
        return samples

    @property
    def _stride_duration(self) -> float:
        return self._stride / self.clock_rate

    def _begin(self, sequence_number: int, timestamp: int, now: float, ssrc: int | None) -> None:
        if self._started:
            self.counters.resets += 1
        self._started = True
        self._ssrc = ssrc
        self._seq.accept(sequence_number)
        self._ts.accept(timestamp)
        self._playhead = timestamp
        self._highest_ts = timestamp
        self._last_arrival = now
        self._base_transit = now - timestamp / self.clock_rate
        self._origin = self._base_transit + self.start_delay
        self._new_stream = True

    def _restart(self) -> None:
        self._clear()

    # --- asking for missing packets again -----------------------------------------

    def _note_sequence(self, seq: int, ts: int, highest: int | None, now: float) -> bool:
        """Ask at once for a gap this packet reveals; True if this packet is one we asked for."""
        self._answered_after = None
        if highest is not None and (seq <= highest or seq in self._requests):
            if seq > highest:
                self._highest_ts = ts
            request = self._requests.pop(seq, None)
            first = request.first if request is not None else self._given_up.pop(seq, None)
            if first is None:
                return False
            self._learn_repair_time(now - first)
            self._answered_after = now - first
            return True
        previous_ts, self._highest_ts = self._highest_ts, ts
        if highest is None or seq == highest + 1 or self.on_missing is None:
            return False
        gap = seq - highest - 1
        wanted: list[int] = []
        # The frames of a long gap that can still play are its last few.
        for k in range(max(1, gap - int(self._ceiling / self._stride_duration) - 1), gap + 1):
            frame_ts = previous_ts + k * self._stride  # the earliest it can be
            if highest + k in self._requests:
                continue  # asked for already, when it was overdue
            if self._due(frame_ts) > now + 1e-6:
                self._requests[highest + k] = _Request(frame_ts, now, now)
                wanted.append(highest + k)
            elif self.repair_time is not None or self.round_trip_time is not None:
                # Too late to ask for; had the delay left room, a retransmission would have come by then.
                needed = now + self.round_trip_estimate - frame_ts / self.clock_rate - self._base_transit
                self._repairs.append((now, needed))
        if wanted:
            self.counters.nacked += len(wanted)
            self.on_missing([s % (1 << 16) for s in wanted])
        return False

    def request_missing(self, now: float) -> None:
        """Ask again for missing packets asked for a round trip ago, if their frames are still to play.

        ``push`` and ``pop`` do this too; call it at ``next_request_due()``
        to ask again without waiting for either.
        """
        if self._playhead is None:
            return
        for seq in [s for s, r in self._requests.items() if r.ts < self._playhead]:
            self._given_up[seq] = self._requests.pop(seq).first
        while len(self._given_up) > 256:
            del self._given_up[next(iter(self._given_up))]
        if self.on_missing is None:
            return
        self._ask_overdue(now)
        again = [seq for seq, r in self._requests.items() if self._ask_again_at(r) <= now + 1e-9]
        for seq in again:
            self._requests[seq].asks += 1
            self._requests[seq].last = now
        if again:
            self.on_missing([s % (1 << 16) for s in sorted(again)])

    def _next_overdue(self) -> tuple[int, int, float] | None:
        """The next packet not yet here nor asked for: (sequence number, timestamp, when it is overdue).

        Packets come every frame; one later than nearly all others by another
        frame is taken as lost without waiting for the packet after it, which
        on a burst would come too late. None after a pause announced, in an
        outage (nothing for longer than the delay can cover), and for a while
        after a packet asked for this way came twice (it was only late: a queue
        is filling, and asking for what is late would fill it faster).
        """
        highest = self._seq.highest
        if highest is None or self._highest_pauses or self._playhead is None:
            return None
        if self._last_arrival < self._guessing_after:
            return None
        allowance = self._late() + self._stride_duration / 2
        seq = highest + 1
        while seq in self._requests:
            seq += 1
        ts = self._highest_ts + (seq - highest) * self._stride
        if (ts - self._highest_ts) / self.clock_rate > self._ceiling:
            return None
        return seq, ts, self._base_transit + ts / self.clock_rate + allowance

    def _ask_overdue(self, now: float) -> None:
        while (overdue := self._next_overdue()) is not None and overdue[2] <= now:
            seq, ts, _ = overdue
            ahead = self._due(ts) > now + 1e-6
            self._requests[seq] = _Request(ts, now, now, asks=1 if ahead else self.max_requests)
            self._guessed.append(seq)
            if ahead:
                self.counters.nacked += 1
                self.on_missing and self.on_missing([seq % (1 << 16)])

    def next_request_due(self) -> float | None:
        """When a missing packet should next be asked for again (None: nothing to ask for)."""
        if self.on_missing is None:
            return None
        overdue = self._next_overdue()
        times = [self._ask_again_at(r) for r in self._requests.values()] + ([overdue[2]] if overdue else [])
        finite = [t for t in times if t != float("inf")]
        return min(finite) if finite else None

    def _ask_again_at(self, request: _Request) -> float:
        """A round trip (and a little) after the last request, if the frame will not have played by then."""
        if request.asks >= self.max_requests:
            return float("inf")
        when = request.last + max(1.25 * self.round_trip_estimate, self.frame_duration / 2)
        return when if when < self._due(request.ts) else float("inf")

    @property
    def round_trip_estimate(self) -> float:
        """The round-trip time given, else how long retransmissions have taken, else a guess."""
        for rtt in (self.round_trip_time, self.repair_time):
            if rtt is not None:
                return rtt
        return self.assumed_round_trip

    def _learn_repair_time(self, sample: float) -> None:
        """The repair time is the 80th percentile of the latest: a packet asked for because it was overdue
        may be the original, only late, and come sooner than any resend could. (Averaged in, such packets
        shrank the time between asks below the round trip, and the sender, which answers a packet once a
        round trip, refused the asks meant for resends that were lost.)"""
        self._repair_samples.append(sample)
        ordered = sorted(self._repair_samples)
        self.repair_time = ordered[int(0.8 * (len(ordered) - 1))]

    def _awaited(self, slot: int) -> bool:
        return any(r.ts == slot for r in self._requests.values())

    def _due(self, ts: int) -> float:
        return self._origin + ts / self.clock_rate

    def _observe_transit(self, now: float, transit: float) -> None:
        self._transits.append((now, transit))
        while self._transits and self._transits[0][0] < now - self.jitter_window:
            self._transits.popleft()
        self._base_transit = min(t for _, t in self._transits)

    # --- delay --------------------------------------------------------------------

    @property
    def delay(self) -> float:
        """How far behind the fastest packets the playout runs now, in seconds."""
        return self._origin - self._base_transit

    @property
    def target_delay(self) -> float:
        """The delay that lets all but the latest few packets play in time, with room for FEC;
        while retransmissions are filling gaps, for one of them; and while a queue fills now and
        then, for what its spikes held back."""
        return max(d for d in (self.jitter_delay, self.repair_delay, self.peak_delay) if d is not None)

    @property
    def jitter_delay(self) -> float:
        """The delay that lets all but the latest few packets play in time, with room for FEC."""
        if len(self._transits) < 2:
            return self.start_delay
        target = self._late() + self._stride_duration  # the next packet must be here too, for FEC
        if self._stride > self.frame_samples:
            target += self.frame_duration  # and a frame to spare: it is due the moment the lost one is
        if len(self._transits) < 50:  # too few packets to trust: not below the start
            target = max(target, self.start_delay)
        return min(max(target, self.min_delay), self.max_delay)

    @property
    def repair_delay(self) -> float | None:
        """The delay most retransmissions of the last ``repair_window`` needed, with a little to spare.

        None when fewer than two came in that time: the link is clean, or
        nobody answers. The retransmissions that came too late count too:
        they show how much more delay would have saved their frames.
        """
        if len(self._repairs) < 2:
            return None
        needed = sorted(delay for _, delay in self._repairs)
        late = needed[int(self.repair_quantile * (len(needed) - 1))]
        return min(max(late + self.frame_duration, self.min_delay), self.repair_ceiling)

    @property
    def repair_ceiling(self) -> float:
        """The most delay given to repairs: ``max_repair_delay`` for a stream of one frame a packet, and more
        for longer packets, which show a loss that much later: a lost packet shows when the next one comes,
        a lost pair (the second carried the first one's FEC) when the third does. (Beside a photo's upload,
        with 60 ms packets and the upload's queue, repairs came 150-300 ms after their packet would have, and
        at 250 ms most of those that were to save a lost pair came too late.)"""
        return self.max_repair_delay + 2 * (self._stride - self.frame_samples) / self.clock_rate

    @property
    def _ceiling(self) -> float:
        """The most delay the playout takes for any reason."""
        return max(self.max_delay, self.repair_ceiling)

    def _late(self) -> float:
        """How much later than the fastest nearly all packets come."""
        if not self._transits:
            return 0.0
        excess = sorted(t - self._base_transit for _, t in self._transits)
        return excess[int(self.jitter_quantile * (len(excess) - 1))]

    def _held_by_queue(self, seq: int, repaired: bool) -> bool:
        """Whether the packet being taken in was late from a queue: not asked for, or asked for as overdue and
        here sooner than a resend could be (not a resend that came slowly, which the repair delay answers)."""
        return not repaired or (seq in self._guessed and self._answered_after is not None
                                and self._answered_after < (self.round_trip_time or self.assumed_round_trip))

    def _saved_by_peak(self, now: float, ts: int) -> bool:
        """Whether a packet of media time ``ts`` in time now would have been late but for the held spike."""
        return self.peak_delay is not None and self._needed(now, ts) > self.jitter_delay

    def _needed(self, now: float, ts: int) -> float:
        """The delay that plays a packet of media time ``ts`` here at ``now``, with room for FEC."""
        return now - ts / self.clock_rate - self._base_transit + self._stride_duration

    def _note_peak(self, now: float, ts: int) -> None:
        """A packet of media time ``ts`` held back by a queue: the delay that would have played it, with room
        for FEC, as one spike's (merged with the last if that was less than ``PEAK_MERGE`` seconds ago)."""
        needed = self._needed(now, ts)
        if self._peaks and now - self._peaks[-1][0] < PEAK_MERGE:
            needed = max(needed, self._peaks.pop()[1])
        self._peaks.append((now, needed))

    @property
    def peak_delay(self) -> float | None:
        """The delay the late packets of the recent queue spikes needed, and a frame more (None unless
        ``PEAKS_TO_HOLD`` of them came within ``PEAK_MEMORY`` seconds of the newest packet)."""
        while self._peaks and self._peaks[0][0] < self._last_arrival - PEAK_MEMORY:
            self._peaks.popleft()
        if len(self._peaks) < PEAKS_TO_HOLD:
            return None
        return min(max(needed for _, needed in self._peaks) + self.frame_duration, self.max_delay)

    def _forget_old_repairs(self, now: float) -> None:
        while self._repairs and self._repairs[0][0] < now - self.repair_window:
            self._repairs.popleft()

    def next_due(self) -> float | None:
        """When the next frame should play (None before the first packet)."""
        if self._playhead is None:
            return None
        return self._origin + self._playhead / self.clock_rate

    # --- frames out ---------------------------------------------------------------

    def pop(self, now: float) -> PlayoutFrame | None:
        """The frame to play at ``now``; None when none is due yet."""
        due = self.next_due()
        if due is None or self._playhead is None or now < due:
            return None
        if now - due > self.catch_up_after:
            self._catch_up(now - due)
        self._forget_old_repairs(now)
        self.request_missing(now)
        slot = self._playhead
        frame = self.frame_samples
        packet = self._packets.pop(slot, None)
        shrink = packet is not None and self._should_shrink(now) and slot + packet.samples in self._packets
        far_too_late = self.delay > self._ceiling + self.frame_duration
        # A player that can shorten a frame plays this one shorter by whole periods of its sound: nothing of it
        # is passed over, and the delay comes down all the same (unless it is far too late: then at once).
        shorten = shrink and self.can_stretch and not far_too_late
        if packet is not None and shrink and not shorten and (packet.samples == frame or far_too_late):
            # Passing over a packet of several frames is heard: the delay waits for short ones to shrink.
            self.counters.skipped += packet.samples // frame
            self._last_shrink = now
            self._origin -= packet.samples / self.clock_rate
            self._playhead = slot = slot + packet.samples
            self._reference = packet
            packet = self._packets.pop(slot)
        if packet is not None:
            self.counters.played += 1
            self.counters.recovered_retransmission += packet.repaired
            self._reference = packet
            if shorten:
                self.counters.shortened += 1
                self._last_shrink = now
                return self._out("shorten", packet.payload, slot, packet.samples)
            if self._should_stretch(now):
                self.counters.stretched += 1
                self._last_stretch = now
                return self._out("stretch", packet.payload, slot, packet.samples)
            return self._out("packet", packet.payload, slot, packet.samples)
        following = self._following(slot)
        reference = self._reference
        paused = reference is not None and (
            len(reference.payload) <= PAUSE_PACKET_SIZE if following is None else following.seq == reference.seq + 1)
        if paused:
            self.counters.silent += 1  # the sender paused (DTX): nothing is missing
            return self._out("silence", None, slot, frame)
        # The lost packet is as long as the stream's packets are now, up to the next one that is here.
        missing = self._stride if following is None else max(frame, min(self._stride, following.ts - slot))
        after = self._packets.get(slot + missing)
        if after is not None and self.can_recover(after.payload):
            self.counters.recovered_fec += 1
            return self._out("fec", after.payload, slot, missing)
        self.counters.concealed += 1
        if (following is None or self._awaited(slot)) and self.delay < self.target_delay - 1e-9:
            # Nothing newer has come, so the packet is more likely late than lost, or it has
            # been asked for again; and the delay is below target. Play this slot one frame later.
            self._origin += self.frame_duration
            self._held = slot
            return self._out("conceal", None, slot, 0)
        return self._out("conceal", None, slot, missing)

    def _out(self, source: FrameSource, payload: bytes | None, slot: int, advance: int) -> PlayoutFrame:
        """What to play at ``slot``; the playhead moves ``advance`` samples on (0: this slot plays again)."""
        assert self._playhead is not None
        self._playhead += advance
        new_stream, self._new_stream = self._new_stream, False
        return PlayoutFrame(source, payload, slot % (1 << 32), new_stream, advance or self.frame_samples)

    def _following(self, slot: int) -> _AudioPacket | None:
        later = [ts for ts in self._packets if ts > slot]
        return self._packets[min(later)] if later else None

    def _should_stretch(self, now: float) -> bool:
        if not self.can_stretch or self.delay >= self.target_delay - self.frame_duration / 2:
            return False
        return self._last_stretch is None or now - self._last_stretch >= self.stretch_interval

    def resized(self, seconds: float) -> None:
        """The player made the "stretch" or "shorten" frame it was given ``seconds`` longer (shorter, if
        negative): what follows plays that much later (sooner), and the delay is that much more (less)."""
        if abs(seconds) > self.max_delay:
            raise ValueError(f"a frame resized by {seconds:.3f} s: more than the playout's whole delay")
        self._origin += seconds

    def _should_shrink(self, now: float) -> bool:
        if self.delay > self._ceiling + self.frame_duration:
            return True  # far too late, however the jitter looks: no waiting between steps
        excess = self.delay - self.target_delay
        if excess < self.frame_duration - 1e-9:
            return False
        return self._last_shrink is None or now - self._last_shrink >= self.shrink_interval

    def _catch_up(self, lag: float) -> None:
        """The reader fell behind: jump to the frame due now (at a packet's edge), dropping what is past."""
        assert self._playhead is not None
        frames = int(lag / self.frame_duration)
        off_edge = (self._playhead + frames * self.frame_samples - self._highest_ts) % self._stride
        frames = max(0, frames - off_edge // self.frame_samples)
        self._playhead += frames * self.frame_samples
        self.counters.skipped += frames
        for ts in [ts for ts in self._packets if ts < self._playhead]:
            del self._packets[ts]


# --- video -------------------------------------------------------------------------


@dataclass(frozen=True)
class AssembledFrame:
    """One whole VP8 frame, ready for a decoder."""

    timestamp: int  # RTP timestamp, as sent
    data: bytes  # the VP8 bitstream, payload descriptors stripped
    keyframe: bool
    first_seq: int  # RTP sequence numbers, as sent
    last_seq: int
    completed_at: float  # when its last packet arrived


@dataclass
class AssemblyCounters:
    frames_complete: int = 0  # frames handed on for decoding
    frames_dropped: int = 0  # frames given up for a hole, or of no use until the next keyframe
    keyframes_requested: int = 0
    late_packets: int = 0  # packets for frames already handed on or given up
    duplicates: int = 0
    malformed: int = 0
    resets: int = 0
    asked_again: int = 0  # holes asked for again after aiortc's first NACK (each ask counted)
    echoes: int = 0  # holes whose first ask was sent once more, ECHO_GAP after it


@dataclass
class _PendingFrame:
    ts: int
    parts: dict[int, bytes]
    first_seq: int | None = None
    last_seq: int | None = None
    keyframe: bool = False
    non_reference: bool = False
    completed_at: float = 0.0

    @property
    def complete(self) -> bool:
        return (self.first_seq is not None and self.last_seq is not None
                and len(self.parts) == self.last_seq - self.first_seq + 1
                and min(self.parts) == self.first_seq and max(self.parts) == self.last_seq)


class VideoFrameAssembler:
    """Reassembles one VP8 RTP stream into whole frames and decides which are decodable.

    ``push`` each packet (payload with its VP8 payload descriptor) as it
    arrives and ``poll`` at ``next_deadline()``; both return the frames now
    ready, oldest first. A frame is handed on only if the decoder can use it:
    after a loss, nothing until the next keyframe. ``on_keyframe_needed`` is
    called when a keyframe is needed, and again at each frame that cannot be
    used until one comes, at most once per ``keyframe_ask_interval``.
    """

    def __init__(
        self,
        on_keyframe_needed: Callable[[], None] | None = None,
        *,
        on_missing: Callable[[list[int]], None] | None = None,
        max_requests: int = 3,
        min_hold: float = 0.1,
        max_hold: float = 0.8,
        keyframe_interval: float | None = None,
        max_pending_packets: int = 4000,
    ) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.on_keyframe_needed = on_keyframe_needed
        # Called with sequence numbers to ask for again (aiortc's NACK asks once, when a hole appears).
        self.on_missing = on_missing
        self.max_requests = max_requests
        self.min_hold = min_hold
        self.max_hold = max_hold
        self.keyframe_interval = keyframe_interval  # (None: two round trips, see keyframe_ask_interval)
        self.max_pending_packets = max_pending_packets
        self.round_trip_time: float | None = None  # seconds; set it when known
        self.repair_time: float | None = None  # smoothed time from noticing a hole to its packet arriving
        self.repaired_at: float | None = None  # when a hole was last filled
        self.hole_at: float | None = None  # when a hole was last found
        self.counters = AssemblyCounters()
        self._started = False
        self._last_request: float | None = None
        self._clear()

    def _clear(self) -> None:
        self._ssrc: int | None = None
        self._seq = _Unwrapper(16)
        self._ts = _Unwrapper(32)
        self._frames: dict[int, _PendingFrame] = {}  # by extended timestamp
        self._missing: dict[int, float] = {}  # extended seq -> when we knew it was missing, in seq order
        self._asked: dict[int, tuple[float, int]] = {}  # extended seq -> (when last asked, how often)
        self._echoed: set[int] = set()  # holes whose first ask has been sent again
        self._given_up: dict[int, float] = {}  # the same, for holes no longer waited for
        self._fillers: set[int] = set()  # sequence numbers of padding-only packets not yet passed
        self._expected: int | None = None  # first sequence number of the next frame to hand on
        self._last_ts: int | None = None  # timestamp of the last frame handed on or given up
        self._waiting_for_keyframe = True
        self._pending_packets = 0
        self._strays: list[tuple[int, int, bool, bytes, float, int | None]] = []

    @property
    def hold(self) -> float:
        """How long a frame with a hole waits for a retransmission, within bounds: two round
        trips, or, when this assembler asks again itself, until its last ask has had its time.

        Without a round-trip time from outside, the time retransmissions have
        taken to fill holes stands in for it.
        """
        if self.on_missing is not None:
            wait = self.ask_interval * (self.max_requests + 0.25)
        else:
            rtt = self.round_trip_time if self.round_trip_time is not None else self.repair_time
            wait = 2 * (rtt or 0.0)
        return min(max(wait, self.min_hold), self.max_hold)

    @property
    def ask_interval(self) -> float:
        """Time between asks for the same packet: a little more than a repair takes (a sender
        answers each packet once per round trip)."""
        rtt = self.round_trip_time if self.round_trip_time is not None else self.repair_time
        return max(1.25 * (rtt if rtt is not None else 0.1), 0.04)

    @property
    def keyframe_ask_interval(self) -> float:
        """Time between keyframe requests: ``keyframe_interval`` if set, else two round trips (or
        repairs, before a round-trip time is known) within KEYFRAME_ASK_MIN and KEYFRAME_ASK_MAX."""
        if self.keyframe_interval is not None:
            return self.keyframe_interval
        rtt = self.round_trip_time if self.round_trip_time is not None else self.repair_time
        return min(max(2 * (rtt or 0.0), KEYFRAME_ASK_MIN), KEYFRAME_ASK_MAX)

    @property
    def waiting_for_keyframe(self) -> bool:
        return self._waiting_for_keyframe

    # --- packets in ---------------------------------------------------------------

    def push(self, sequence_number: int, timestamp: int, marker: bool, payload: bytes, now: float,
             ssrc: int | None = None) -> list[AssembledFrame]:
        if ssrc is not None and self._ssrc is not None and ssrc != self._ssrc:
            self._restart()
        if self._ssrc is None:
            self._ssrc = ssrc
        seq = self._seq.extend(sequence_number)
        highest = self._seq.highest
        if highest is not None and abs(seq - highest) > 3000:
            self._strays.append((sequence_number, timestamp, marker, payload, now, ssrc))
            if len(self._strays) < STRAYS_BEFORE_RESYNC:
                return self.poll(now)
            strays = self._strays
            self._restart()
            out: list[AssembledFrame] = []
            for stray in strays:
                out += self.push(*stray)
            return out
        if self._strays:
            self.counters.late_packets += len(self._strays)
            self._strays = []
        ts = self._ts.extend(timestamp)
        self._note_sequence(seq, now)
        if self._expected is not None and seq < self._expected:
            self.counters.late_packets += 1
            given_up = self._given_up.pop(seq, None)
            if given_up is not None and now - given_up <= self.max_hold:
                # (Later than that, it answers one of the asks aiortc repeats for every hole it still
                # tracks, at each new gap, for a second or two: no measure of a repair.)
                self._learn_repair_time(now - given_up)
        elif not payload:
            self._fillers.add(seq)  # padding only: takes a sequence number, belongs to no frame
        elif self._last_ts is not None and ts <= self._last_ts:
            self.counters.late_packets += 1
        else:
            self._add(seq, ts, marker, payload, now)
        return self.poll(now)

    def _note_sequence(self, seq: int, now: float) -> None:
        highest = self._seq.highest
        if highest is None or seq > highest:
            start = seq if highest is None else highest + 1
            for missing in range(start, seq):
                self._missing[missing] = now
                self.hole_at = now
            if highest is None and self.hole_at is None:
                self.hole_at = now  # until a while passes without one, a new stream may lose packets
            self._seq.accept(seq)
        elif seq in self._missing:
            self._learn_repair_time(now - self._missing.pop(seq))
            self._asked.pop(seq, None)
            self._echoed.discard(seq)
            self.repaired_at = now
        elif self._expected is None or seq >= self._expected:
            self.counters.duplicates += 1

    def _add(self, seq: int, ts: int, marker: bool, payload: bytes, now: float) -> None:
        try:
            descriptor = parse_descriptor(payload)
        except ValueError:
            self.counters.malformed += 1
            self._missing[seq] = now  # as good as lost
            self._missing = dict(sorted(self._missing.items()))  # kept in sequence order
            return
        self._ts.accept(ts)
        frame = self._frames.get(ts)
        if frame is None:
            frame = self._frames[ts] = _PendingFrame(ts, {})
        if seq in frame.parts:
            return
        data = payload[descriptor.size:]
        frame.parts[seq] = data
        self._pending_packets += 1
        if descriptor.starts_frame:
            frame.first_seq = seq
            frame.keyframe = is_keyframe_data(data)
        if marker:
            frame.last_seq = seq
        frame.non_reference = frame.non_reference or descriptor.non_reference
        frame.completed_at = now

    def _restart(self) -> None:
        self.counters.resets += 1
        self._clear()

    # --- frames out ---------------------------------------------------------------

    def poll(self, now: float) -> list[AssembledFrame]:
        """Frames that became ready, or decisions that fell due, by ``now``."""
        out: list[AssembledFrame] = []
        while self._frames:
            self._forget_before_expected()
            if self._expected is None and not self._resync():
                break
            head = self._frames[min(self._frames)]
            if head.complete and head.first_seq == self._expected:
                self._hand_on(head, out, now)
                continue
            keyframe = self._complete_keyframe()
            if keyframe is not None:
                self._give_up_before(keyframe, now)
                continue
            deadline = self.next_deadline()
            overfull = self._pending_packets > self.max_pending_packets
            if deadline is not None and now >= deadline or overfull:
                self._give_up_head(now)
                continue
            break
        return out

    def next_deadline(self) -> float | None:
        """When the oldest hole will have waited long enough (None: no hole)."""
        self._forget_before_expected()
        if self._expected is None or not self._missing or not self._frames:
            return None
        return next(iter(self._missing.values())) + self.hold

    def next_request_due(self) -> float | None:
        """When a hole is next to be asked for again (None: nothing to ask)."""
        if self.on_missing is None:
            return None
        self._forget_before_expected()
        interval = self.ask_interval
        due = [self._asked.get(seq, (noticed, 1))[0] + interval for seq, noticed in self._missing.items()
               if self._asked.get(seq, (noticed, 1))[1] < self.max_requests]
        due += [noticed + ECHO_GAP for seq, noticed in self._missing.items() if seq not in self._echoed]
        return min(due) if due else None

    def request_missing(self, now: float) -> None:
        """Ask again for the holes whose turn has come (aiortc's NACK was the first ask, and is echoed)."""
        due_at = self.next_request_due()
        if due_at is None or due_at > now + 1e-9 or self.on_missing is None:
            return
        interval, again, echoes = self.ask_interval, [], []
        for seq, noticed in self._missing.items():
            last, asks = self._asked.get(seq, (noticed, 1))
            if asks < self.max_requests and last + interval <= now + 1e-9:
                self._asked[seq] = (now, asks + 1)
                self._echoed.add(seq)  # (the ask again stands for the echo)
                again.append(seq % (1 << 16))
            elif seq not in self._echoed and noticed + ECHO_GAP <= now + 1e-9:
                self._echoed.add(seq)
                echoes.append(seq % (1 << 16))
        if again or echoes:
            self.counters.asked_again += len(again)
            self.counters.echoes += len(echoes)
            self.on_missing(again + echoes)

    def decode_failed(self, now: float) -> None:
        """The decoder refused a frame: decode nothing more until a keyframe, and ask for one."""
        self._waiting_for_keyframe = True
        self._request_keyframe(now)

    def _hand_on(self, frame: _PendingFrame, out: list[AssembledFrame], now: float) -> None:
        self._remove(frame)
        assert frame.first_seq is not None and frame.last_seq is not None
        self._expected = frame.last_seq + 1
        self._last_ts = frame.ts
        if self._waiting_for_keyframe and not frame.keyframe:
            self.counters.frames_dropped += 1
            self._request_keyframe(now)
            return
        self._waiting_for_keyframe = False
        self.counters.frames_complete += 1
        data = b"".join(frame.parts[s] for s in range(frame.first_seq, frame.last_seq + 1))
        out.append(AssembledFrame(
            timestamp=frame.ts % (1 << 32),
            data=data,
            keyframe=frame.keyframe,
            first_seq=frame.first_seq % (1 << 16),
            last_seq=frame.last_seq % (1 << 16),
            completed_at=frame.completed_at,
        ))

    def _resync(self) -> bool:
        """Start at the oldest frame whose first packet we have (on joining, or after a loss)."""
        starts = [f for f in self._frames.values() if f.first_seq is not None]
        if not starts:
            return False
        first = min(starts, key=lambda f: f.ts)
        for frame in [f for f in self._frames.values() if f.ts < first.ts]:
            self._remove(frame)
            if self._started:
                self.counters.frames_dropped += 1
        self._started = True
        self._expected = first.first_seq
        return True

    def _complete_keyframe(self) -> _PendingFrame | None:
        keyframes = [f for f in self._frames.values() if f.keyframe and f.complete]
        return min(keyframes, key=lambda f: f.ts) if keyframes else None

    def _give_up_before(self, keyframe: _PendingFrame, now: float) -> None:
        """A whole keyframe is here: whatever is missing before it no longer matters."""
        older = [f for f in self._frames.values() if f.ts < keyframe.ts]
        for frame in older:
            self._remove(frame)
            self._last_ts = frame.ts
        self.counters.frames_dropped += max(1, len(older))
        self._expected = keyframe.first_seq

    def _give_up_head(self, now: float) -> None:
        """The oldest hole waited long enough: drop everything up to the next frame start after it."""
        assert self._expected is not None
        hole = next(iter(self._missing), self._expected)
        after = [f for f in self._frames.values() if f.first_seq is not None and f.first_seq > hole]
        resume = min(after, key=lambda f: f.ts) if after else None
        lost = [f for f in self._frames.values() if resume is None or f.ts < resume.ts]
        harmless = (resume is not None and bool(lost) and all(f.non_reference for f in lost)
                    and min(lost, key=lambda f: f.ts).first_seq == self._expected)
        for frame in lost:
            self._remove(frame)
            self._last_ts = frame.ts
        self.counters.frames_dropped += max(1, len(lost))
        if resume is None:
            self._expected = None
            self._give_up_holes(self._missing)
        else:
            self._expected = resume.first_seq
        if not harmless:
            self._waiting_for_keyframe = True
            self._request_keyframe(now)

    def _remove(self, frame: _PendingFrame) -> None:
        del self._frames[frame.ts]
        self._pending_packets -= len(frame.parts)

    def _forget_before_expected(self) -> None:
        if self._expected is None:
            return
        while self._expected in self._fillers:
            self._fillers.discard(self._expected)
            self._expected += 1
        if self._fillers:
            self._fillers = {seq for seq in self._fillers if seq > self._expected}
        passed = {}
        while self._missing:
            seq = next(iter(self._missing))
            if seq >= self._expected:
                break
            passed[seq] = self._missing.pop(seq)
        self._give_up_holes(passed)

    def _give_up_holes(self, holes: dict[int, float]) -> None:
        """Remember when holes were found, so a retransmission that comes too late still teaches the hold."""
        self._given_up.update(holes)
        for seq in holes:
            self._asked.pop(seq, None)
            self._echoed.discard(seq)
        if holes is self._missing:
            self._missing = {}
        while len(self._given_up) > 512:
            del self._given_up[next(iter(self._given_up))]

    def _learn_repair_time(self, sample: float) -> None:
        self.repair_time = sample if self.repair_time is None else self.repair_time + (sample - self.repair_time) / 8

    def repair_delay(self, now: float) -> float:
        """How late a frame with a repaired hole comes, on a link where holes have been found or
        repaired lately (0 otherwise): the least delay its playout should have (a guess before the
        first repair). Learning it from the frames alone takes as many repaired frames as the
        delay's quantile leaves out, and each one before shows the picture still for a repair's time;
        waiting for the first repair to set it shows the picture still for that one."""
        last = max((t for t in (self.repaired_at, self.hole_at) if t is not None), default=None)
        if last is None or now - last > REPAIR_MEMORY:
            return 0.0
        repair = self.repair_time if self.repair_time is not None else ASSUMED_REPAIR
        return repair * REPAIR_ROOM

    def _request_keyframe(self, now: float) -> None:
        if any(f.keyframe for f in self._frames.values()):
            return  # one is on its way
        if self._last_request is not None and now - self._last_request < self.keyframe_ask_interval:
            return
        self._last_request = now
        self.counters.keyframes_requested += 1
        if self.on_keyframe_needed is not None:
            self.on_keyframe_needed()


class VideoPlayout:
    """When each whole frame is to be shown: on its RTP clock, a target delay behind the fastest frames.

    ``schedule(timestamp, completed_at, floor)`` gives the local time at which the
    frame is due (never earlier than the frame before it). A frame's lateness
    is how much longer than the fastest frame of the last ``window`` seconds
    it took to complete; the target delay is the ``quantile`` of those, so it
    grows at once to cover what most frames need (a retransmission, on a lossy
    link) and shrinks by at most ``shrink_step`` per frame when they need less.
    The window is long so that the frames of a rare outage, which complete all
    at once when it ends, do not hold every later frame back.
    A jump in timestamps (a new stream) starts the clock again. ``floor``: a
    delay known to be needed beforehand (what a repair takes, on a link whose
    holes are being repaired), taken at the first frame and then grown into by
    at most ``grow_step`` a frame (the picture slows a little instead of standing
    still); one frame interval is added to it, as a hole in a frame's last
    packet shows only when the next frame starts.
    """

    def __init__(self, clock_rate: int = 90000, *, window: float = 30.0, quantile: float = 0.95,
                 max_delay: float = 0.5, shrink_step: float = 0.004, grow_step: float = 0.02) -> None:
        if not 0 < quantile <= 1:
            raise ValueError("quantile must be in (0, 1]")
        self.clock_rate = clock_rate
        self.window = window
        self.quantile = quantile
        self.max_delay = max_delay
        self.shrink_step = shrink_step
        self.grow_step = grow_step
        self.delay = 0.0  # the current target delay, seconds
        self._ts = _Unwrapper(32)
        self._transits: deque[tuple[float, float]] = deque()  # (completed at, completed at - media time)
        self._last_due: float | None = None
        self._last_media: float | None = None
        self._intervals: deque[float] = deque(maxlen=15)  # between the latest frames' media times

    @property
    def frame_interval(self) -> float:
        """The usual time between frames (the median of the latest), 0 before two frames."""
        if not self._intervals:
            return 0.0
        return sorted(self._intervals)[len(self._intervals) // 2]

    def schedule(self, timestamp: int, completed_at: float, floor: float = 0.0) -> float:
        media = self._ts.extend(timestamp) / self.clock_rate
        if self._last_media is not None and abs(media - self._last_media) > 5.0:
            self._restart(timestamp)
            media = self._ts.extend(timestamp) / self.clock_rate
        self._ts.accept(self._ts.extend(timestamp))
        if self._last_media is not None and 0 < media - self._last_media < 1.0:
            self._intervals.append(media - self._last_media)
        self._last_media = media
        if floor > 0:
            floor += self.frame_interval
        transit = completed_at - media
        self._transits.append((completed_at, transit))
        while self._transits[0][0] < completed_at - self.window:
            self._transits.popleft()
        transits = sorted(t for _, t in self._transits)
        base = transits[0]
        late = min(transits[min(int(self.quantile * len(transits)), len(transits) - 1)] - base, self.max_delay)
        wanted = min(max(late, floor), self.max_delay)
        if wanted < self.delay:
            self.delay = max(wanted, self.delay - self.shrink_step)
        elif self._last_due is None or wanted <= late:
            self.delay = wanted
        else:  # room made ahead of need: a little per frame, so the picture slows instead of standing still
            self.delay = max(late, min(wanted, self.delay + self.grow_step))
        due = base + media + self.delay
        if self._last_due is not None:
            due = max(due, self._last_due)
        self._last_due = due
        return due

    def _restart(self, timestamp: int) -> None:
        self._ts = _Unwrapper(32)
        self._ts.accept(self._ts.extend(timestamp))
        self._transits.clear()
        self._intervals.clear()
        self._last_due = None
        self.delay = 0.0
