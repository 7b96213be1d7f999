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
* Queueing: a round trip that has grown well above the lowest one seen means a
  queue is filling somewhere (rural links have deep buffers and lose late):
  we send more than the link carries, and what it delivered is its capacity.
  Cut, once per round trip, to 85 % of that (as GCC does on overuse), or by
  15 % while nothing delivered is known, and do not grow while it persists. Each
  stream's round trip is compared with that stream's own lowest: streams of
  one link report round trips some tens of milliseconds apart (how long each
  one's reports wait), and mixing them would read as a queue.
* REMB: a receiver's REMB falls when it has seen its link overuse, so a
  falling REMB cuts the estimate to it, if our own round trips bear it out
  (some queueing): aiortc's estimator also falls when retransmissions arrive
  out of order on a lossy link that is far from full. A REMB that merely lags behind (it can
  never exceed 1.5 times what arrives) is not a ceiling: that would stop every
  ramp-up.
* Delivered: receiver reports say how many packets arrived; times the size of
  what was sent, that is what the link carried. A cut never goes below 90 % of
  it: after a flood, the estimate lands on the link's capacity instead of
  collapsing to the floor (which would pause video a 150 kbit/s link can carry).
* Probing: growing 5 % a second takes half a minute to double, too slow after
  a link comes back. When the link has been clean for a while and more would
  be used, the sender pads the stream up to a probe rate for a moment; if the
  round trip stays flat, the estimate jumps to that rate. Duplicate padding
  hides loss from receiver reports, so a probe is judged by delay, and by NACKs
  on a link that was clean before it (on a link with loss of its own, NACKs say
  nothing about the probe; retransmissions hide that loss from receiver reports
  too, so a NACK shortly before the probe is what tells), and there by loss
  clearly above what the link lost before; the loss-based rule takes over again as soon as it
  ends. A probe that succeeded is followed at once by one twice as high, so a
  link that came back is found in a few probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROW_BELOW = 0.02
CUT_ABOVE = 0.10
GROWTH = 1.05
LOSS_SMOOTHING = 0.6  # weight of the newest report's loss
MIN_CUT_INTERVAL = 0.5  # seconds
QUEUE_CUT = 0.85
QUEUE_LIMIT = 0.12  # seconds of queueing above the base round trip that count as congestion
QUEUE_CALM = 0.05  # seconds: below this, the queue is empty enough to grow or probe
REMB_FALL = 0.9  # a REMB under 90 % of the previous one reports overuse

PROBE_TIME = 1.0  # seconds the padding lasts
PROBE_SETTLE = 1.0  # seconds after the padding for the last report to come back
PROBE_CALM = 2.0  # seconds without a cut before probing
NACK_MEMORY = 3.0  # seconds: a NACK this recent means the link loses packets of its own
PROBE_LOSS_RISE = 0.03  # a probe fails when a report shows this much more loss than before it
# A probe overshooting a thin link fills its queue, and audio waits in that queue too:
# probes step gently and stop at the first sign of queueing.
PROBE_STEP = 1.5  # at most this multiple of the estimate per probe
FURTHER_PROBE_STEP = 2.0  # the first probe, and one right after a probe that succeeded, reach further
PROBE_BACKOFF = (0.5, 4.0, 8.0, 16.0, 30.0)  # seconds between probes after 0, 1, 2, 3, 4+ failures
BASE_RTT_WINDOW = 30.0
DELIVERED_FLOOR = 0.9  # a cut keeps at least this share of what the link just delivered
DELIVERED_FRESH = 2.0  # seconds a delivered rate stays usable
PACKET_OVERHEAD = 40  # bytes of SRTP, UDP and IP around each payload


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
    nacks_count: bool  # the link was clean before: a NACK is the probe overflowing a queue
    loss_before: float = 0.0


@dataclass
class BandwidthEstimate:
    # Start low: a rural link may carry 150 kbit/s, and a flood at the start of a
    # call costs everyone's audio. The first probe lifts a good link within seconds.
    estimate: float = 300_000.0
    minimum: float = 30_000.0
    maximum: float = 4_000_000.0
    remb: float | None = None
    loss: float = 0.0  # fraction lost, smoothed over the last few reports
    rtt: float = 0.1  # seconds, the last one reported
    queue_delay: float = 0.0  # how far that round trip is above its stream's lowest, seconds
    bases: dict[str, tuple[float, float]] = field(default_factory=dict)  # stream -> (lowest round trip, when)
    reports: int = 0
    last_growth: float | None = None
    last_cut: float | None = None
    probe: Probe | None = None
    last_probe_end: float | None = None
    failed_probes: int = 0
    last_probe_won: bool = False
    probes: int = 0
    successful_probes: int = 0
    delivered: float | None = None  # what the link carried to this subscriber lately, bit/s
    delivered_at: float | None = None
    heard_at: float | None = None  # first report from this link
    last_nack: float | None = None

    def on_nack(self, now: float) -> None:
        """The subscriber reports a lost packet: during a probe on a link that was clean, that is
        the probe overflowing a queue (padding duplicates hide loss only from receiver reports)."""
        if self.probe is not None and self.probe.nacks_count and self.padding(now):
            self._fail_probe(now)
        self.last_nack = now

    def on_delivered(self, rate: float, now: float) -> None:
        self.delivered, self.delivered_at = rate, now

    @property
    def known(self) -> bool:
        """Whether anything has been heard from this link yet."""
        return self.remb is not None or self.last_growth is not None

    @property
    def base_rtt(self) -> float | None:
        """The lowest round trip any stream has shown lately."""
        return min(base for base, _ in self.bases.values()) if self.bases else None

    def on_remb(self, bitrate: float, now: float) -> None:
        previous, self.remb = self.remb, max(bitrate, self.minimum)
        borne_out = self.queue_delay >= QUEUE_CALM / 2
        if previous is not None and self.remb < previous * REMB_FALL and self.remb < self.estimate and borne_out:
            self._cut_to(self.remb, now)

    def on_rtt(self, rtt: float, now: float, stream: str = "") -> None:
        """A round trip measured on one of the link's streams (``stream`` names it)."""
        if rtt <= 0:
            return
        self.rtt = rtt
        base = self.bases.get(stream)
        if base is None or rtt <= base[0] or now - base[1] > BASE_RTT_WINDOW:
            base = self.bases[stream] = (rtt, now)
        self.queue_delay = rtt - base[0]
        if self.probe is not None:
            self.probe.worst_queue = max(self.probe.worst_queue, self.queue_delay)
            if self._probe_failed(self.probe):
                self._fail_probe(now)  # a queue is building: stop padding now, not at the end
        elif self.queue_delay > QUEUE_LIMIT and self._may_cut(now):
            delivered = self._fresh_delivered(now)
            if delivered is not None:
                self._cut_to(min(self.estimate, delivered) * QUEUE_CUT, now, floor=False)
            else:
                self._cut_to(self.estimate * QUEUE_CUT, now)

    def on_report(self, fraction_lost: int, now: float) -> None:
        """A receiver report: ``fraction_lost`` is RFC 3550's 8-bit fixed-point fraction (or
        more, when the stream's NACKs say more was lost: ``NackLoss``)."""
        loss = max(0, min(fraction_lost, 255)) / 256
        if self.probe is not None and loss > self.probe.loss_before + PROBE_LOSS_RISE:
            self._fail_probe(now)  # a lossy link losing more: the probe overflows it
        self._finish_probe(now)
        if self.heard_at is None:
            self.heard_at = now
        self.loss = loss if self.reports == 0 else LOSS_SMOOTHING * loss + (1 - LOSS_SMOOTHING) * self.loss
        self.reports += 1
        if self.probe is not None:
            return  # padding duplicates hide loss; the probe is judged by delay
        if self.loss > CUT_ABOVE:
            if self._may_cut(now):
                self._cut_to(self.estimate * (1 - self.loss / 2), now)
        elif self.loss < GROW_BELOW and self.queue_delay < QUEUE_CALM:
            if self.last_growth is None:
                self.last_growth = now
            elapsed = now - self.last_growth
            if elapsed >= 1.0:
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
        step = FURTHER_PROBE_STEP if self.probes == 0 or self.last_probe_won else PROBE_STEP
        target = min(wanted, self.estimate * step, self.maximum)
        if target <= self.estimate * 1.05 or not self.known:
            return None
        calm_since = max(t for t in (self.last_cut, self.last_probe_end, -1e9) if t is not None)
        backoff = PROBE_BACKOFF[min(self.failed_probes, len(PROBE_BACKOFF) - 1)]
        if self.last_cut is not None and now - self.last_cut < PROBE_CALM:
            return None
        if self.heard_at is None or now - self.heard_at < PROBE_CALM:
            return None  # watch a new link for a moment (its base round trip, its loss) first
        # Loss below the cutting threshold with a flat round trip is the link's own
        # (radio) loss, not congestion: it does not stop a probe, which is judged by delay.
        if now - calm_since < backoff or self.loss > CUT_ABOVE or self.queue_delay >= QUEUE_CALM:
            return None
        self.probe = Probe(rate=target, start=now, base_rtt=self.base_rtt or self.rtt, worst_queue=self.queue_delay,
                           nacks_count=self.loss < GROW_BELOW and (self.last_nack is None
                                                                   or now - self.last_nack > NACK_MEMORY),
                           loss_before=self.loss)
        self.probes += 1
        return target

    def padding(self, now: float) -> bool:
        """Whether a probe wants the stream padded right now (its verdict comes a little later)."""
        return self.probe is not None and now - self.probe.start < PROBE_TIME

    def _finish_probe(self, now: float) -> None:
        probe = self.probe
        if probe is None or now - probe.start < PROBE_TIME + PROBE_SETTLE:
            return
        self.probe = None
        self.last_probe_end = now
        if not self._probe_failed(probe):
            self.estimate = self._bounded(max(self.estimate, probe.rate * 0.95))
            self.failed_probes = 0
            self.successful_probes += 1
            self.last_growth = now
            self.last_probe_won = True
        else:
            self.failed_probes += 1
            self.last_probe_won = False

    def _fail_probe(self, now: float) -> None:
        self.probe = None
        self.last_probe_end = now
        self.failed_probes += 1
        self.last_probe_won = False

    @staticmethod
    def _probe_failed(probe: Probe) -> bool:
        return probe.worst_queue > max(QUEUE_CALM, probe.base_rtt * 0.5)

    # --- helpers ----------------------------------------------------------------------

    def _may_cut(self, now: float) -> bool:
        # Once per round trip, and no more often than reports can show the effect of the last cut.
        return self.last_cut is None or now - self.last_cut >= max(self.rtt, MIN_CUT_INTERVAL)

    def _fresh_delivered(self, now: float) -> float | None:
        if self.delivered is not None and self.delivered_at is not None and now - self.delivered_at < DELIVERED_FRESH:
            return self.delivered
        return None

    def _cut_to(self, value: float, now: float, floor: bool = True) -> None:
        delivered = self._fresh_delivered(now)
        if floor and delivered is not None:
            value = max(value, delivered * DELIVERED_FLOOR)
        self.estimate = self._bounded(min(value, self.estimate))
        self.last_cut = now
        self.last_growth = now  # no growth straight after a cut

    def _bounded(self, value: float) -> float:
        return max(self.minimum, min(value, self.maximum))
