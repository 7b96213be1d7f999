"""The estimate's rules for subscribers that send per-packet delay feedback, driven with a fake clock."""

from __future__ import annotations

import pytest

from mediaserver.bwe import OVERUSE_CUT, PER_PACKET_FRESH, BandwidthEstimate
from mediaserver.delay_detector import NORMAL, OVERUSE
from mediaserver.twcc import PacketResult

SIZE = 1000


def packets(start: float, seconds: float, rate_bps: float, *, first_seq: int = 0, delay: float = 0.03,
            delay_growth: float = 0.0, padding_every: int = 0) -> list[PacketResult]:
    """Packets sent at ``rate_bps`` from ``start``; each arrives ``delay`` later, growing by ``delay_growth`` a
    second; every ``padding_every``-th is a probe's duplicate, which the receiver's SRTP drops (never seen)."""
    gap = SIZE * 8 / rate_bps
    found = []
    for i in range(int(seconds / gap)):
        sent = start + i * gap
        padding = bool(padding_every) and i % padding_every == 0
        arrival = None if padding else sent + delay + delay_growth * (sent - start)
        found.append(PacketResult(first_seq + i, sent, SIZE, padding, arrival))
    return found


def heard(bwe: BandwidthEstimate, now: float, acked: float = 100_000) -> None:
    bwe.on_transport_feedback([], NORMAL, acked, now)


def test_overuse_cuts_at_once_to_a_share_of_what_was_acknowledged_without_a_report() -> None:
    bwe = BandwidthEstimate(estimate=2_000_000, confirmed=True)
    bwe.on_delivered(1_900_000, now=9.5)  # (a report's figure from before the drop does not hold the cut up)
    heard(bwe, 10.0, acked=1_900_000)
    bwe.on_transport_feedback([], OVERUSE, 320_000, 10.1)
    assert bwe.estimate == pytest.approx(320_000 * OVERUSE_CUT)
    assert bwe.overuse_cuts == 1
    bwe.on_transport_feedback([], OVERUSE, 300_000, 10.15)  # within the same round trip: no second cut
    assert bwe.overuse_cuts == 1
    bwe.on_transport_feedback([], OVERUSE, 250_000, 10.4)
    assert bwe.estimate == pytest.approx(250_000 * OVERUSE_CUT) and bwe.overuse_cuts == 2


def test_a_probe_whose_packets_arrive_on_time_is_proven_as_soon_as_their_feedback_is_in() -> None:
    bwe = BandwidthEstimate()
    heard(bwe, 0.0)
    bwe.on_report(0, now=0.1)
    rate = bwe.probe_rate(1.0, wanted=2_000_000)
    assert rate == pytest.approx(100_000 * 3)  # the first probe: three times what the link carried
    # the probe's packets, a third of them padding that never shows, arrive as they were sent
    sent = packets(1.0, 0.6, rate, padding_every=3)
    bwe.on_transport_feedback(sent, NORMAL, 200_000, 1.65)
    assert bwe.probe is None and bwe.successful_probes == 1  # 0.65 s after it began, not 2 s
    assert bwe.usable == pytest.approx(rate * 0.95, rel=0.05)  # (what was sent, padding included)
    second = bwe.probe_rate(1.7, wanted=2_000_000)
    assert second == pytest.approx(bwe.usable * 2)  # then twice that again: six times what it carried


def test_a_probe_whose_packets_queue_up_fails_and_is_stopped() -> None:
    bwe = BandwidthEstimate()
    heard(bwe, 0.0)
    bwe.on_report(0, now=0.1)
    rate = bwe.probe_rate(1.0, wanted=2_000_000)
    assert rate is not None
    bwe.on_transport_feedback(packets(1.0, 0.6, rate, delay_growth=0.2), NORMAL, 150_000, 1.65)
    assert bwe.probe is None and bwe.failed_probes == 1 and bwe.ceiling == rate
    assert bwe.estimate == 300_000 and not bwe.confirmed  # (the starting guess, still unproven)


def test_overuse_while_a_probe_pads_stops_it_without_cutting() -> None:
    bwe = BandwidthEstimate(estimate=500_000, confirmed=True)
    heard(bwe, 0.0, acked=400_000)
    bwe.on_report(0, now=0.1)
    assert bwe.probe_rate(1.0, wanted=2_000_000) is not None
    bwe.on_transport_feedback(packets(1.0, 0.1, 800_000), OVERUSE, 500_000, 1.15)
    assert bwe.probe is None and not bwe.padding(1.2) and bwe.failed_probes == 1
    bwe.on_transport_feedback([], OVERUSE, 450_000, 1.3)  # what the probe left in the queue
    assert bwe.estimate == 500_000
    assert bwe.probe_rate(1.9, wanted=2_000_000) is None  # backed off for a second
    bwe.on_transport_feedback([], NORMAL, 450_000, 2.3)  # (and the queue it left has drained)
    assert bwe.probe_rate(2.4, wanted=2_000_000) is not None


def test_without_feedback_for_a_while_the_report_rules_take_over_again() -> None:
    bwe = BandwidthEstimate()
    heard(bwe, 0.0)
    bwe.on_report(0, now=0.1)
    assert bwe.per_packet(1.0)
    assert not bwe.per_packet(PER_PACKET_FRESH + 0.1)
    bwe.probe_rate(PER_PACKET_FRESH + 0.5, wanted=2_000_000)
    assert bwe.probe is not None and bwe.probe.duration == 1.0  # a report-judged probe again


def test_no_probe_while_the_queue_grows_or_drains() -> None:
    from mediaserver.delay_detector import UNDERUSE

    bwe = BandwidthEstimate(estimate=500_000, confirmed=True)
    heard(bwe, 0.0, acked=400_000)
    bwe.on_report(0, now=0.1)
    bwe.on_transport_feedback([], UNDERUSE, 400_000, 0.9)
    assert bwe.probe_rate(1.0, wanted=2_000_000) is None
    bwe.on_transport_feedback([], NORMAL, 400_000, 1.1)
    assert bwe.probe_rate(1.2, wanted=2_000_000) is not None
