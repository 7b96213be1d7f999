"""How much video one subscriber's link can take: a pure function of time and reports.

Inputs are what a subscriber's RTCP says: REMB (its receiver's own delay-based
estimate) and receiver reports (fraction lost, and the round-trip time aiortc
derives from them). The rule is loss-based, after Galène: grow 5 % a second
while loss stays under 2 %, hold between 2 % and 10 %, and above 10 % cut by
half the loss rate, at most once per round trip; never above the subscriber's
REMB. Audio is outside this budget: it is never counted here and never cut.
"""

from __future__ import annotations

from dataclasses import dataclass

GROW_BELOW = 0.02
CUT_ABOVE = 0.10
GROWTH = 1.05


@dataclass
class BandwidthEstimate:
    estimate: float = 500_000.0
    minimum: float = 30_000.0
    maximum: float = 4_000_000.0
    remb: float | None = None
    loss: float = 0.0  # the last reported fraction lost
    rtt: float = 0.1  # seconds
    last_growth: float | None = None
    last_cut: float | None = None

    @property
    def ceiling(self) -> float:
        return min(self.maximum, self.remb) if self.remb is not None else self.maximum

    def on_remb(self, bitrate: float, now: float) -> None:
        self.remb = max(bitrate, self.minimum)
        self.estimate = self._bounded(self.estimate)

    def on_rtt(self, rtt: float) -> None:
        if rtt > 0:
            self.rtt = rtt

    def on_report(self, fraction_lost: int, now: float) -> None:
        """A receiver report: ``fraction_lost`` is RFC 3550's 8-bit fixed-point fraction."""
        self.loss = max(0, min(fraction_lost, 255)) / 256
        if self.loss > CUT_ABOVE:
            if self.last_cut is None or now - self.last_cut >= max(self.rtt, 0.05):
                self.estimate = self._bounded(self.estimate * (1 - self.loss / 2))
                self.last_cut = now
                self.last_growth = now  # no growth straight after a cut
        elif self.loss < GROW_BELOW:
            if self.last_growth is None:
                self.last_growth = now
            elapsed = now - self.last_growth
            if elapsed >= 1.0:
                self.estimate = self._bounded(self.estimate * GROWTH ** min(elapsed, 5.0))
                self.last_growth = now

    def _bounded(self, value: float) -> float:
        return max(self.minimum, min(value, self.ceiling))
