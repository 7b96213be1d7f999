"""Forwarding: one published track in, the same packets out to each subscriber.

Nothing here decodes. A ``Publication`` is one publisher's audio or video
track; each ``Subscription`` is that track on one subscriber's peer
connection. Packets keep their payload and marker bit; only SSRC, payload type,
sequence number and timestamp are rewritten per subscriber.

With adaptation on, a published video also has a quality ladder
(``mediaserver/ladder.py``): lower layers made on the server. Each subscriber
is on one *level* — a layer, or the original (the highest level) — or paused.
A move to another level waits for that level's keyframe, so no one ever sees a
broken picture; until it comes, the old level keeps flowing.

Why packets and not frames: forwarding at the packet level never waits for a
frame to be complete, so loss on one subscriber's link costs only that
subscriber a retransmission from our cache, and loss on the publisher's link is
repaired by aiortc's NACKs upstream with the retransmission forwarded as soon as
it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .aiortc_adapter import InboundTap, OutboundPort, RtcpFeedback, RtpPacket, SendFailed, direct_send
from .forwarding_delay import DelayHistogram
from .keyframes import KeyframeThrottle
from .ladder import PAUSED, SOURCE_HEADROOM, Ladder, LayerChooser
from .loop_lag import NEVER_BUSY, LoopLag
from .pacer import VideoPacer
from .packet_cache import RtpPacketCache
from .rates import RateMeter
from .rewriter import StreamRewriter, seq_newer
from .vp8 import is_keyframe_start, keyframe_size

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

CLOCK_RATES = {"audio": 48000, "video": 90000}
# How often one missing packet may be asked for again upstream.
UPSTREAM_NACK_INTERVAL = 0.1
ASK_FORGOTTEN = 2.0  # seconds after which an ask upstream is forgotten
# How often the publisher is told its rate cap (REMB), in seconds.
REMB_INTERVAL = 1.0
MIME_TYPES = {"audio": "audio/opus", "video": "video/VP8"}
# How often each subscriber's level is decided, in seconds.
DECISION_INTERVAL = 0.25
# How long a move to another level waits for its keyframe before asking again.
KEYFRAME_WAIT = 1.0
# A paused subscriber's trial of the lowest layer lasts this long, whatever the probe that started it: a
# probe with per-packet feedback is over in a fraction of a second, before the layer has even started
# (and while paused there was nothing to pad it with), so the layer's own packets must be the measure.
TRIAL_TIME = 2.0
# A probe's padding goes on a clock of its own, not behind each packet: behind the lowest layer's packets
# (40 kbit/s, eight frames a second) it could not reach 0.7 Mbit/s, and after a link came back the climb waited
# on clusters that fell short. It falls behind by at most this many seconds before it drops what it missed
# (a busy loop must not send them in one burst), and waits this long for a packet to repeat.
PADDING_CATCH_UP = 0.02
PADDING_TICK = 0.005
PADDING_LONGEST = 1.0  # seconds a padder runs at most (a cluster lasts 0.6 s at most)
# A duplicate repeats the latest packet sent of at least this many bytes (fewer, larger duplicates make the
# same rate), or a smaller one if no such packet went within PADDING_FRESH seconds.
PADDING_LARGE = 600
PADDING_FRESH = 0.5
# A publisher sending at least this share of its cap is held back by it. (An encoder allowed
# more takes seconds to use it: when the cap rises step by step, it runs some way below. Nära's
# encoder aims at 0.9 of its cap and libvpx a little under that: at 0.8 a held kit read as free
# as often as not, and the probes stopped asking for more.)
CAP_HELD = 0.7
# ... of the lowest cap it was told in this many seconds: an encoder given more takes a second or two to
# use it (and the rate meter, smoothed over 1.7 s, as long again to show it), and until then it is still held
# by the cap it had. (At 2 s, a kit following its cap up from 0.3 to 1.8 Mbit/s read as free for seconds, and
# the probes that would have lifted its cap stopped.)
CAP_SETTLE = 3.0
# A cap that would rise this much is told at once, not at the next REMB_INTERVAL: the publisher's encoder
# is the slowest link of the chain after a subscriber's link has proven more.
CAP_RISE_AT_ONCE = 1.2
# A cap that would fall by more than a third is told at once too: when the link of the subscriber it follows
# drops (from 2 Mbit/s to 300 kbit/s, say), until the publisher is told, the original it still sends floods that
# link while its subscriber waits for a layer's keyframe.
CAP_FALL_AT_ONCE = 1.5
# For the subscriber the publisher's cap follows, an original this far over its budget counts as fitting.
SOURCE_FOLLOWS = 1.3
# aiortc's estimate of the publisher's uplink (its REMB, kept by aiortc_adapter.InboundTap) grows 8 % a second and
# never past 1.5 times what arrives: as a ceiling it held the cap, and so the whole way back up after a subscriber's
# link recovered, to that pace (250 kbit/s to 1.6 Mbit/s in 25 s). It is a ceiling while it says the uplink is
# congested: it fell under what arrives (aiortc cuts it to 0.85 times that on overuse) within UPLINK_CALM seconds.
# Otherwise the cap may also reach UPLINK_STEP times what the publisher sends: on an uplink that cannot take that,
# the estimate falls within a round trip or two, and is the ceiling again. (What it sends as its last half second
# shows it, when that is more than the smoothed rate: an encoder given more uses it within half a second, and with
# each step waiting on the smoothing, a kit capped at 150 kbit/s took 5 s to send 1.2 Mbit/s again.)
UPLINK_CALM = 10.0
UPLINK_STEP = 3.0
UPLINK_FALL = 0.95  # an estimate under this share of the last one seen fell
# Seconds over which a receiver's asks are weighed against what was sent to it.
ASK_MEMORY = 0.5
# An audio receiver asking for more than this share of its packets is hearing a queue, not losses.
AUDIO_LATE_SHARE = 0.5
# Seconds by which an ask may come sooner than the link's measured transit and still be for a lost packet.
ANSWER_SLACK = 0.02
RESEND_BUCKET_MIN = 1500  # bytes the resend bucket holds at the least: one full packet
# A video ask for a packet asked for this shortly before counts as no new loss: the echo of Nära's receive path
# (mediaserver/receive.py ECHO_GAP), or aiortc's repeat of every hole it still tracks when a new one shows
# (counted in full, loss5 froze 1.66 % of the time against 0.66 %: docs/benchmarks.md, issue 5). Its resend
# is decided as any (ResendLimit.allow: at most one a round trip).
ECHO_WINDOW = 0.08
# On a link that loses this share of packets of its own, each video resend goes twice, RESEND_COPY_GAP apart:
# there a resend is lost as often as any packet, and the next ask comes a repair's time later, after the
# frame's turn. At 5 % loss that was most of the freezes left (docs/benchmarks.md, issue 5, "A lost ask").
# The copies cost the loss rate again in resends; on a link that only overflows, none go.
RESEND_TWICE_ABOVE = 0.02
RESEND_COPY_GAP = 0.02  # (apart, so that a burst of loss seldom takes both)


@dataclass
class ResendLimit:
    """Which NACKed packets to send again.

    A receiver behind a congested link NACKs everything the queue dropped, and
    again each time its NACK goes unanswered; answering all of it would send
    several times the stream's own rate into the very queue that dropped it.
    So each packet is resent at most once per round trip, and retransmissions
    together stay within a share of the stream's rate (a token bucket).

    Receivers that play audio on time also ask for packets that are merely
    late; on a link whose queue is filling, resending them would fill it
    faster. So a packet asked for sooner after it was first sent than the link
    now takes to answer (``transit``: its lowest round trip plus the queue it
    shows) is not resent: it is most likely still in that queue. And when a
    receiver asks for more than ``late_share`` of what was sent to it lately
    (half its audio, say), it is seeing a queue rather than losses, and nothing
    is resent until it asks for less.
    """

    share: float = 0.5
    floor: float = 40_000.0  # bit/s: what retransmissions may always use
    burst: float = 0.25  # seconds of that rate that may go at once
    tokens: float = 0.0  # bytes
    last: float | None = None
    sent_at: dict[int, float] = field(default_factory=dict)  # resends
    # When each of the last 1024 packets first went, by seq % 1024, as two columns of plain numbers: as a
    # tuple per packet, every copy forwarded made an object the garbage collector tracks that lived for
    # seconds, and each young pass walked thousands of them (docs/benchmarks.md, issue 9).
    first_seqs: array[int] = field(default_factory=lambda: array("q", [-1]) * 1024)
    first_times: array[float] = field(default_factory=lambda: array("d", [0.0]) * 1024)
    late_share: float | None = None
    asks: float = 0.0  # packets asked for lately, and sent for the first time (each decaying over ASK_MEMORY)
    sends: float = 0.0
    counted_at: float | None = None
    asked: deque[int] = field(default_factory=lambda: deque(maxlen=128))  # (a packet asked for again counts once)
    asked_at: dict[int, float] = field(default_factory=dict)  # video: when each packet was last asked for

    def new_asks(self, seqs: list[int], now: float) -> int:
        """How many of ``seqs`` (a video NACK) are asked for anew: not within ECHO_WINDOW of the last ask."""
        asked_at = self.asked_at
        if len(asked_at) > 512:
            self.asked_at = asked_at = {seq: t for seq, t in asked_at.items() if now - t < ECHO_WINDOW}
        fresh = 0
        for seq in seqs:
            last = asked_at.get(seq)
            if last is None or now - last >= ECHO_WINDOW:
                fresh += 1
            asked_at[seq] = now
        return fresh

    def sent(self, seq: int, now: float) -> None:
        """A packet went out for the first time (once per packet per subscriber: kept cheap)."""
        self.first_seqs[seq & 1023] = seq
        self.first_times[seq & 1023] = now
        if self.late_share is not None:  # (only the share of asks needs the sends counted)
            self._decay(now)
            self.sends += 1

    def _decay(self, now: float) -> None:
        if self.counted_at is not None and now > self.counted_at:
            kept = math.exp(-(now - self.counted_at) / ASK_MEMORY)
            self.asks, self.sends = self.asks * kept, self.sends * kept
        self.counted_at = now

    def on_its_way(self, seq: int, now: float, transit: float | None) -> bool:
        # (An ask for a hole the next packet showed comes a round trip after the packet went: on a link
        # without a queue, right at ``transit``, give or take how the round trip was measured.)
        slot = seq & 1023
        return (transit is not None and self.first_seqs[slot] == seq
                and now - self.first_times[slot] < transit - ANSWER_SLACK)

    def allow(self, seq: int, size: int, now: float, rtt: float, rate: float, transit: float | None = None) -> bool:
        self._decay(now)
        if seq not in self.asked:
            self.asked.append(seq)
            self.asks += 1
        if self.late_share is not None and self.asks > self.late_share * self.sends:
            return False
        if self.on_its_way(seq, now, transit):
            return False
        per_second = max(rate * self.share, self.floor) / 8
        if self.last is not None:
            self.tokens = min(self.tokens + (now - self.last) * per_second, self._capacity(per_second))
        else:
            self.tokens = self._capacity(per_second)
        self.last = now
        previous = self.sent_at.get(seq)
        if previous is not None and now - previous < max(rtt, 0.05):
            return False
        if self.tokens < size:
            return False
        self.tokens -= size
        self.sent_at[seq] = now
        if len(self.sent_at) > 1024:
            self.sent_at = {k: t for k, t in self.sent_at.items() if now - t < 2.0}
        return True

    def _capacity(self, per_second: float) -> float:
        # (at least one full packet: at the floor's 40 kbit/s a quarter second is 1250 bytes, and a stream
        # measured that low, a thin link's or one just moved up from a layer, could never resend a full one)
        return max(per_second * self.burst, RESEND_BUCKET_MIN)

    def take(self, size: int) -> bool:
        """Spend the bucket's tokens on a second copy of a resend just allowed, if there are enough."""
        if self.tokens < size:
            return False
        self.tokens -= size
        return True


class SubscriberLink(Protocol):
    """What a subscription needs to know about its subscriber's link."""

    def video_budget(self) -> float | None: ...

    def rise_budget(self) -> float | None: ...

    def probe(self, now: float, wanted: float) -> float | None: ...

    def padding(self, now: float) -> bool: ...

    def lost_packets(self, now: float, packets: int = 1) -> None: ...

    def own_loss(self) -> float:
        """The share of packets the link loses of its own (not by overflowing), as far as it is known."""
        ...

    def transit(self) -> float | None: ...


class UnknownLink:
    def video_budget(self) -> float | None:
        return None

    def rise_budget(self) -> float | None:
        return None

    def probe(self, now: float, wanted: float) -> float | None:
        return None

    def padding(self, now: float) -> bool:
        return False

    def lost_packets(self, now: float, packets: int = 1) -> None:
        pass

    def own_loss(self) -> float:
        return 0.0

    def transit(self) -> float | None:
        return None


VideoStateHandler = Callable[["Subscription", bool], Awaitable[None]]


@dataclass
class ForwardingStats:
    """Counters of a publication (what came in, what we asked upstream) or a subscription
    (what went out, what the subscriber asked for)."""

    packets: int = 0
    bytes: int = 0
    retransmitted: int = 0
    nacks: int = 0
    keyframe_requests: int = 0
    send_errors: int = 0
    padding: int = 0  # duplicates sent to probe the link
    resends_refused: int = 0  # NACKed packets not sent again: already resent this round trip, or over budget
    resends_shed: int = 0  # NACKed packets not sent again because the worker's loop was behind (loop_lag.py)
    nacked: int = 0  # packets the subscriber reported missing (a video packet once in any ECHO_WINDOW)
    paced_drops: int = 0  # times the pacer's queue toward this subscriber overflowed: video waited for a keyframe
    resent_twice: int = 0  # resends sent a second time (a link that loses packets of its own)


class Publication:
    """One published audio or video track and the subscribers it feeds."""

    def __init__(
        self,
        participant_id: str,
        kind: str,
        tap: InboundTap,
        clock: Clock = time.monotonic,
        keyframe_interval: float = 0.5,
        adaptation: bool = False,
    ) -> None:
        self.participant_id = participant_id
        self.kind = kind
        self.id = f"{participant_id}/{kind}"
        self.tap = tap
        self.clock = clock
        self.subscriptions: set[Subscription] = set()
        self.cache = RtpPacketCache(1024 if kind == "video" else 128)
        self.throttle = KeyframeThrottle(interval=keyframe_interval)
        self.source_ssrc: int | None = None
        self.asked_upstream: dict[int, float] = {}  # source seq -> when we last NACKed it
        self.highest_seq: int | None = None  # the newest source sequence number received
        self.upstream_repair: float | None = None  # seconds the publisher takes to answer an ask (smoothed)
        self.held_asks: set[int] = set()  # asked for by a subscriber before any later packet came
        self.last_remb: float | None = None
        self.last_decision: float | None = None
        self.decide_soon = False  # a subscriber's estimate fell far: decide at the next packet, not the next tick
        self.rate_cap: int | None = None  # what the publisher was last told, bit/s
        self.caps: deque[tuple[float, int]] = deque()  # (when, cap) told in the last CAP_SETTLE seconds
        self.uplink_seen: int | None = None  # aiortc's estimate of the publisher's uplink, when last looked at
        self.uplink_fell_at: float | None = None  # when it last fell: the uplink was congested
        self.meter = RateMeter()
        self.source_size: tuple[int, int] | None = None  # the original's picture size, from its keyframes
        self.ladder = Ladder(self) if adaptation and kind == "video" else None
        # Told when video to a subscriber pauses (True) or resumes (False).
        self.on_video_state: VideoStateHandler | None = None
        # Called whenever a subscriber changes level or a layer starts or stops.
        self.on_change: Callable[[], None] = lambda: None
        self.muted = False
        self.closed = False
        self.stats = ForwardingStats()
        self.delays = DelayHistogram()  # how long each forwarded copy was held in the server
        # The worker's loop lateness: behind, it starts no probe; far behind, no resend (a media server's: peer.py).
        self.loop_lag: LoopLag = NEVER_BUSY
        # Told once when the publication closes (its delays join the process's total for /metrics).
        self.on_close: Callable[[Publication], None] = lambda publication: None

    @property
    def source_level(self) -> int:
        """The level of the original: above every layer of the ladder."""
        return self.ladder.source_level if self.ladder is not None else 0

    def level_name(self, level: int | None) -> str:
        if level is None:
            return "starting"
        if level == PAUSED:
            return "paused"
        if self.ladder is not None and self.ladder.is_layer(level):
            return self.ladder.specs[level].name
        return "original"

    async def on_packet(self, packet: RtpPacket) -> None:
        if self.closed:
            return
        arrival_ns = self.tap.arrival_ns
        # Late packets (retransmissions after a loss or an outage) are forwarded too:
        # they fill holes that receivers would otherwise wait on.
        if not self.cache.store(packet.sequence_number, packet):
            return  # a retransmission we already forwarded
        now = self.clock()
        if packet.ssrc != self.source_ssrc:
            self.highest_seq = None  # a new stream numbers its packets anew
            self.held_asks.clear()
        self._note_sequence(packet.sequence_number, now)
        if self.held_asks:
            await self._ask_held()
        self.source_ssrc = packet.ssrc
        self.stats.packets += 1
        self.stats.bytes += len(packet.payload)
        self.meter.add(len(packet.payload), now)
        keyframe = self.kind == "video" and is_keyframe_start(packet.payload)
        if keyframe:
            self.throttle.keyframe_seen()
            self.source_size = keyframe_size(packet.payload) or self.source_size
        await self.forward_level(self.source_level, packet, keyframe, arrival_ns)
        if self.ladder is not None:
            await self.ladder.on_source_packet(packet, now)
        if self.throttle.pending and self.throttle.due(now):
            await self._send_keyframe_request()
        if self.kind == "video":
            if self.ladder is not None and (self.decide_soon or self.last_decision is None
                                            or now - self.last_decision >= DECISION_INTERVAL):
                self.last_decision = now
                self.decide_soon = False
                await self.decide(now)
            if self.last_remb is None or now - self.last_remb >= REMB_INTERVAL:
                self.last_remb = now
                await self._tell_rate_cap()

    async def forward_level(self, level: int, packet: RtpPacket, keyframe: bool, arrival_ns: int = 0) -> None:
        """A packet of one level (the original or a layer) to every subscriber on or moving to it.

        This loop is the SFU's hot path: it runs once per packet per subscriber.
        A subscriber steadily on this level is served synchronously by
        ``Subscription.forward`` (header rewritten, straight to the socket: no
        coroutine, task or queue per copy, and the payload bytes shared by all);
        only what needs more (a move to this level, probing, a TURN relay) goes
        through ``Subscription.offer``. ``arrival_ns``: when the packet reached
        the server, for the forwarding delay histogram.
        """
        for subscription in tuple(self.subscriptions):
            if not subscription.forward(level, packet, arrival_ns):
                await subscription.offer(level, packet, keyframe)

    async def decide(self, now: float) -> None:
        """Move each subscriber to the level its link can take; run only the layers in use."""
        if self.ladder is None:
            return
        levels = self.ladder.levels()
        # (a picture that needs less than its cap sends less: then more would not be used)
        cap_limited = self.held_by_cap(now)
        budgets = [b for b in (s.link.video_budget() for s in self.subscriptions) if b is not None]
        best = max(budgets, default=None)
        for subscription in tuple(self.subscriptions):
            await subscription.decide(now, levels, cap_limited, best)
        self._update_layers()
        if self.rate_cap is not None and best is not None:
            cap = min(best / SOURCE_HEADROOM, self.uplink_ceiling(now) or best)
            if cap > self.rate_cap * CAP_RISE_AT_ONCE or cap * CAP_FALL_AT_ONCE < self.rate_cap:
                self.last_remb = now
                await self._tell_rate_cap()

    def uplink_ceiling(self, now: float) -> float | None:
        """The most the publisher's uplink is known to carry (None: not known): aiortc's estimate of it while
        that lately fell, else that or ``UPLINK_STEP`` times what the publisher sends, whichever is more."""
        uplink = self.tap.uplink_estimate
        if uplink is None:
            return None
        if self.uplink_seen is not None and uplink < self.uplink_seen * UPLINK_FALL and uplink < self.meter.rate:
            # (fell under what arrives: overuse. One that sinks with what arrives, as after the publisher was
            # told a lower cap, stays over it, and held the cap down with it: after a subscriber's link came back
            # from 300 kbit/s, the publisher stayed at 130 kbit/s for 4 s, and that subscriber was not probed)
            self.uplink_fell_at = now
        self.uplink_seen = uplink
        if self.uplink_fell_at is not None and now - self.uplink_fell_at < UPLINK_CALM:
            return float(uplink)
        return max(float(uplink), self.meter.rising * UPLINK_STEP)

    def held_by_cap(self, now: float) -> bool:
        """Whether the publisher sends about all its cap allows (so more would be used, if allowed)."""
        caps = [cap for at, cap in self.caps if now - at <= CAP_SETTLE] or (
            [self.rate_cap] if self.rate_cap is not None else [])
        return bool(caps) and self.meter.rising >= CAP_HELD * min(caps)

    def levels_changed(self) -> None:
        """A subscriber moved: stop a layer no one needs any more at once, and tell whoever waits."""
        self._update_layers()
        self.on_change()

    def _update_layers(self) -> None:
        if self.ladder is not None:
            self.ladder.update({level for s in self.subscriptions for level in (s.level, s.target)
                                if level is not None and self.ladder.is_layer(level)})

    def cache_for(self, level: int | None) -> RtpPacketCache | None:
        if level == self.source_level:
            return self.cache
        if self.ladder is not None and level in self.ladder.layers:
            return self.ladder.layers[level].cache
        return None

    def level_rate(self, level: int | None) -> float:
        if self.ladder is not None and level in self.ladder.layers:
            return self.ladder.layers[level].meter.rate
        return self.meter.rate

    async def _tell_rate_cap(self) -> None:
        """Cap the publisher at what its best-connected subscriber can take, and its uplink allows."""
        budgets = [s.link.video_budget() for s in self.subscriptions]
        wanted = [b for b in budgets if b is not None]
        now = self.clock()
        uplink = self.uplink_ceiling(now)
        # The original needs some headroom over its own rate to fit a budget (SOURCE_HEADROOM).
        caps = ([int(max(wanted) / SOURCE_HEADROOM)] if wanted else []) + ([int(uplink)] if uplink else [])
        if not caps or self.source_ssrc is None:
            return
        self.rate_cap = min(caps)
        self.caps.append((now, self.rate_cap))
        while now - self.caps[0][0] > CAP_SETTLE:
            self.caps.popleft()
        try:
            await self.tap.send_remb(self.rate_cap, [self.source_ssrc])
        except ConnectionError:
            pass

    async def request_keyframe(self, level: int | None = None) -> None:
        """A subscriber needs a keyframe of a level (the original unless given), throttled."""
        if self.kind != "video" or self.closed:
            return
        if level is not None and level != self.source_level:
            if self.ladder is not None:
                self.ladder.request_keyframe(level)
            return
        if self.throttle.request(self.clock()):
            await self._send_keyframe_request()

    async def _send_keyframe_request(self) -> None:
        if self.source_ssrc is None:
            return
        self.stats.keyframe_requests += 1
        try:
            await self.tap.request_keyframe(self.source_ssrc)
        except ConnectionError:
            pass

    async def recover(self, missing: list[int]) -> None:
        """Ask the publisher again for packets a subscriber lacks and we never got.

        aiortc's receiver NACKs a gap once, when it appears; if that NACK or its
        retransmission is lost, only a subscriber's NACK tells us the hole is
        still there (for audio, aiortc's receiver asks for nothing: this is the
        only ask). A packet is asked for again only once the publisher has had
        the time it takes to answer, and never one newer than any we have: that
        one is late, not lost.
        """
        now = self.clock()
        interval = self.upstream_interval
        early = [seq for seq in missing if not self._past(seq)]
        if early and len(self.held_asks) < 64:
            self.held_asks.update(early)
        wanted = [seq for seq in missing
                  if self._past(seq) and now - self.asked_upstream.get(seq, -1.0) >= interval - 1e-9]
        if not wanted or self.source_ssrc is None or self.closed:
            return
        for seq in wanted:
            self.asked_upstream[seq] = now
        if len(self.asked_upstream) > 512:
            self.asked_upstream = {s: t for s, t in self.asked_upstream.items() if now - t < ASK_FORGOTTEN}
        self.stats.nacks += 1
        try:
            await self.tap.request_retransmission(self.source_ssrc, wanted)
        except ConnectionError:
            pass

    async def _ask_held(self) -> None:
        """Asks held because nothing after them had come: once something has, those still missing are lost,
        and asked for at once (the subscriber may have spent its asks while they were only late)."""
        past = [seq for seq in self.held_asks if self._past(seq)]
        if not past:
            return
        self.held_asks.difference_update(past)
        highest = self.highest_seq or 0
        missing = [seq for seq in past if self.cache.get(seq) is None and (highest - seq) % 65536 < 128]
        if missing:
            await self.recover(sorted(missing))

    def _note_sequence(self, seq: int, now: float) -> None:
        """The newest sequence number so far; a packet that fills one we asked for tells how long the
        publisher takes to answer."""
        highest = self.highest_seq
        if highest is None or 0 < (seq - highest) % 65536 < 32768:
            self.highest_seq = seq
            return
        asked = self.asked_upstream.get(seq)  # older than the newest: a retransmission or a late packet
        if asked is not None and 0 < now - asked < ASK_FORGOTTEN:
            sample = now - asked
            self.upstream_repair = sample if self.upstream_repair is None else (
                self.upstream_repair + (sample - self.upstream_repair) / 8)

    @property
    def upstream_interval(self) -> float:
        """How long one missing packet's ask upstream is left to be answered before it is asked for again:
        what the publisher has taken to answer (a queue in front of it included), at least 0.1 s."""
        repair = self.upstream_repair
        return UPSTREAM_NACK_INTERVAL if repair is None else max(UPSTREAM_NACK_INTERVAL, 1.25 * repair)

    def _past(self, seq: int) -> bool:
        """True if a packet after ``seq`` has come: a receiver asking for a packet we have not yet got and
        none after it is hearing it late, not lost (most likely behind the same queue as the publisher's
        next packets), and asking the publisher would send it again into that queue: a queue in front of
        the audio would feed itself."""
        return self.highest_seq is not None and 0 < (self.highest_seq - seq) % 65536 < 32768

    def attach(self, port: OutboundPort, rewriter: StreamRewriter, link: SubscriberLink | None = None,
               subscriber_id: str = "") -> Subscription:
        subscription = Subscription(self, port, rewriter, link or UnknownLink(), subscriber_id)
        self.subscriptions.add(subscription)
        return subscription

    def detach(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)
        self._update_layers()

    def close(self) -> None:
        was_open = not self.closed
        self.closed = True
        self.subscriptions.clear()
        self.cache.clear()
        if self.ladder is not None:
            self.ladder.close()
        if was_open:
            self.on_close(self)


class Subscription:
    """One publication on one subscriber's outbound stream.

    The rewriter belongs to the outbound stream, not to the subscription: when a
    stream is reused for another publication, its sequence numbers and
    timestamps must carry on from where they were (SRTP refuses to send a
    sequence number far behind the last one on the same SSRC). The same
    rewriter carries the stream across levels: each level is a source of its own.
    """

    def __init__(self, publication: Publication, port: OutboundPort, rewriter: StreamRewriter,
                 link: SubscriberLink, subscriber_id: str = "") -> None:
        self.publication = publication
        self.port = port
        self.rewriter = rewriter
        self.link = link
        self.subscriber_id = subscriber_id
        # The level being forwarded (None until the first keyframe), and the level
        # waiting for its keyframe. Video starts on a keyframe so the subscriber
        # never sees a broken picture; audio starts at once.
        # With a ladder, the first decision picks the level (a new subscriber's link is
        # unknown: it starts low and is moved up once its link has proven itself).
        self.level: int | None = None if publication.kind == "video" else publication.source_level
        self.target: int | None = (publication.source_level if publication.kind == "video"
                                   and publication.ladder is None else None)
        self.keyframe_asked: float | None = None
        self.trial_until: float | None = None  # a paused subscriber's trial of the lowest layer lasts until then
        self.chooser = LayerChooser()
        self.meter = RateMeter()
        self.probe_factor = 0.0  # the probe's rate over the level's own (over 1: probing)
        self.probe_rate = 0.0  # bit/s the probe's cluster goes at, this video's own packets and duplicates together
        self.pad_source: tuple[RtpPacket, int, int, float] | None = None  # (packet, seq, timestamp, when) to repeat
        self._padder: asyncio.Future[Any] | None = None
        self._padding: set[asyncio.Future[Any]] = set()  # (and the pacer's sends through aiortc)
        self.switches = 0
        self.announced_pause = False
        self.resends = ResendLimit(late_share=AUDIO_LATE_SHARE if publication.kind == "audio" else None)
        self.stats = ForwardingStats()
        # The subscriber's video pacer (mediaserver/pacer.py; None: audio, or not paced). After its queue
        # overflowed, video waits for a keyframe, numbered on from the last packet sent (no hole to ask for);
        # asks for packets before that keyframe are not answered (``resend_floor``).
        self.pacer: VideoPacer | None = None
        self.pacing_dropped = False
        self.resend_floor: int | None = None

    @property
    def paused(self) -> bool:
        return self.level == PAUSED and self.target is None

    def _at_the_top(self, levels: list[tuple[int, float]], cap_limited: bool) -> bool:
        """Whether this subscriber has nothing to climb to: steadily on the best level, at its full rate,
        over a link proven to carry it. A probe then buys nothing, and on a busy worker its padding was
        8-10 % of all copies (docs/benchmarks.md, issue 9). One thing would still be worth a probe: a
        publisher held back by a cap that this subscriber's budget sets (cap = the best budget over
        ``SOURCE_HEADROOM``, or the publisher's uplink if lower): proving more lifts the cap, and the
        original with it. Where the uplink sets the cap, this link's probe would not lift it."""
        top, cost = levels[-1]
        if self.level != top or self.target is not None:
            return False
        usable = self.link.rise_budget()
        if usable is None or usable < cost:
            return False
        cap = self.publication.rate_cap
        return not cap_limited or (cap is not None and cap < usable / SOURCE_HEADROOM * 0.95)

    async def decide(self, now: float, levels: list[tuple[int, float]], cap_limited: bool,
                     best_budget: float | None = None) -> None:
        """Choose this subscriber's level from its budget; probe the link when more could be used.

        The publisher is capped at what the best-connected subscriber can take
        (``best_budget``): for that subscriber the original follows its budget,
        so an original a little over it is as good as fitting, to move up to (it
        comes down within a second) or to stay on: the subscriber is not held on
        a layer for it, nor sent down to one for each cut that keeps the link at
        its capacity. (When the budget falls further, as when a link drops, a
        layer takes over at once.)

        While paused, the probe is the lowest layer itself: it flows for the probe's
        time and stays only if the round trip stayed flat. Until then, no one is
        told the video is back.
        """
        budget = known_budget = self.link.video_budget()
        if budget is None:
            # Nothing heard from this link yet: the lowest level, until it has shown what it carries.
            budget = levels[0][1]
        elif cap_limited and best_budget is not None and budget >= best_budget * 0.95:
            source, cost = levels[-1]
            if cost <= budget * SOURCE_FOLLOWS:
                # (its bursts do not follow: on a thin link a keyframe takes most of a second's budget)
                bursts = self.publication.ladder.burst_cost(source) if self.publication.ladder is not None else 0.0
                levels = [*levels[:-1], (source, min(cost, max(budget, bursts)))]
        if self.publication.loop_lag.busy and not self.link.padding(now):
            probe = None  # (no new probe on a worker that is behind: its padding would only add to the backlog)
        elif self._at_the_top(levels, cap_limited) and not self.link.padding(now):
            probe = None  # (nothing to climb to: its padding would be copies for nothing; a running one ends)
        else:
            probe = self.link.probe(now, self.chooser.wanted(levels, cap_limited))
        if self.level == PAUSED and probe is not None and (self.trial_until is None or now >= self.trial_until):
            self.trial_until = now + TRIAL_TIME
        trial = self.trial_until is not None and now < self.trial_until
        if trial and self.level == levels[0][0]:
            budget = max(budget, levels[0][1])  # (the trial holds the lowest layer while its packets prove the link)
        trying = self.level == PAUSED and (probe is not None or trial)
        ladder = self.publication.ladder
        floor = float(ladder.specs[0].bitrate) if ladder is not None and ladder.specs else None
        trial_budget = max(budget, probe or 0.0, levels[0][1] if trial else 0.0)
        choice = self.chooser.choose(now, trial_budget if trying else budget, levels,
                                     probing=trying, floor=floor, rise_budget=self.link.rise_budget())
        if choice == PAUSED:
            if self.level != PAUSED:
                await self._pause()
        elif choice != (self.level if self.target is None else self.target):
            self.target = choice if choice != self.level else None
            self.keyframe_asked = None
        if self.announced_pause and probe is None and self.level is not None and self.level >= 0:
            await self._announce(False)
        if probe is None or self.level is None or self.level == PAUSED or not self.link.padding(now):
            self.probe_factor = 0.0
        else:
            current = max(self.publication.level_rate(self.level), 1.0)
            self.probe_factor = probe / current if probe > current else 0.0
            self.probe_rate = probe
            if self.probe_factor > 1.0 and (self._padder is None or self._padder.done()):
                self._padder = asyncio.ensure_future(self._pad())
                self._padding.add(self._padder)
                self._padder.add_done_callback(self._padding.discard)
        if self.pacer is not None:
            self._pace(now, None if known_budget is None else budget)  # (a trial's budget holds its layer)

    def _pace(self, now: float, budget: float | None) -> None:
        """Tell the pacer what this video may use: its budget, or its level's own mean rate if that is
        more, up to as far over the budget as the chooser lets a level be (``SOURCE_FOLLOWS``: the pacer
        smooths a level's bursts; a level over the budget is the chooser's to change). Further over, the
        queue overflows and the video waits for a keyframe in the server, not the sound in the link:
        an original the publisher has been told to bring down comes down over a second or two. A probe's
        padding goes beside the paced video, not through it."""
        if self.pacer is None:
            return
        if budget is None:
            self.pacer.allow(self, None, now)
            return
        levels = (self.level, self.target)
        own = max((self.publication.level_rate(level) for level in levels if level is not None and level >= 0),
                  default=0.0)
        self.pacer.allow(self, max(budget, min(own, budget * SOURCE_FOLLOWS)), now)

    async def _pause(self) -> None:
        self.level = PAUSED
        self.target = None
        self.switches += 1
        self.publication.levels_changed()
        if not self.announced_pause:
            await self._announce(True)

    async def _announce(self, paused: bool) -> None:
        self.announced_pause = paused
        if self.publication.on_video_state is not None:
            await self.publication.on_video_state(self, paused)

    def forward(self, level: int, packet: RtpPacket, arrival_ns: int) -> bool:
        """The hot path's common case: this subscriber is on ``level`` and nothing else is going on.

        Returns True when the packet is dealt with (sent, or not for this subscriber), False
        when ``offer`` must take it: a move to this level, probing (its padding), a new source,
        or a transport that aiortc's own send path must serve (TURN).
        """
        if level != self.level:
            return level != self.target  # (neither on it nor moving to it: nothing to send)
        if self.probe_factor > 1.0 or self.rewriter.source_ssrc != packet.ssrc:
            return False
        now = self.publication.clock()
        payload = packet.payload
        pacer = self.pacer
        if pacer is not None and (self.pacing_dropped or not pacer.admit(len(payload), now)):
            self._hold(packet, arrival_ns, now, None)
            return True
        out_seq, out_ts = self.rewriter.rewrite(packet.sequence_number, packet.timestamp, now)
        try:
            if not direct_send(self.port, payload, out_seq, out_ts, packet.marker, packet.extensions.audio_level,
                               arrival_ns, self.publication.delays):
                if pacer is not None:
                    pacer.refund(len(payload))  # (offer asks the pacer again)
                return False
        except SendFailed:
            self.stats.send_errors += 1
            return True
        except ConnectionError:
            return True  # (not connected yet, or any more: as offer, nothing is counted)
        self.resends.sent(out_seq, now)
        self.stats.packets += 1
        self.stats.bytes += len(payload)
        self.meter.add(len(payload), now)
        return True

    async def offer(self, level: int, packet: RtpPacket, keyframe: bool) -> None:
        """A packet of ``level``: forwarded if this subscriber is on it, or is moving to it and it starts a keyframe."""
        now = self.publication.clock()
        if level == self.target:
            if not self.port.connected or self.port.payload_type is None:
                return
            if keyframe:
                self.level, self.target = level, None
                self.switches += 1
                self.rewriter.switch_source(packet.ssrc, packet.sequence_number, packet.timestamp, now)
                self.publication.levels_changed()
                if self.pacer is not None:
                    self.pacer.discard(self)  # (what waits is of the level left: its release would only drop it)
            elif self.keyframe_asked is None or now - self.keyframe_asked >= KEYFRAME_WAIT:
                self.keyframe_asked = now
                await self.publication.request_keyframe(level)
        if level != self.level or not self.port.connected:
            return  # (before the transport is up, a packet would only leave a hole in the sequence)
        if self.rewriter.source_ssrc != packet.ssrc:
            self.rewriter.switch_source(packet.ssrc, packet.sequence_number, packet.timestamp, now)
        pacer = self.pacer
        if pacer is not None and (self.pacing_dropped or not pacer.admit(len(packet.payload), now)):
            self._hold(packet, 0, now, keyframe)
            return
        out_seq, out_ts = self.rewriter.rewrite(packet.sequence_number, packet.timestamp, now)
        if await self._send(packet, out_seq, out_ts) and self.probe_factor > 1.0:
            source = self.pad_source
            if (source is None or len(packet.payload) >= min(len(source[0].payload), PADDING_LARGE)
                    or now - source[3] > PADDING_FRESH):
                self.pad_source = (packet, out_seq, out_ts, now)

    async def _pad(self) -> None:
        """Probing: the cluster goes at the probe's rate, this video's own packets and duplicates of a packet just
        sent together: the duplicates fill what the video leaves. Receivers drop duplicates; the link carries them,
        which is the point. (Padding at the probe's rate less the level's mean, a publisher whose cap had just
        risen sent more than its mean, and clusters went at 1.2-1.5 times their rate: on a link that came back
        to 2 Mbit/s, one at 0.83 Mbit/s filled it, failed, and held the climb back.) Paced at the probe's rate:
        sent in a burst behind each packet, the duplicates of a frame held up the audio behind them on a thin
        link for tens of ms. Padding never delays media: while any waits in the pacer, none goes."""
        clock = self.publication.clock
        loop = asyncio.get_running_loop()
        ends = loop.time() + PADDING_LONGEST
        last, own = clock(), self.stats.bytes
        credit = 0.0  # bytes the cluster may still send: what its rate allowed, less what went
        while (self.probe_factor > 1.0 and self.link.padding(clock()) and not self.publication.closed
               and loop.time() < ends):
            now = clock()
            rate = max(self.probe_rate, 1.0)
            source = self.pad_source
            size = len(source[0].payload) if source is not None else 0
            # (what it fell behind by is dropped past PADDING_CATCH_UP, or a packet: a busy loop must not send it in
            # one burst; what the video sent over the rate is not: a keyframe's burst is the cluster's too)
            credit = (min(credit + (now - last) * rate / 8, max(rate * PADDING_CATCH_UP / 8, size))
                      - (self.stats.bytes - own))
            last, own = now, self.stats.bytes
            if source is None or now - source[3] > PADDING_FRESH:
                await asyncio.sleep(PADDING_TICK)  # (nothing sent lately to repeat)
                continue
            packet, out_seq, out_ts, _ = source
            if (credit >= size and (self.pacer is None or not self.pacer.waiting)
                    and await self._send(packet, out_seq, out_ts, extra=True, probe=True)):
                self.stats.padding += 1
                credit -= size
            await asyncio.sleep(min(max((size - credit) * 8 / rate, 0.0), PADDING_CATCH_UP))

    def _hold(self, packet: RtpPacket, arrival_ns: int, now: float, keyframe: bool | None) -> None:
        """A packet the pacer did not let go at once: queued, or dropped while waiting for a keyframe."""
        pacer = self.pacer
        assert pacer is not None
        if self.pacing_dropped:
            if not (is_keyframe_start(packet.payload) if keyframe is None else keyframe):
                return
            self.pacing_dropped = False
            # Numbered on from the last packet sent: the dropped ones leave no hole the subscriber would ask for.
            self.rewriter.switch_source(packet.ssrc, packet.sequence_number, packet.timestamp, now)
            self.resend_floor = (packet.sequence_number + self.rewriter.seq_offset) % 65536
        if not pacer.hold(self, len(packet.payload), (packet, arrival_ns, time.monotonic_ns()), now):
            self.pacing_dropped = True
            self.stats.paced_drops += 1
            level = self.level
            if level is not None and level >= 0:
                task = asyncio.ensure_future(self.publication.request_keyframe(level))
                self._padding.add(task)
                task.add_done_callback(self._padding.discard)

    def release(self, item: Any, waited: float) -> None:
        """The pacer lets a queued packet go: a new packet (numbered now) or a resend (numbered already)."""
        if len(item) == 3:
            packet, arrival_ns, queued_ns = item
            if packet.ssrc != self.rewriter.source_ssrc or self.publication.closed or self.pacing_dropped:
                return  # (of a level this subscriber has left, or of a queue that overflowed)
            now = self.publication.clock()
            out_seq, out_ts = self.rewriter.rewrite(packet.sequence_number, packet.timestamp, now)
            # (the forwarding delay is the server's own work: time spent paced is left out)
            arrival_ns = arrival_ns + time.monotonic_ns() - queued_ns if arrival_ns else 0
            if self._send_copy(packet, out_seq, out_ts, arrival_ns):
                self.resends.sent(out_seq, now)
                self.stats.packets += 1
                self.stats.bytes += len(packet.payload)
                self.meter.add(len(packet.payload), now)
        else:
            packet, out_seq, out_ts = item
            if packet.ssrc != self.rewriter.source_ssrc or self.publication.closed or self.pacing_dropped:
                return  # (a resend for a level this subscriber has left, or from before a keyframe it awaits)
            self._send_copy(packet, out_seq, out_ts, 0, resend=True)

    def _resend_copy(self, packet: RtpPacket, out_seq: int, out_ts: int) -> None:
        """The second copy of a resend, on a link that loses packets of its own (RESEND_TWICE_ABOVE)."""
        if packet.ssrc != self.rewriter.source_ssrc or self.publication.closed or self.pacing_dropped:
            return
        now = self.publication.clock()
        pacer = self.pacer
        if pacer is not None and not pacer.admit(len(packet.payload), now):
            pacer.hold(self, len(packet.payload), (packet, out_seq, out_ts), now, resend=True)
        elif not self._send_copy(packet, out_seq, out_ts, 0, resend=True):
            return
        self.stats.resent_twice += 1

    def _send_copy(self, packet: RtpPacket, out_seq: int, out_ts: int, arrival_ns: int, resend: bool = False) -> bool:
        """Send one packet from outside a coroutine (``resend``: one sent before); False if it could not go now."""
        try:
            if direct_send(self.port, packet.payload, out_seq, out_ts, packet.marker, packet.extensions.audio_level,
                           arrival_ns, self.publication.delays, resend):
                return True
        except SendFailed:
            self.stats.send_errors += 1
            return False
        except ConnectionError:
            return False
        task = asyncio.ensure_future(self._send(packet, out_seq, out_ts, extra=True, resend=resend))  # (TURN)
        self._padding.add(task)
        task.add_done_callback(self._padding.discard)
        return True

    async def _send(self, packet: RtpPacket, out_seq: int, out_ts: int, extra: bool = False,
                    probe: bool = False, resend: bool = False) -> bool:
        """Send one packet; ``extra`` marks a resend or a probe's duplicate (``resend``, ``probe``), which the
        rate meter leaves out (it measures the stream itself)."""
        try:
            await self.port.send(
                packet.payload,
                sequence_number=out_seq,
                timestamp=out_ts,
                marker=packet.marker,
                padding_size=packet.padding_size,
                audio_level=packet.extensions.audio_level,
                probe=probe,
                resend=resend,
            )
        except ConnectionError:
            self.stats.send_errors += 1
            return False
        if extra:
            return True
        self.resends.sent(out_seq, self.publication.clock())
        self.stats.packets += 1
        self.stats.bytes += len(packet.payload)
        self.meter.add(len(packet.payload), self.publication.clock())
        return True

    async def on_feedback(self, feedback: RtcpFeedback) -> None:
        if feedback.kind == "nack":
            self.stats.nacks += 1
            upstream = []
            cache = self.publication.cache_for(self.level)
            now = self.publication.clock()
            if self.publication.kind == "video":
                asked = self.resends.new_asks(feedback.lost, now)
                self.stats.nacked += asked
                if asked:
                    self.link.lost_packets(now, asked)
            else:  # (audio receivers also ask for packets that are merely late: no sign of loss)
                self.stats.nacked += len(feedback.lost)
            rtt = self.port.round_trip_time or 0.1
            # Video receivers ask only for holes a later packet has shown (aiortc's NACK, Chromium's, Nära's
            # assembler): lost, not queued. Refused as "on its way", it costs the frame another round trip.
            transit = self.link.transit() if self.publication.kind == "audio" else None
            far_behind = self.publication.loop_lag.shedding
            twice = self.publication.kind == "video" and self.link.own_loss() >= RESEND_TWICE_ABOVE
            floor = self.resend_floor
            if floor is not None and ((self.rewriter.last_out_seq or floor) - floor) % 65536 > 1024:
                floor = self.resend_floor = None  # (long past: the numbers will come round again)
            for out_seq in feedback.lost:
                if self.pacing_dropped or (floor is not None and seq_newer(floor, out_seq)):
                    continue  # (from before the pacer's queue overflowed: the keyframe awaited makes it moot)
                source_seq = self.rewriter.source_seq(out_seq)
                cached = cache.get(source_seq) if cache is not None else None
                if cached is None or cached.ssrc != self.rewriter.source_ssrc:
                    upstream.append(source_seq)
                    continue
                if far_behind:
                    # The worker's loop is far behind: this resend would go out late, often after the receiver
                    # gave up on it, at the cost of a fresh copy, and the load is what keeps the worker behind.
                    # Shed (loop_lag.py); a packet missing here is still asked for upstream, as that one ask
                    # repairs every subscriber.
                    self.stats.resends_shed += 1
                    continue
                if not self.resends.allow(out_seq, len(cached.payload), now, rtt, self.meter.rate, transit):
                    self.stats.resends_refused += 1
                    continue
                out_ts = (cached.timestamp + self.rewriter.ts_offset) % (1 << 32)
                self.stats.retransmitted += 1
                if twice and self.resends.take(len(cached.payload)):
                    asyncio.get_running_loop().call_later(RESEND_COPY_GAP, self._resend_copy, cached, out_seq, out_ts)
                pacer = self.pacer
                if pacer is not None and not pacer.admit(len(cached.payload), now):
                    pacer.hold(self, len(cached.payload), (cached, out_seq, out_ts), now, resend=True)
                    continue
                await self._send(cached, out_seq, out_ts, extra=True, resend=True)
            if upstream and self.rewriter.source_ssrc == self.publication.source_ssrc:
                await self.publication.recover(upstream)
        elif feedback.kind == "keyframe":
            self.stats.keyframe_requests += 1
            if self.level is not None and self.level != PAUSED:
                await self.publication.request_keyframe(self.level)
