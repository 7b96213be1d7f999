"""How much video one subscriber's link can take: a pure function of time and reports.

Inputs are what a subscriber's RTCP says: receiver reports (fraction lost, and
the round-trip time derived from them) and REMB (its receiver's own
delay-based estimate). Audio is outside this budget: it is never counted here
and never cut.

* Loss, after Galène: grow 5 % a second while loss stays under 2 %, hold
  between 2 % and 10 %, and above 10 % cut by half the loss rate, at most once
  per round trip.
* Queueing: a round trip that has grown well above the lowest one seen means a
  queue is filling somewhere (rural links have deep buffers and lose late);
  cut by 15 % once per round trip, and do not grow while it persists.
* REMB: a receiver's REMB falls only when it has seen its link overuse, so a
  falling REMB cuts the estimate to it. A REMB that merely lags behind (it can
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
  hides loss from receiver reports, so a probe is judged by delay alone, and
  the loss-based rule takes over again as soon as it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

GROW_BELOW = 0.02
CUT_ABOVE = 0.10
GROWTH = 1.05
MIN_CUT_INTERVAL = 0.5  # seconds
QUEUE_CUT = 0.85
QUEUE_LIMIT = 0.12  # seconds of queueing above the base round trip that count as congestion
QUEUE_CALM = 0.05  # seconds: below this, the queue is empty enough to grow or probe
REMB_FALL = 0.9  # a REMB under 90 % of the previous one reports overuse

PROBE_TIME = 1.0  # seconds the padding lasts
PROBE_SETTLE = 1.0  # seconds after the padding for the last report to come back
PROBE_CALM = 2.0  # seconds without a cut before probing
# A probe overshooting a thin link fills its queue, and audio waits in that queue too:
# probes step gently and stop at the first sign of queueing.
PROBE_STEP = 1.5  # at most this multiple of the estimate per probe
FIRST_PROBE_STEP = 2.0  # the first probe, as soon as the link is heard from, reaches further
PROBE_BACKOFF = (2.0, 4.0, 8.0, 16.0, 30.0)  # seconds between probes after 0, 1, 2, 3, 4+ failures
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
class Probe:
    rate: float
    start: float
    base_rtt: float
    worst_rtt: float


@dataclass
class BandwidthEstimate:
    # Start low: a rural link may carry 150 kbit/s, and a flood at the start of a
    # call costs everyone's audio. The first probe lifts a good link within seconds.
    estimate: float = 300_000.0
    minimum: float = 30_000.0
    maximum: float = 4_000_000.0
    remb: float | None = None
    loss: float = 0.0  # the last reported fraction lost
    rtt: float = 0.1  # seconds
    base_rtt: float | None = None  # lowest round trip seen lately
    base_rtt_at: float = 0.0
    last_growth: float | None = None
    last_cut: float | None = None
    probe: Probe | None = None
    last_probe_end: float | None = None
    failed_probes: int = 0
    probes: int = 0
    successful_probes: int = 0
    delivered: float | None = None  # what the link carried to this subscriber lately, bit/s
    delivered_at: float | None = None
    heard_at: float | None = None  # first report from this link

    def on_nack(self, now: float) -> None:
        """The subscriber reports a lost packet: during a probe, that is the probe overflowing
        a queue (padding duplicates hide loss only from receiver reports, not from NACKs)."""
        if self.probe is not None and self.padding(now):
            self._fail_probe(now)

    def on_delivered(self, rate: float, now: float) -> None:
        self.delivered, self.delivered_at = rate, now

    @property
    def known(self) -> bool:
        """Whether anything has been heard from this link yet."""
        return self.remb is not None or self.last_growth is not None

    @property
    def queue_delay(self) -> float:
        return max(0.0, self.rtt - self.base_rtt) if self.base_rtt is not None else 0.0

    def on_remb(self, bitrate: float, now: float) -> None:
        previous, self.remb = self.remb, max(bitrate, self.minimum)
        if previous is not None and self.remb < previous * REMB_FALL and self.remb < self.estimate:
            self._cut_to(self.remb, now)

    def on_rtt(self, rtt: float, now: float) -> None:
        if rtt <= 0:
            return
        self.rtt = rtt
        if self.base_rtt is None or rtt <= self.base_rtt or now - self.base_rtt_at > BASE_RTT_WINDOW:
            self.base_rtt, self.base_rtt_at = rtt, now
        if self.probe is not None:
            self.probe.worst_rtt = max(self.probe.worst_rtt, rtt)
            if self._probe_failed(self.probe):
                self._fail_probe(now)  # a queue is building: stop padding now, not at the end
        elif self.queue_delay > QUEUE_LIMIT and self._may_cut(now):
            self._cut_to(self.estimate * QUEUE_CUT, now)

    def on_report(self, fraction_lost: int, now: float) -> None:
        """A receiver report: ``fraction_lost`` is RFC 3550's 8-bit fixed-point fraction."""
        self._finish_probe(now)
        if self.heard_at is None:
            self.heard_at = now
        self.loss = max(0, min(fraction_lost, 255)) / 256
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
        step = FIRST_PROBE_STEP if self.probes == 0 else PROBE_STEP
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
        self.probe = Probe(rate=target, start=now, base_rtt=self.base_rtt or self.rtt, worst_rtt=self.rtt)
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
        else:
            self.failed_probes += 1

    def _fail_probe(self, now: float) -> None:
        self.probe = None
        self.last_probe_end = now
        self.failed_probes += 1

    @staticmethod
    def _probe_failed(probe: Probe) -> bool:
        return probe.worst_rtt - probe.base_rtt > max(QUEUE_CALM, probe.base_rtt * 0.5)

    # --- helpers ----------------------------------------------------------------------

    def _may_cut(self, now: float) -> bool:
        # Once per round trip, and no more often than reports can show the effect of the last cut.
        return self.last_cut is None or now - self.last_cut >= max(self.rtt, MIN_CUT_INTERVAL)

    def _cut_to(self, value: float, now: float) -> None:
        if self.delivered is not None and self.delivered_at is not None and now - self.delivered_at < DELIVERED_FRESH:
            value = max(value, self.delivered * DELIVERED_FLOOR)
        self.estimate = self._bounded(min(value, self.estimate))
        self.last_cut = now
        self.last_growth = now  # no growth straight after a cut

    def _bounded(self, value: float) -> float:
        return max(self.minimum, min(value, self.maximum))
