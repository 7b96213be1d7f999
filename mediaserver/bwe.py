"""How much video one subscriber's link can take: a pure function of time and reports.

Inputs are what a subscriber's RTCP says: receiver reports (fraction lost, and
the round-trip time derived from them) and REMB (its receiver's own
delay-based estimate). Audio is outside this budget: it is never counted here
and never cut.

* Loss, after Galène: grow 5 % a second while loss stays under 2 %, hold
  between 2 % and 10 %, and above 10 % cut by half the loss rate, at most once
  per round trip. The loss is smoothed over reports: one report covers a
  second, a few dozen packets, and under 5 % random loss one report in twenty
  shows more than 10 % by chance alone.
* Loss that repairs hide: a receiver report counts a packet that came again
  when asked for as received, so on a link whose losses are repaired it reads
  nothing, congestion included. What the subscriber asked for again (its
  NACKs, ``NackLoss``) still shows the loss. A rural radio link loses packets
  of its own, whatever the rate, and cutting for it would only starve the
  picture; so this loss is compared with the link's own slowly learned level,
  and a rise above it stops growth (and fails a probe).
* Queueing: a round trip that has grown well above the lowest one seen means a
  queue is filling somewhere (rural links have deep buffers and lose late);
  cut by 15 % once per round trip, and do not grow while it persists. These
  cuts may go further below what the link delivered than the others (to 75 %
  of it): sending just what a link delivers keeps its queue standing, and
  audio waits in that queue. Each
  stream's round trip is compared with that stream's own lowest: streams of
  one link report round trips some tens of milliseconds apart (how long each
  one's reports wait), and mixing them would read as a queue.
* REMB: a receiver's REMB falls only when it has seen its link overuse, so a
  falling REMB (by a tenth within a second: it falls a little with each of
  its messages) cuts the estimate to it, and stops a probe. But a REMB never
  exceeds 1.5 times what arrives, so it also sinks whenever less is sent (a
  low layer, a probe that ended, a quiet picture): a fall to a value still
  well above what is sent is not overuse. A REMB that merely lags behind is
  not a ceiling either: that would stop every ramp-up. Nor does a REMB cut go
  below what is arriving: on a thin link every video frame is a burst that
  the receiver's delay detector reads as overuse, and its REMB sits far under
  what arrives without loss; cut below that each time, the estimate would
  shrink step by step with what is sent, until video paused.
* Delivered: receiver reports say how many packets arrived; times the size of
  what was sent, that is what the link carried. A cut never goes below 90 % of
  it: after a flood, the estimate lands on the link's capacity instead of
  collapsing to the floor (which would pause video a 150 kbit/s link can carry).
* A guess is not a measurement: the estimate starts at a guess, and until
  delivery has borne it out (a probe that worked, or the link carrying that
  much) only what the link has been seen to carry counts (``usable``). On a
  150 kbit/s link the guess alone would move the subscriber up to a layer the
  link cannot carry, and a probe from it would reach four times the link.
* Probing: growing 5 % a second takes half a minute to double, too slow after
  a link comes back. When the link has been clean for a while and more would
  be used, the sender pads the stream up to a probe rate for a moment; if the
  round trip stays flat, the estimate jumps to that rate. Duplicate padding
  hides loss from receiver reports, so a probe is judged by delay, by REMB
  and, on a clean link, by NACKs: there the first NACK stops it. A link with
  loss of its own (which retransmissions hide from receiver reports too)
  loses in bursts whatever is sent, and its NACKs would fail every other
  probe: there delay and REMB judge alone. The loss-based rule takes over
  again as soon as it ends.
* How far probes go: they step from the usable estimate (the first to twice
  what the link has carried, later ones half as far again), and one that
  worked is followed at once. After a failure they close in on the lowest
  rate that failed, halfway each time, and once close under it look a little
  above it, backing off longer after each failure in a row: on a thin link
  each probe that overshoots delays the audio behind it. A cut forgets that
  rate (the link has changed).
* What a failed probe leaves behind (a queue, a REMB that dips) is the
  probe's doing, and so is the queue of one whose padding fell short: for a
  moment after it, those signs cut nothing.

Per-packet delay feedback (transport-wide congestion control, mediaserver/twcc.py
and mediaserver/delay_detector.py), where the subscriber sends it (browsers, Nära's
receive path), adds faster rules; the ones above stay for subscribers without it:

* Overuse: when the delay detector sees the queue grow, cut at once to 0.85
  times what the receiver acknowledged over the last half second, or over
  the last fifth of one if that is less (a link that has just fallen), with
  no floor from what the reports said was delivered (they are a second old),
  at most every 0.2 s. But where those packets arrived as fast as they were sent
  (``KEPT_UP``), and no more of what was sent was lost than the link loses of
  its own and a burst's overflow (``OVERFLOW_LOSS``: a queue full to
  overflowing keeps only what the link carries, and passes that on as fast
  as it came; such a loss, with a queue standing (``OVERFLOW_QUEUE``: a radio
  link's own bursts of loss come with none), cuts as an overuse does, before
  the detector's trend reads one), the link kept up with what it was given:
  the queue is a burst's, and a sender held to a layer's rate would be cut
  far under the link; then the estimate is cut once by 0.85 while the
  overuse lasts.
* An overuse seen before any of a probe's packets has arrived is the link's,
  not the probe's: the probe is dropped (no failure, no blame) and the
  overuse cuts as any other.
* What arrives counts as carried: the acknowledged rate confirms the estimate
  as delivery from reports does, within a fraction of a second.
* A probe is a cluster: 0.15 s of padding at the probe rate
  (``PROBE_TIME_PER_PACKET``; half a second of it on a 150 kbit/s link left
  a queue that held audio past its playout), measured by its packets'
  arrival. Its padding repeats packets already sent, which the receiver's
  SRTP drops as replays before it notes their arrival, so the stream's own
  packets in the cluster are its markers: every byte sent between the first
  and the last of them (padding included: it crossed the same bottleneck)
  over the span they were sent in is the rate sent, over the span they
  arrived in, the rate the link carried (``cluster_rates``). The padding
  stops as soon as the detector sees overuse or the markers' one-way delay
  (the latest quarter over the first quarter's lowest) has grown by more than
  ``PROBE_DELAY_RISE``; the cluster is judged once feedback has covered all
  of it. Arrived at ``PROBE_RECEIVED_SHARE`` of the rate sent or more, with
  no sign of a queue: the link carries the probe's rate if the cluster went
  out at ``PROBE_REACHED`` of it or more (the padding duplicates what is
  forwarded, paced, and runs a little short), else the rate it went out at;
  but no more than it arrived at, if that was under ``CLUSTER_ON_TIME`` of
  the rate sent (the link is about full: no step further from there).
  Arrived slower, or stopped: the link is full, and the rate the cluster
  arrived at, if more than the link has carried, is its capacity: a
  measurement, not only a failure (under that, a few packets spread by
  jitter tell nothing). The
  estimate jumps to ``CLUSTER_SHARE`` of it (a starting guess is replaced by
  it), the next probes close in on it, and they back off as after a failure
  (a probe just above a full link, one after another, would keep it full).
  There is no waiting a second for a report. A cluster whose padding fell short of its rate
  proves nothing: the padding repeats a packet sent lately, and a low layer's
  packets come a frame apart (the padding waits for the first, and stops
  while media waits in the pacer), so the next is twice as long (up to
  ``PROBE_TIME_LONGEST``) and goes at once; after one at the longest (as
  when a paused stream has nothing to pad with), the next waits a back-off.
* They start sooner and go further: half a second after the link is first
  heard from (or a cut), a cluster each, each to twice the last (the first
  to twice what the link has carried: a cluster at three times it on a
  150 kbit/s link left 0.15 s of queue ahead of the sound, at twice it
  0.05 s), while they work (``PROBE_STEPS_PER_PACKET``,
  ``PROBE_STREAK_STEP``), and the back-off after a failure is shorter
  (``PROBE_BACKOFF_PER_PACKET``): a failed probe is stopped within a round
  trip of the first sign instead of filling the queue for a second. None goes
  while the detector reads anything but normal: underuse is a queue draining.
* A cluster is judged by its packets alone, never by NACKs: on a link that
  loses packets of its own, the first probes (half a second after it is
  first heard from, before it has lost enough to count as lossy) failed on
  the first NACK, and backed off; a cluster that overflows a queue shows it
  in its packets' delay first.
* Growth follows the delay too (``GROWTH_PER_PACKET``, 8 % a second, as
  libwebrtc's far from the link's capacity): while the detector reads
  normal, whatever loss the link has of its own (random loss the delay does
  not confirm, repaired by NACK, is the radio's, not a queue's; loss above
  the link's own level, or over ``CUT_ABOVE``, still holds it), and no
  further than ``GROWTH_ABOVE_ACKED`` times what the receiver acknowledged
  (a publisher that sends less would leave it growing on nothing). The
  report rules' growth (5 % a second, only under 2 % loss) is then off.
* After a probe that worked on time, the next goes just above a rate that
  failed earlier (``PROBE_ABOVE_CEILING``) instead of closing in on it
  halfway: that rate may have failed while the link was low, and the link
  may be back; if it works, the rate is forgotten and the streak goes on.
* A link that has carried ``FALLEN`` times the usable estimate fell and may
  come back: probes back off at most ``FALLEN_BACKOFF``, and one that worked
  on time steps on by ``PROBE_STREAK_STEP``, past a rate that failed.
* Without per-packet feedback for ``PER_PACKET_FRESH`` seconds the
  estimate falls back to the rules above.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .delay_detector import NORMAL, OVERUSE
from .twcc import PacketResult

GROW_BELOW = 0.02
CUT_ABOVE = 0.10
GROWTH = 1.05
LOSS_SMOOTHING = 0.6  # weight of the newest report's loss
MIN_CUT_INTERVAL = 0.5  # seconds
QUEUE_CUT = 0.85
QUEUE_LIMIT = 0.12  # seconds of queueing above the base round trip that count as congestion
QUEUE_CALM = 0.05  # seconds: below this, the queue is empty enough to grow or probe
QUEUE_FRESH = 2.0  # seconds a stream's reading of the queue counts for (reports come every 0.5-1.5 s)
REMB_FALL = 0.9  # a REMB under 90 % of the highest of the last REMB_WINDOW reports overuse
REMB_WINDOW = 1.0  # seconds (a receiver lowers its REMB a little with each message it sends)
REMB_ROOM = 1.2  # ... unless it still allows this much more than is being sent

PROBE_TIME = 1.0  # seconds the padding lasts
PROBE_SETTLE = 1.0  # seconds after the padding for the last report to come back
PROBE_CALM = 2.0  # seconds without a cut before probing
NACK_MEMORY = 3.0  # seconds of NACKs that tell how much the link loses of its own
PROBE_LOSS_RISE = 0.03  # a probe on a clean link (less NACKed loss than this) fails when a report shows this much
ASKED_LEARNING = 0.03  # weight of each report in the link's own level of NACKed loss
# The link's own loss learned by this weight from reports of a calm link (no probe running, no queue by the round
# trip or the per-packet delay), for what depends on the loss alone (own_loss: whether each video resend goes
# twice, and how much loss a queue may show before it reads as overflowing).
# ASKED_LEARNING alone learned a link losing 5 % of its own (nara bench adapt's loss5) as one losing 2 % only
# after 20 s: until then each resend went once, and one lost too brought its frame a round trip late
# (docs/benchmarks.md, issue 5, "A lossy link's resends twice from its first seconds"). Growth stays on the slow
# level: it holds growth on a lossy link, and the link then has room for the repairs.
ASKED_LEARNING_CALM = 0.2
# A probe overshooting a thin link fills its queue, and audio waits in that queue too:
# probes step from what the link has carried, close in on a rate that failed, and stop
# at the first sign of queueing.
FIRST_PROBE_STEP = 2.0  # the first probe reaches this multiple of what the link has carried
PROBE_STEP = 1.5  # later ones this multiple of the usable estimate
CEILING_GAP = 1.2  # a failed rate further than this above the usable estimate: probe halfway to it
PROBE_ABOVE_CEILING = 1.1  # closer: probe this far above it (has the link grown?)
PROBE_BACKOFF = (2.0, 4.0, 8.0, 16.0, 30.0)  # seconds between probes after 1, 2, 3, 4, 5+ failures in a row
BASE_RTT_WINDOW = 30.0
DELIVERED_FLOOR = 0.9  # a cut keeps at least this share of what the link just delivered
QUEUE_DRAIN_FLOOR = 0.75  # ... a cut for a standing queue, this share: less than the link delivers drains it
REMB_DELIVERED_FLOOR = 1.0  # ... a cut to a REMB, all of it
DELIVERED_FRESH = 2.0  # seconds a delivered rate stays usable
PACKET_OVERHEAD = 40  # bytes of SRTP, UDP and IP around each payload
# With per-packet delay feedback:
PER_PACKET_FRESH = 2.0  # seconds a transport feedback keeps the faster rules on
OVERUSE_CUT = 0.85  # times the acknowledged rate
# What arrived at this share of the rate it was sent at or more: the link kept up with what it was given. An
# overuse then is a burst's queue (a keyframe paced at 1.25 times an estimate near the link's capacity), not
# the link full on average: a subscriber held to a layer's rate sends far less than its estimate, and a cut to
# 0.85 times that (on a 1 Mbit/s link with 5 % loss, 927 kbit/s to 361 after each probe) sent it down a layer
# for seconds. Such an overuse cuts the estimate once, by ``OVERUSE_CUT``, until the detector reads normal.
KEPT_UP = 0.9
# ... and no more of what was sent lost than the link loses of its own and this much more. A queue full to
# overflowing keeps what the link carries and passes that on as fast as it came: a link that fell from 2 Mbit/s
# to 300 kbit/s lost four packets in five, and read as keeping up, it was cut by 0.85 where it needed 0.15. A
# keyframe's burst into a full queue loses a few; a link with 5 % loss of its own (repaired by NACK) loses that
# much; cut to 0.85 times what a layer sends, the subscriber went down a layer for seconds.
OVERFLOW_LOSS = 0.3
# ... with a standing queue: the newest arrival this much over the least one-way delay lately. A queue that drops
# is full, and holds what it keeps; losses without one are the link's own (nara bench adapt's burst10, 10 % in
# bursts of 3: a third of the half second's few packets lost at the start, read as overflow, cut the 300 kbit/s
# guess on a 1 Mbit/s link to 38 kbit/s and paused the video).
OVERFLOW_QUEUE = 0.05
# Seconds between cuts, and no more: not a round trip. Under a standing queue the round trip is the queue's
# (a 400 ms queue on a link that fell from 1.5 Mbit/s to 250 kbit/s held the second cut back for 0.8 s, and the
# estimate sat 40 % over the link until the queue drained). Each cut is to what arrived, not a share of the
# estimate, so cutting again within the queue's round trip cannot fall far under the link.
OVERUSE_CUT_INTERVAL = 0.2
# What arrives falling under this share of what arrived when a probe ended, or a queue overflowing with the
# stream's own packets (``OVERFLOW_LOSS``), is the link falling, not the probe's queue: it cuts even
# right after a probe (a link that drops from 2 Mbit/s to 300 kbit/s as a probe ends would otherwise be flooded
# for the rest of the probe's blame).
LINK_FELL = 0.5
GROWTH_PER_PACKET = 1.08  # a second, while the delay detector reads normal (whatever loss the link has of its own)
GROWTH_ABOVE_ACKED = 1.5  # ... up to this multiple of what the receiver acknowledged
PROBE_TIME_PER_PACKET = 0.15  # seconds a cluster of padding lasts at most
PROBE_TIME_LONGEST = 0.6  # ... or, after clusters whose padding fell short of their rate, up to this
CLUSTER_FULL = 0.9  # a cluster that went out at this share of its rate lets the next be shorter again
PROBE_CALM_PER_PACKET = 0.5  # seconds without a cut (or after the link is first heard from) before probing
PROBE_SETTLE_PER_PACKET = 0.5  # seconds after a failed probe whose overuse is its own doing
PROBE_STEPS_PER_PACKET = (2.0, 2.0)  # the first probes' steps: to 2x what was carried, then 4x
PROBE_STREAK_STEP = 2.0  # a probe right after one that worked steps this far (1.5x otherwise)
# (Past three failures in a row, 8 s: on a full 150 kbit/s link each failed probe still holds the sound back by tens
# of ms, and probes every 4 s found the same link each time.)
PROBE_BACKOFF_PER_PACKET = (1.0, 2.0, 4.0, 8.0, 8.0)
# A link that has carried this many times the usable estimate fell (a cell's edge, a handover) and may come back
# as suddenly: probes back off no longer than ``FALLEN_BACKOFF`` (a rate that failed a few times in a row held the
# next probe off for 4 s, and the climb back to 2 Mbit/s began up to 3 s after the link was back), and one that
# worked on time steps on by ``PROBE_STREAK_STEP`` instead of closing in on a rate that failed while it was low.
FALLEN = 3.0
FALLEN_BACKOFF = 2.0
PROBE_DELAY_RISE = 0.025  # seconds a probe's packets' one-way delay may grow
PROBE_RECEIVED_SHARE = 0.85  # a probe's packets must arrive at least this share of the rate they were sent at
PROBE_REACHED = 0.7  # padding that reached this share of a probe's rate proves the rate (it runs a little short)
CLUSTER_SHARE = 0.9  # a cluster that found the link full moves the estimate to this share of its arrival rate
CLUSTER_ON_TIME = 0.97  # ... one arriving slower than this share of its send rate proves only what arrived
# ... and backs off as a failure unless that lifted the usable estimate by this much: after a link came back to
# 2 Mbit/s, clusters arriving at 0.92-0.95 of their rate (the publisher's keyframes at a new size beside them) each
# proved 15-25 % more, and each backed the next off longer (1, 2, then 4 s), holding the climb at 1.3 Mbit/s.
CLUSTER_GAINED = 1.1
CLUSTER_MARKERS = 5  # a cluster needs this many of its packets noted by the receiver to be measured


@dataclass(frozen=True)
class ClusterRates:
    """The rates a probe's cluster was sent and arrived at, bit/s."""

    sent: float
    arrived: float


def cluster_rates(packets: list[PacketResult]) -> ClusterRates | None:
    """The rates a cluster of packets was sent and arrived at, from their feedback (None: too few noted).

    The packets the receiver noted mark the cluster (a probe's padding, dropped as replays, never
    is): every byte sent after the first of them up to the last, padding and losses included
    (they crossed the same bottleneck, or were lost at it), over the span the two were sent in and
    over the span they arrived in. The first marker's own size is left out: its arrival is where
    the span begins."""
    ordered = sorted(packets, key=lambda r: r.sent)
    noted = [(i, r.arrival) for i, r in enumerate(ordered) if r.arrival is not None and not r.copy]
    if len(noted) < CLUSTER_MARKERS:
        return None
    (first, first_arrival), (last, last_arrival) = noted[0], noted[-1]
    bits = sum(r.size for r in ordered[first + 1:last + 1]) * 8
    sent_span, arrival_span = ordered[last].sent - ordered[first].sent, last_arrival - first_arrival
    if sent_span <= 0 or bits <= 0:
        return None
    return ClusterRates(sent=bits / sent_span, arrived=bits / max(arrival_span, 1e-6))


@dataclass
class DeliveryMeter:
    """What one stream's receiver reports say reached the subscriber, in bit/s (headers included)."""

    last: tuple[float, int, int, int, int] | None = None  # time, highest seq, lost, packets sent, octets sent
    rate: float | None = None
    at: float | None = None

    def update(self, now: float, highest: int, lost: int, sent_packets: int, sent_octets: int) -> float | None:
        if self.last is not None and now - self.last[0] < 0.2:
            return self.rate  # too close to the last report to measure anything
        last, self.last = self.last, (now, highest, lost, sent_packets, sent_octets)
        if last is None:
            return self.rate
        elapsed = now - last[0]
        received = max((highest - last[1]) - (lost - last[2]), 0)
        packets, octets = sent_packets - last[3], sent_octets - last[4]
        size = (octets / packets if packets > 0 else 0.0) + PACKET_OVERHEAD
        self.rate, self.at = received * size * 8 / elapsed, now
        return self.rate


@dataclass
class NackLoss:
    """The share of one stream's packets its receiver asked for again, between two reports.

    A receiver report's own loss fraction counts a packet that came back when
    asked for as received, so on a link whose losses are repaired it reads
    nothing at all, congestion included; the asks are still there to count.
    """

    last: tuple[int, int] | None = None  # packets sent, packets asked for

    def update(self, sent_packets: int, nacked: int) -> float:
        last, self.last = self.last, (sent_packets, nacked)
        if last is None or sent_packets <= last[0]:
            return 0.0
        return min(max(nacked - last[1], 0) / (sent_packets - last[0]), 1.0)


@dataclass
class Probe:
    rate: float
    start: float
    base_rtt: float
    worst_queue: float  # the most queueing any round trip showed during the probe, seconds
    nack_rate: float  # packets a second the link lost (NACKed) before the probe
    asked_before: float = 0.0  # the NACKed loss before the probe
    duration: float = PROBE_TIME  # seconds of padding
    packets: list[PacketResult] = field(default_factory=list)  # its packets' feedback (per-packet feedback only)
    stopped: bool = False  # its padding was stopped early: its packets showed a queue growing
    per_packet: bool = False  # judged by its own packets' delay and arrival (then never by NACKs)


@dataclass
class BandwidthEstimate:
    # Start low: a rural link may carry 150 kbit/s, and a flood at the start of a
    # call costs everyone's audio. The first probe lifts a good link within seconds.
    estimate: float = 300_000.0
    minimum: float = 30_000.0
    maximum: float = 4_000_000.0
    remb: float | None = None
    loss: float = 0.0  # fraction lost, smoothed over the last few reports
    asked: float = 0.0  # fraction NACKed, smoothed the same way
    asked_level: float | None = None  # the link's own level of NACKed loss, learned slowly
    calm_asked_level: float | None = None  # the same, learned sooner from calm reports only (ASKED_LEARNING_CALM)
    rtt: float = 0.1  # seconds, the last one reported
    queue_delay: float = 0.0  # how far that round trip is above its stream's lowest, seconds
    bases: dict[str, tuple[float, float]] = field(default_factory=dict)  # stream -> (lowest round trip, when)
    queues: dict[str, tuple[float, float]] = field(default_factory=dict)  # stream -> (its last queueing, when)
    reports: int = 0
    last_growth: float | None = None
    last_cut: float | None = None
    probe: Probe | None = None
    last_probe_end: float | None = None
    blame_until: float = 0.0  # until then, signs of overuse are the last probe's doing, not the link's
    blame_acked: float = 0.0  # ... unless what arrives falls under LINK_FELL of what had arrived (bit/s) then
    failed_probes: int = 0  # in a row
    ceiling: float | None = None  # the lowest rate a probe failed at since the link last showed it could do more
    probes: int = 0
    successful_probes: int = 0
    delivered: float | None = None  # what the link carried to this subscriber lately, bit/s
    delivered_at: float | None = None
    carried: float = 0.0  # the most the link has been seen to carry, bit/s (delivered, or a probe that worked)
    confirmed: bool = False  # whether delivery has borne the estimate out; until then it is the starting guess
    heard_at: float | None = None  # first report from this link
    nacks: deque[tuple[float, int]] = field(default_factory=deque)  # (when, packets) of the last few seconds
    rembs: deque[tuple[float, float]] = field(default_factory=deque)  # (when, bit/s) of the last REMB_WINDOW
    per_packet_at: float | None = None  # the last transport feedback
    acked: float | None = None  # what the receiver acknowledged lately, bit/s (per-packet feedback)
    overuse_cuts: int = 0
    delay_state: str = NORMAL  # the delay detector's, after the last transport feedback
    measured: float | None = None  # the link's capacity the last full cluster arrived at, bit/s
    _streak: bool = False  # the last probe worked, judged by its own packets
    idle_until: float = 0.0  # no probe before then: the last one could not pad, and proved nothing
    cluster_time: float = PROBE_TIME_PER_PACKET  # seconds the next cluster lasts at most
    _burst_cut: bool = False  # this overuse, the link keeping up, has cut once (``KEPT_UP``)

    def on_nack(self, now: float, packets: int = 1) -> None:
        """The subscriber reports ``packets`` lost. During a probe on a clean link, any loss is the
        probe overflowing a queue; this stops it within a round trip, long before the next receiver
        report could. (A link that loses packets of its own loses them in bursts, whatever is sent:
        there its NACKs say nothing about a probe, which is judged by delay and REMB.)"""
        while self.nacks and self.nacks[0][0] < now - NACK_MEMORY:
            self.nacks.popleft()
        self.nacks.append((now, packets))
        probe = self.probe
        if probe is not None and self.padding(now) and not self._lossy(probe) and not probe.per_packet:
            self._fail_probe(now)

    def on_delivered(self, rate: float, now: float) -> None:
        self.delivered, self.delivered_at = rate, now
        self._carried(rate)

    def _carried(self, rate: float) -> None:
        """The link was seen to carry ``rate``: once that is as much as the estimate, the estimate is confirmed."""
        self.carried = max(self.carried, rate)
        if self.carried >= self.estimate:
            self.confirmed = True

    @property
    def known(self) -> bool:
        """Whether anything has been heard from this link yet."""
        return self.remb is not None or self.last_growth is not None

    @property
    def usable(self) -> float:
        """The estimate as far as delivery has borne it out: until it has been confirmed, no more
        than the link has been seen to carry. A subscriber moves up, and probes step, from this; the
        guess itself only keeps a subscriber where it is (it moves no one down on no evidence)."""
        return self.estimate if self.confirmed else min(self.estimate, self.carried)

    @property
    def base_rtt(self) -> float | None:
        """The lowest round trip any stream has shown lately."""
        return min(base for base, _ in self.bases.values()) if self.bases else None

    def on_remb(self, bitrate: float, now: float, sending: float | None = None) -> None:
        """A REMB; ``sending``: what goes toward this receiver now (audio and video, bit/s)."""
        self.remb = max(bitrate, self.minimum)
        while self.rembs and self.rembs[0][0] < now - REMB_WINDOW:
            self.rembs.popleft()
        peak = max((value for _, value in self.rembs), default=None)
        self.rembs.append((now, self.remb))
        if peak is None or self.remb >= peak * REMB_FALL:
            return
        if sending is not None and self.remb >= sending * REMB_ROOM and self.probe is None:
            return  # it still allows more than is sent: it sank with what arrives, not for overuse
        self.rembs.clear()
        if self.probe is not None:
            self._fail_probe(now)  # the receiver sees the probe overflow its link: the padding stops, that is all
            return
        if now < self.blame_until:
            return  # what the failed probe left in the queue
        if self.remb < self.estimate:
            value = self.remb
            if self.per_packet(now) and self.acked is not None:
                # The per-packet feedback says what arrives: a REMB far under it is the receiver's estimator
                # overshooting a fall (aiortc's REMB sank to 63 kbit/s on a link fallen to 300 kbit/s, where
                # 160 kbit/s was arriving, and paused the video for seconds). Cut as an overuse would.
                value = max(value, self.acked * OVERUSE_CUT)
            self._cut_to(value, now, floor=REMB_DELIVERED_FLOOR)

    def on_rtt(self, rtt: float, now: float, stream: str = "") -> None:
        """A round trip measured on one of the link's streams (``stream`` names it)."""
        if rtt <= 0:
            return
        self.rtt = rtt
        base = self.bases.get(stream)
        if base is None or rtt <= base[0] or now - base[1] > BASE_RTT_WINDOW:
            base = self.bases[stream] = (rtt, now)
        self.queue_delay = rtt - base[0]
        self.queues[stream] = (self.queue_delay, now)
        if self.probe is not None:
            self.probe.worst_queue = max(self.probe.worst_queue, self.queue_delay)
            if self._probe_failed(self.probe):
                self._fail_probe(now)  # a queue is building: stop padding now, not at the end
        elif self.queue_delay > QUEUE_LIMIT and self._may_cut(now) and now >= self.blame_until:
            # Sending what the link delivers keeps a standing queue standing: below it, the queue drains.
            self._cut_to(self.estimate * QUEUE_CUT, now, floor=QUEUE_DRAIN_FLOOR)

    def on_report(self, fraction_lost: int, now: float, asked: float | None = None) -> None:
        """A receiver report: ``fraction_lost`` is RFC 3550's 8-bit fixed-point fraction;
        ``asked``, the share of the stream's packets NACKed since the last report."""
        loss = max(0, min(fraction_lost, 255)) / 256
        first = self.reports == 0
        self.reports += 1
        if asked is not None:
            if (self.probe is not None and not self._lossy(self.probe) and not self.probe.per_packet
                    and asked > PROBE_LOSS_RISE):
                self._fail_probe(now)  # a clean link losing: the probe overflows it
            self.asked = asked if first else LOSS_SMOOTHING * asked + (1 - LOSS_SMOOTHING) * self.asked
            level = self.asked if self.asked_level is None else self.asked_level
            self.asked_level = level + ASKED_LEARNING * (self.asked - level)
            if self._calm():
                calm = self.asked_level if self.calm_asked_level is None else self.calm_asked_level
                self.calm_asked_level = calm + ASKED_LEARNING_CALM * (self.asked - calm)
        self._finish_probe(now)
        if self.heard_at is None:
            self.heard_at = now
        self.loss = loss if first else LOSS_SMOOTHING * loss + (1 - LOSS_SMOOTHING) * self.loss
        if self.probe is not None:
            return  # padding duplicates hide loss; the probe is judged by delay
        excess = self.asked - (self.asked_level or 0.0)
        if self.loss > CUT_ABOVE:
            if self._may_cut(now) and now >= self.blame_until:
                self._cut_to(self.estimate * (1 - self.loss / 2), now)
        elif self.per_packet(now):
            pass  # (the delay of each packet says when to grow: ``_grow_per_packet``)
        elif self.loss < GROW_BELOW and excess < GROW_BELOW and self.queue_delay < QUEUE_CALM:
            if self.last_growth is None:
                self.last_growth = now
            elapsed = now - self.last_growth
            if elapsed >= 1.0:
                if self.confirmed:  # (a guess does not grow: it is not a measure of anything)
                    self.estimate = self._bounded(self.estimate * GROWTH ** min(elapsed, 5.0))
                self.last_growth = now
        elif self.last_growth is None:
            self.last_growth = now  # heard from: the estimate is now known

    # --- probing -------------------------------------------------------------------

    def probe_rate(self, now: float, wanted: float) -> float | None:
        """The rate the link is being probed at, or None.

        ``wanted`` is what this subscriber could use if the link allowed it (the
        next layer up, or more of the original). A probe starts when that is
        more than the estimate, the link has been clean for a while, and the
        back-off after failed probes has passed.
        """
        self._finish_probe(now)
        if self.probe is not None:
            return self.probe.rate  # until its verdict
        usable = self.usable
        target = min(wanted, self._probe_reach(usable), self.maximum)
        if target <= usable * 1.05 or not self.known:  # (nothing seen to arrive yet: usable is 0)
            return None
        calm_since = max(t for t in (self.last_cut, self.last_probe_end, -1e9) if t is not None)
        # (right after a probe that worked, the next follows at once)
        per_packet = self.per_packet(now)
        backoffs = PROBE_BACKOFF_PER_PACKET if per_packet else PROBE_BACKOFF
        backoff = backoffs[min(self.failed_probes, len(backoffs)) - 1] if self.failed_probes else 0.0
        if per_packet and self._fallen():
            backoff = min(backoff, FALLEN_BACKOFF)  # (it may come back any moment: a late probe leaves it unused)
        calm = PROBE_CALM_PER_PACKET if per_packet else PROBE_CALM
        if self.last_cut is not None and now - self.last_cut < calm:
            return None
        if self.heard_at is None or now - self.heard_at < calm:
            return None  # watch a new link for a moment (its base round trip, its loss) first
        # Loss below the cutting threshold with a flat round trip is the link's own
        # (radio) loss, not congestion: it does not stop a probe, which is judged by delay.
        if now - calm_since < backoff or self.loss > CUT_ABOVE or self.queue_delay >= QUEUE_CALM:
            return None
        if now < self.idle_until:
            return None  # (the last could not pad: it proved nothing)
        if per_packet and self.delay_state != NORMAL:
            return None  # (a queue growing, or one still draining: the probe would only add to it)
        self.probe = Probe(rate=target, start=now, base_rtt=self.base_rtt or self.rtt, worst_queue=self.queue_delay,
                           nack_rate=self._nack_rate(now), asked_before=self.asked,
                           duration=self.cluster_time if per_packet else PROBE_TIME, per_packet=per_packet)
        self.probes += 1
        return target

    def _probe_reach(self, usable: float) -> float:
        """How far the next probe goes: a step above the usable estimate (the first, twice what the
        link has carried); after a failure, halfway to the lowest rate that failed, or, once close
        under it, a little above it."""
        if self.ceiling is None:
            if self.per_packet_at is not None and self.successful_probes == self.probes < len(PROBE_STEPS_PER_PACKET):
                return usable * PROBE_STEPS_PER_PACKET[self.probes]  # (the start, while every probe worked)
            if self.per_packet_at is not None and self.probes and self.failed_probes == 0 and self._streak:
                return usable * PROBE_STREAK_STEP
            return usable * (FIRST_PROBE_STEP if self.probes == 0 else PROBE_STEP)
        if self._streak and self.per_packet_at is not None and self._fallen():
            # (the last worked on time, far under what the link has carried: it may be back)
            return max(self.ceiling * PROBE_ABOVE_CEILING, usable * PROBE_STREAK_STEP)
        if self.ceiling > usable * CEILING_GAP:
            if self._streak:  # (the last one worked on time: the link may have grown since that rate failed)
                return self.ceiling * PROBE_ABOVE_CEILING
            return (usable + self.ceiling) / 2
        return max(self.ceiling, usable) * PROBE_ABOVE_CEILING

    def _fallen(self) -> bool:
        """Whether the link has carried ``FALLEN`` times the usable estimate or more: it fell, and may come back."""
        return self.carried >= self.usable * FALLEN

    def _calm(self) -> bool:
        """Whether losses now are the link's own: no probe running, no queue by the round trip, nor by the
        per-packet delay where it comes."""
        return self.probe is None and self.queue_delay < QUEUE_CALM and self.delay_state != OVERUSE

    def _nack_rate(self, now: float) -> float:
        recent = sum(n for t, n in self.nacks if t >= now - NACK_MEMORY)
        return recent / NACK_MEMORY

    def padding(self, now: float) -> bool:
        """Whether a probe wants the stream padded right now (its verdict comes a little later)."""
        return self.probe is not None and now - self.probe.start < self.probe.duration

    def _finish_probe(self, now: float) -> None:
        probe = self.probe
        if probe is None or now - probe.start < probe.duration + PROBE_SETTLE:
            return
        if probe.stopped:
            self._streak = False
            self._fail_probe(now)  # (its feedback never covered it)
            return
        self._verdict(probe, now, not self._probe_failed(probe), probe.rate)

    def _verdict(self, probe: Probe, now: float, worked: bool, rate: float) -> None:
        self.probe = None
        self.last_probe_end = now
        if worked:
            proven = rate * 0.95
            self.estimate = self._bounded(max(self.estimate, proven))
            self._carried(proven)
            self.failed_probes = 0
            self.successful_probes += 1
            self.last_growth = now
            if self.ceiling is not None and rate >= self.ceiling * 1.05:
                self.ceiling = None  # the link carries more than it did when that probe failed
        else:
            self._failed(probe, now)

    def _fail_probe(self, now: float) -> None:
        if self.probe is not None:
            self._failed(self.probe, now)
        self.probe = None
        self.last_probe_end = now

    def _failed(self, probe: Probe, now: float) -> None:
        self.failed_probes += 1
        self.ceiling = probe.rate if self.ceiling is None else min(self.ceiling, probe.rate)
        self.blame_until = now + (PROBE_SETTLE_PER_PACKET + (self.base_rtt or self.rtt) if probe.packets
                                  else PROBE_SETTLE)
        self.blame_acked = self.acked or 0.0

    @staticmethod
    def _lossy(probe: Probe) -> bool:
        """Whether the link lost packets of its own before the probe."""
        return probe.nack_rate > 0 or probe.asked_before >= PROBE_LOSS_RISE

    @staticmethod
    def _probe_failed(probe: Probe) -> bool:
        return probe.worst_queue > max(QUEUE_CALM, probe.base_rtt * 0.5)

    # --- per-packet delay feedback ---------------------------------------------------

    def per_packet(self, now: float) -> bool:
        """Whether this subscriber's per-packet delay feedback is coming."""
        return self.per_packet_at is not None and now - self.per_packet_at < PER_PACKET_FRESH

    def on_transport_feedback(self, results: list[PacketResult], state: str, acked: float | None,
                              now: float, sent: float | None = None, lost: float = 0.0,
                              arriving: float | None = None, queued: float | None = None) -> None:
        """One transport feedback packet: ``results``, its packets matched to what was sent; ``state``,
        the delay detector's after them; ``acked``, what the receiver acknowledged lately (bit/s); ``sent``,
        the rate those packets were sent at (bit/s); ``lost``, the share lost of what was sent meanwhile;
        ``arriving``, what arrives over the last fifth of a second (bit/s); ``queued``, the newest arrival's
        one-way delay over the least lately (seconds; None: not known, and no bar to an overflow)."""
        if state != OVERUSE:
            self._burst_cut = False
        self.per_packet_at = now
        self.delay_state = state
        if self.heard_at is None:
            self.heard_at = now
        if self.last_growth is None:
            self.last_growth = now  # heard from: the estimate is now known
        if acked is not None:
            self.acked = acked
            self._carried(acked)
        # A queue overflowing with the stream's own packets (not copies: padding, resends) is a full link, even before
        # the delay detector's trend reads overuse: a queue of 300 ms at 300 kbit/s fills in 60 ms at 1.8 Mbit/s,
        # and the losses are in the next feedback, where the trend took most of a second to cross its threshold.
        # (only for losses of packets sent after the last cut: the share counts half a second of losses, and cut
        # again for those the last cut already answered, to 0.85 times what arrives each time, a link that fell to
        # 300 kbit/s was cut to 53 kbit/s and its video paused)
        # A queue that drops is a full one: losses with none standing are the link's own (``OVERFLOW_QUEUE``).
        overflowing = (lost > self.own_loss() + OVERFLOW_LOSS and (queued is None or queued >= OVERFLOW_QUEUE)
                       and any(r.arrival is None and not r.copy and (self.last_cut is None or r.sent > self.last_cut)
                               for r in results))
        probe = self.probe
        if probe is not None:
            probe.packets.extend(r for r in results if probe.start <= r.sent < probe.start + probe.duration)
            if state == OVERUSE and not probe.stopped and not any(r.arrival is not None for r in probe.packets):
                # The queue grew before any of the probe's packets arrived: the link's doing, not the probe's (a link
                # that fell from 2 Mbit/s to 300 kbit/s just as a probe started went uncut for the probe's blame).
                # The probe is dropped, no failure, and the overuse cuts as any other.
                self.probe = probe = None
                self.last_probe_end = now
        if probe is not None:
            self.last_growth = now  # (a probe's verdict decides, not growth)
            if not probe.stopped and (state == OVERUSE or self._delay_rise(probe) > PROBE_DELAY_RISE):
                probe.stopped = True  # the queue grows: the padding stops now, and the cluster ends here
                probe.duration = min(probe.duration, max(now - probe.start, 0.0))
            if any(r.sent >= probe.start + probe.duration for r in results):  # feedback has covered all of it
                self._judge_cluster(probe, now)
        elif ((state == OVERUSE or overflowing) and acked is not None
              and (now >= self.blame_until or acked < self.blame_acked * LINK_FELL or overflowing)
              and (self.last_cut is None or now - self.last_cut >= OVERUSE_CUT_INTERVAL)):
            kept_up = sent is not None and acked >= sent * KEPT_UP and not overflowing
            if kept_up and acked < self.estimate:
                if not self._burst_cut:  # (the link kept up: a burst's queue, once)
                    self._burst_cut = True
                    self.overuse_cuts += 1
                    self._cut_to(self.estimate * OVERUSE_CUT, now, floor=0.0)
            else:
                # (what arrives now, if less: the half second's average still holds what came before a fall)
                self.overuse_cuts += 1
                self._cut_to(min(acked, arriving or acked) * OVERUSE_CUT, now, floor=0.0)
        else:
            self._grow_per_packet(state, now)

    def own_loss(self) -> float:
        """The share of packets the link loses of its own, as far as it is known: NACKed loss, learned slowly,
        so that a queue that starts to overflow does not move it, or sooner from reports of a calm link."""
        return max(self.asked_level or 0.0, self.calm_asked_level or 0.0)

    def _grow_per_packet(self, state: str, now: float) -> None:
        """Grow ``GROWTH_PER_PACKET`` a second while the delay detector reads normal and no more is lost than
        the link loses of its own; no further than ``GROWTH_ABOVE_ACKED`` times what the receiver acknowledged
        (a publisher sending less than the estimate would leave it growing on nothing)."""
        last, self.last_growth = self.last_growth, now
        if last is None or not self.confirmed or state != NORMAL or now < self.blame_until:
            return
        excess = self.asked - (self.asked_level or 0.0)
        if self.loss > CUT_ABOVE or excess >= GROW_BELOW or self.acked is None:
            return
        limit = self.acked * GROWTH_ABOVE_ACKED
        if self.estimate < limit:
            self.estimate = self._bounded(min(self.estimate * GROWTH_PER_PACKET ** min(now - last, 1.0), limit))

    def _judge_cluster(self, probe: Probe, now: float) -> None:
        """A probe's cluster, all its packets' feedback in: proven, or the link's capacity measured."""
        rates = cluster_rates(probe.packets)
        if rates is None:
            self._streak = False
            self._fail_probe(now)  # (too few of its packets came back to say anything)
            return
        stretched = rates.arrived < rates.sent * PROBE_RECEIVED_SHARE
        if not probe.stopped and not stretched:
            reached = rates.sent >= probe.rate * PROBE_REACHED
            rate = probe.rate if reached else rates.sent
            if not reached:
                self.cluster_time = min(self.cluster_time * 2, PROBE_TIME_LONGEST)
            elif rates.sent >= probe.rate * CLUSTER_FULL:
                self.cluster_time = max(self.cluster_time / 2, PROBE_TIME_PER_PACKET)
            if rate * 0.95 <= self.usable:
                # Its padding could not go: it proved nothing. The padding repeats a packet sent lately, and a low
                # layer's packets come a frame apart: a short cluster may end before its padding had much to
                # repeat, so the next is longer and follows at once. Once at the longest (or with nothing to pad
                # with at all: a paused subscriber), the next waits a back-off (one after another, they would hold
                # off the growth between them for good).
                self._streak = False
                self.probe = None
                # What padding did go queued all the same: that queue is the probe's doing too (nara bench adapt's
                # step, at 300 kbit/s: read as overuse a moment later, it cut 263 kbit/s to 88 just before the
                # link rose, and the rise took 9 s from there).
                self._blame_probe(now)
                if probe.duration >= PROBE_TIME_LONGEST:
                    self.last_probe_end = now
                    self.idle_until = now + PROBE_BACKOFF_PER_PACKET[0]
                return  # (else the next goes at once: this one was no failure, and restarts no back-off)
            # Arrived a little slower than sent: the link is about full, at what arrived.
            self._streak = rates.arrived >= rates.sent * CLUSTER_ON_TIME
            failed, before = self.failed_probes, self.usable
            self._verdict(probe, now, True, rate if self._streak else min(rate, rates.arrived))
            if not self._streak:
                if self.usable < before * CLUSTER_GAINED:
                    self.failed_probes = failed + 1  # (backs off, as below: the next would find the same)
                # (and the queue it left is its own doing: on a 1 Mbit/s link with 100 ms of round trip, read as
                # overuse, it cut the estimate it had just proven to 0.85 times what the publisher was sending)
                self._blame_probe(now)
            return
        self._streak = False
        self._fail_probe(now)  # (backs off: probes just above a full link, one after another, keep it full)
        if not stretched or rates.arrived <= self.usable:
            # Stopped before its packets showed how much the link carries; or they show no more than is used,
            # which is a cluster's few packets spread by jitter, not the link (on a lossy link with 100 ms of
            # round trip, taken as the capacity it paused the video for ten seconds). (Not what the link has
            # ever carried: after a link fell from 2 Mbit/s and came back, clusters stopped by the queue they
            # made arrived at 1.97 Mbit/s, no more than before the fall, and measured nothing.)
            return
        # The link is full: what the cluster arrived at is what it carries.
        capacity = rates.arrived
        self.ceiling = capacity
        self.measured = capacity
        found = self._bounded(capacity * CLUSTER_SHARE)
        self.estimate = found if not self.confirmed else max(self.estimate, found)
        self._carried(found)

    def _blame_probe(self, now: float) -> None:
        """The queue a probe's cluster left, and the delay it shows for a moment, are the probe's doing."""
        self.blame_until = now + PROBE_SETTLE_PER_PACKET + (self.base_rtt or self.rtt)
        self.blame_acked = self.acked or 0.0

    @staticmethod
    def _delay_rise(probe: Probe) -> float:
        """How much the one-way delay of a probe's packets grew so far: its latest quarter's average
        over its first quarter's lowest (0 before eight of them came back). Its padding counts: it crosses
        the same queue. (Counting the media alone, a 150 kbit/s link's seven frames a second took half a
        second to bring eight back, and a probe at 1.5 times the link padded on that long: the queue it
        left held the audio 150-200 ms, and each probe cost 0.3-0.6 s of sound.)"""
        delays = [r.arrival - r.sent for r in sorted(probe.packets, key=lambda r: r.sent) if r.arrival is not None]
        if len(delays) < 8:
            return 0.0
        quarter = len(delays) // 4
        return sum(delays[-quarter:]) / quarter - min(delays[:quarter])

    # --- helpers ----------------------------------------------------------------------

    def transit(self, now: float) -> float | None:
        """How long after a packet is sent its loss could first be known: the lowest round trip plus
        the most queueing any stream showed in its latest report (a packet asked for sooner is most
        likely still in the queue). None before any round trip."""
        base = self.base_rtt
        if base is None:
            return None
        return base + max((q for q, at in self.queues.values() if now - at < QUEUE_FRESH), default=0.0)

    def _may_cut(self, now: float) -> bool:
        # Once per round trip, and no more often than reports can show the effect of the last cut.
        return self.last_cut is None or now - self.last_cut >= max(self.rtt, MIN_CUT_INTERVAL)

    def _cut_to(self, value: float, now: float, floor: float = DELIVERED_FLOOR) -> None:
        if self.delivered is not None and self.delivered_at is not None and now - self.delivered_at < DELIVERED_FRESH:
            value = max(value, self.delivered * floor)
        lowered = self._bounded(min(value, self.estimate))
        if lowered < self.estimate:
            # (only a cut that lowered the estimate waits for its effect: one held up by what the link delivered
            # changed nothing, and stamping it as a cut held the per-packet cuts off for as long as reports came)
            self.last_cut = now
        self.estimate = lowered
        self._carried(0.0)  # (a cut to what the link has carried confirms the estimate)
        self.last_growth = now  # no growth straight after a cut
        self.ceiling = None  # the link has changed: what failed before says nothing now

    def _bounded(self, value: float) -> float:
        return max(self.minimum, min(value, self.maximum))
