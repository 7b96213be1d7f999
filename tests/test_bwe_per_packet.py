"""The estimate's rules for subscribers that send per-packet delay feedback, driven with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from mediaserver.bwe import (
    CLUSTER_SHARE,
    OVERUSE_CUT,
    PER_PACKET_FRESH,
    PROBE_TIME_LONGEST,
    PROBE_TIME_PER_PACKET,
    BandwidthEstimate,
)
from mediaserver.delay_detector import NORMAL, OVERUSE
from mediaserver.twcc import PacketResult

SIZE = 1000


def packets(start: float, seconds: float, rate_bps: float, *, first_seq: int = 0, delay: float = 0.03,
            delay_growth: float = 0.0, padding_every: int = 0, size: int = SIZE) -> list[PacketResult]:
    """Packets sent at ``rate_bps`` from ``start``; each arrives ``delay`` later, growing by ``delay_growth`` a
    second; every ``padding_every``-th is a probe's duplicate, which the receiver's SRTP drops (never seen)."""
    gap = size * 8 / rate_bps
    found = []
    for i in range(int(seconds / gap)):
        sent = start + i * gap
        padding = bool(padding_every) and i % padding_every == 0
        arrival = None if padding else sent + delay + delay_growth * (sent - start)
        found.append(PacketResult(first_seq + i, sent, size, padding, arrival))
    return found


def dropped(sent: float, count: int = 4, first_seq: int = 5000) -> list[PacketResult]:
    """The stream's own packets sent from ``sent`` on that a full queue dropped."""
    return [PacketResult(first_seq + i, sent + i * 0.005, SIZE, False, None) for i in range(count)]


def heard(bwe: BandwidthEstimate, now: float, acked: float = 100_000) -> None:
    bwe.on_transport_feedback([], NORMAL, acked, now)


def probing(acked: float, wanted: float, **fields: Any) -> tuple[BandwidthEstimate, float]:
    """An estimate (``fields``) heard from at 0 s with ``acked`` arriving, a clean report at 0.1 s, and the
    probe it starts at 1 s toward ``wanted``: the estimate, and the probe's rate."""
    bwe = BandwidthEstimate(**fields)
    heard(bwe, 0.0, acked=acked)
    bwe.on_report(0, now=0.1)
    rate = bwe.probe_rate(1.0, wanted=wanted)
    assert rate is not None
    return bwe, rate


def test_an_overuse_while_the_link_keeps_up_with_a_layers_rate_cuts_the_estimate_once_not_to_that_rate() -> None:
    # A subscriber held to a layer of 400 kbit/s, its estimate proven to 900 kbit/s; a keyframe paced over the
    # link's capacity leaves a queue: what arrived came as fast as it was sent.
    bwe = BandwidthEstimate(estimate=900_000, confirmed=True)
    heard(bwe, 10.0, acked=400_000)
    bwe.on_transport_feedback([], OVERUSE, 400_000, 10.1, sent=410_000)
    assert bwe.estimate == pytest.approx(900_000 * OVERUSE_CUT), "once, by 0.85: not to 0.85 times 400 kbit/s"
    bwe.on_transport_feedback([], OVERUSE, 400_000, 10.4, sent=405_000)
    bwe.on_transport_feedback([], OVERUSE, 400_000, 10.7, sent=400_000)
    assert bwe.estimate == pytest.approx(900_000 * OVERUSE_CUT) and bwe.overuse_cuts == 1, "while it lasts"
    bwe.on_transport_feedback([], NORMAL, 400_000, 10.8, sent=400_000)
    bwe.on_transport_feedback([], OVERUSE, 400_000, 11.0, sent=400_000)
    assert bwe.overuse_cuts == 2, "a new overuse cuts again"
    # The link falls: what arrives lags what was sent, and the cut is to what arrives.
    bwe.on_transport_feedback([], OVERUSE, 250_000, 11.3, sent=400_000)
    assert bwe.estimate == pytest.approx(250_000 * OVERUSE_CUT) and bwe.overuse_cuts == 3


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
    assert rate == pytest.approx(100_000 * 2)  # the first probe: twice what the link carried
    # the probe's packets, a third of them padding that never shows, arrive as they were sent
    sent = packets(1.0, 0.6, rate, padding_every=3, size=300)
    bwe.on_transport_feedback(sent, NORMAL, 100_000, 1.65)
    assert bwe.probe is None and bwe.successful_probes == 1  # 0.65 s after it began, not 2 s
    assert bwe.usable == pytest.approx(rate * 0.95, rel=0.05)  # (what was sent, padding included)
    second = bwe.probe_rate(1.7, wanted=2_000_000)
    assert second == pytest.approx(bwe.usable * 2)  # then twice that again


def test_a_cluster_that_arrives_slower_than_it_was_sent_measures_the_link() -> None:
    bwe, rate = probing(acked=100_000, wanted=2_000_000)
    # the link stretches the cluster: its packets arrive over 1.2 times the span they were sent in
    bwe.on_transport_feedback(packets(1.0, 0.6, rate, delay_growth=0.2, size=300), NORMAL, 150_000, 1.65)
    assert bwe.probe is None and bwe.failed_probes == 1  # (backed off: the link is full at the probe's rate)
    assert bwe.measured == pytest.approx(rate / 1.2, rel=0.02)
    assert bwe.confirmed and bwe.usable == pytest.approx(rate / 1.2 * CLUSTER_SHARE, rel=0.02)  # (the guess gone)


def fifo_link(bwe: BandwidthEstimate, capacity: float, until: float, base_rate: float = 100_000,
              size: int = 200, start: float = 0.0) -> float:
    """Run ``bwe`` over a link that carries ``capacity`` bit/s through one queue, from 0 to ``until``:
    ``base_rate`` of packets the receiver notes, and while ``bwe`` pads, the rest of the probe rate
    as duplicates it never notes; transport feedback every 75 ms, the probe asked for every 0.25 s
    (the link empty at ``start``).
    Returns the longest any noted packet waited in the queue."""
    sent: list[tuple[float, float, bool]] = []  # (sent, left the queue, padding)
    now = link_free = next_base = next_pad = next_decision = start
    reported, next_feedback = 0, start + 0.075
    worst = 0.0
    while now < until:
        if now >= next_decision:
            bwe.probe_rate(now, wanted=2_000_000)  # (the forwarder's decision: pads while bwe.padding says so)
            next_decision += 0.25
        padding = bwe.padding(now) and bwe.probe is not None
        if now >= next_base or (padding and now >= next_pad):
            is_pad = not now >= next_base
            left = max(link_free, now) + size * 8 / capacity
            link_free = left
            sent.append((now, left, is_pad))
            if not is_pad:
                worst = max(worst, left - now)
                next_base = now + size * 8 / base_rate
            elif bwe.probe is not None:
                next_pad = now + size * 8 / max(bwe.probe.rate - base_rate, 1.0)
        if now >= next_feedback:
            due = [i for i in range(reported, len(sent)) if sent[i][1] + 0.02 <= now]
            if due:
                results = [PacketResult(i, sent[i][0], size, sent[i][2], None if sent[i][2] else sent[i][1] + 0.02)
                           for i in range(reported, due[-1] + 1)]
                reported = due[-1] + 1
                bwe.on_transport_feedback(results, NORMAL, min(capacity, base_rate), now)
            next_feedback += 0.075
        now = round(now + 0.001, 6)
    return worst


def test_on_a_thin_link_the_first_cluster_measures_it_and_holds_the_audio_only_briefly() -> None:
    bwe = BandwidthEstimate()
    heard(bwe, 0.0)
    bwe.on_report(0, now=0.0)
    worst = fifo_link(bwe, capacity=150_000, until=1.0)
    assert bwe.probes == 1 and bwe.measured == pytest.approx(150_000, rel=0.05)  # the first cluster measured it
    assert bwe.usable == pytest.approx(150_000 * CLUSTER_SHARE, rel=0.05)
    worst = max(worst, fifo_link(bwe, capacity=150_000, until=6.0, start=1.0))
    assert 135_000 <= bwe.usable <= 150_000  # later clusters close in on it, and none steps beyond it
    assert bwe.probes <= 4  # (backed off: each one just above the link would find the same)
    assert worst < 0.08  # what the clusters left in the queue ahead of the sound


def test_on_a_fast_link_clusters_prove_their_rates() -> None:
    bwe = BandwidthEstimate()
    heard(bwe, 0.0)
    bwe.on_report(0, now=0.0)
    worst = fifo_link(bwe, capacity=2_000_000, until=3.0)
    assert bwe.successful_probes >= 2 and bwe.failed_probes == 0
    assert bwe.usable >= 100_000 * 8 * 0.9  # twice, four and eight times what the link carried
    assert worst < 0.01


def test_overuse_while_a_probe_pads_stops_it_without_cutting() -> None:
    bwe = BandwidthEstimate(estimate=500_000, confirmed=True)
    heard(bwe, 0.0, acked=400_000)
    bwe.on_report(0, now=0.1)
    assert bwe.probe_rate(1.0, wanted=2_000_000) is not None
    bwe.on_transport_feedback(packets(1.0, 0.1, 800_000), OVERUSE, 500_000, 1.15)
    assert not bwe.padding(1.15)  # stopped at once
    bwe.on_transport_feedback(packets(1.1, 0.1, 800_000, first_seq=10), OVERUSE, 500_000, 1.25)
    assert bwe.probe is None and bwe.failed_probes == 1
    bwe.on_transport_feedback([], OVERUSE, 450_000, 1.35)  # what the probe left in the queue
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


def test_a_cluster_spread_by_jitter_below_what_the_link_carried_is_no_measure_of_it() -> None:
    bwe, rate = probing(acked=150_000, wanted=2_000_000)
    # a lossy, jittery link: the cluster's few noted packets arrive spread over twice their span
    bwe.on_transport_feedback(packets(1.0, 0.6, rate, delay_growth=1.0, size=300), NORMAL, 150_000, 1.65)
    assert bwe.probe is None and bwe.failed_probes == 1 and bwe.measured is None
    assert bwe.usable == 150_000  # what it carried still stands: the video is not paused for it


def test_a_link_back_from_a_fall_is_measured_by_a_cluster_stopped_by_its_queue() -> None:
    # The link carried 2.2 Mbit/s, fell, and is back at 2 Mbit/s: a cluster at 2.6 Mbit/s fills its queue, and
    # the detector stops it; its packets arrived at the link's 2 Mbit/s.
    bwe = BandwidthEstimate(estimate=1_400_000, confirmed=True, carried=2_200_000)
    heard(bwe, 0.0, acked=1_000_000)
    bwe.on_report(0, now=0.1)
    rate = bwe.probe_rate(1.0, wanted=4_000_000)
    assert rate is not None and rate > 2_000_000
    sent = packets(1.0, 0.2, 2_600_000, delay_growth=0.3)  # (arriving 1.3 times the span they were sent in)
    bwe.on_transport_feedback([r for r in sent if r.sent < 1.1], OVERUSE, 1_000_000, 1.12)  # (stopped here)
    bwe.on_transport_feedback([r for r in sent if r.sent >= 1.1], OVERUSE, 1_000_000, 1.3)
    assert bwe.probe is None and bwe.measured == pytest.approx(2_000_000, rel=0.05)
    assert bwe.usable == pytest.approx(2_000_000 * CLUSTER_SHARE, rel=0.05)


def test_a_cluster_with_nothing_to_pad_proves_nothing_and_the_next_waits() -> None:
    bwe, rate = probing(acked=60_000, wanted=500_000, estimate=100_000, confirmed=True)
    # a paused subscriber: only its sound (40 kbit/s) goes, and the padding has nothing to repeat
    now = 1.0
    durations = []
    while bwe.probe is not None:
        durations.append(bwe.probe.duration)
        end = now + bwe.probe.duration
        bwe.on_transport_feedback(packets(now, end - now + 0.05, 40_000, size=100, first_seq=int(now * 1000)),
                                  NORMAL, 60_000, end + 0.1)
        assert bwe.probe is None and bwe.usable == 100_000  # nothing learned, nothing lost
        now = round(end + 0.15, 3)
        bwe.probe_rate(now, wanted=500_000)
    # (the padding may only have fallen short, as behind a low layer's frames: longer clusters, then none)
    assert durations == [PROBE_TIME_PER_PACKET, PROBE_TIME_PER_PACKET * 2, PROBE_TIME_LONGEST]
    assert bwe.probe_rate(now + 0.3, wanted=500_000) is None  # not at once, as after one that proved its rate
    bwe.on_report(0, now=now + 1.2)  # (reports in between let the estimate grow)
    assert bwe.probe_rate(now + 1.3, wanted=500_000) is not None


def test_the_queue_a_cluster_that_proved_nothing_left_is_its_own_doing() -> None:
    # nara bench adapt's step at 300 kbit/s: a layer's frames, a cluster whose padding fell short of its rate,
    # and then the queue that padding left read as overuse, with less arriving than went
    bwe, rate = probing(acked=90_000, wanted=1_000_000, estimate=263_000, confirmed=True)
    end = 1.0 + bwe.probe.duration if bwe.probe is not None else 1.0
    bwe.on_transport_feedback(packets(1.0, end - 1.0 + 0.1, 90_000, size=400), NORMAL, 90_000, end + 0.1)
    assert bwe.probe is None and bwe.estimate == 263_000  # (proved nothing)
    bwe.on_transport_feedback([], OVERUSE, 104_000, end + 0.15, sent=117_000, arriving=107_000)
    assert bwe.estimate == 263_000 and bwe.overuse_cuts == 0
    # once the moment has passed, an overuse cuts as ever
    bwe.on_transport_feedback([], OVERUSE, 104_000, end + 1.0, sent=117_000, arriving=107_000)
    assert bwe.estimate == pytest.approx(104_000 * OVERUSE_CUT)


def test_a_link_that_falls_as_a_probe_starts_is_cut_at_once_not_blamed_on_the_probe() -> None:
    bwe = BandwidthEstimate(estimate=1_500_000, confirmed=True, carried=1_500_000)
    heard(bwe, 0.0, acked=1_400_000)
    bwe.on_report(0, now=0.1)
    assert bwe.probe_rate(10.0, wanted=4_000_000) is not None
    # The link fell to 300 kbit/s a moment before: the queue grows in packets sent before the probe began,
    # and what arrives lags what was sent.
    bwe.on_transport_feedback(packets(9.8, 0.15, 1_500_000), OVERUSE, 300_000, 10.1, sent=1_500_000)
    assert bwe.probe is None and bwe.failed_probes == 0, "not the probe's doing"
    assert bwe.estimate == pytest.approx(300_000 * OVERUSE_CUT), "cut at once, not after a probe's blame"


def test_a_link_that_fell_far_is_probed_often_and_a_probe_that_works_steps_on() -> None:
    # The link carried 1.5 Mbit/s, then fell to 250 kbit/s: probes just above it failed three times in a row.
    bwe = BandwidthEstimate(estimate=200_000, confirmed=True, carried=1_500_000)
    heard(bwe, 0.0, acked=200_000)
    bwe.on_report(0, now=0.1)
    for start in (1.0, 3.4, 5.8):
        heard(bwe, start - 0.1, acked=200_000)
        assert bwe.probe_rate(start, wanted=4_000_000) is not None, start
        bwe.on_transport_feedback(packets(start, 0.1, 300_000), OVERUSE, 200_000, start + 0.2)
        bwe.on_transport_feedback(packets(start + 0.1, 0.1, 300_000, first_seq=100), OVERUSE, 200_000, start + 0.3)
        assert bwe.probe is None
        bwe.on_transport_feedback([], NORMAL, 200_000, start + 0.4)
    assert bwe.failed_probes == 3 and bwe.ceiling is not None
    heard(bwe, 7.8, acked=200_000)
    assert bwe.probe_rate(7.9, wanted=4_000_000) is None
    # The next goes 2 s after the last failure (not 4): the link may be back any moment.
    rate = bwe.probe_rate(8.2, wanted=4_000_000)
    assert rate is not None and rate < 2 * bwe.usable, "closing in on the rate that failed"
    # It is: the cluster arrives as it was sent, and the next probe doubles instead of closing in on that rate.
    bwe.on_transport_feedback(packets(8.2, 0.3, rate, size=300, first_seq=1000), NORMAL, 200_000, 8.6)
    assert bwe.probe is None and bwe.successful_probes == 1
    assert bwe.probe_rate(8.7, wanted=4_000_000) == pytest.approx(bwe.usable * 2)


def test_a_queue_that_overflows_is_no_link_keeping_up_though_what_it_keeps_comes_as_fast_as_it_was_sent() -> None:
    # The link fell from 1.5 Mbit/s to 300 kbit/s: its full queue keeps one packet in five, and passes those on
    # at about the rate they came.
    bwe = BandwidthEstimate(estimate=1_500_000, confirmed=True)
    heard(bwe, 10.0, acked=1_400_000)
    bwe.on_transport_feedback(dropped(10.0), OVERUSE, 300_000, 10.1, sent=310_000, lost=0.8)
    assert bwe.estimate == pytest.approx(300_000 * OVERUSE_CUT), "to what arrives, not by 0.85"
    # A keyframe's burst on a link with room, a few of it lost besides the link's own 5 %: kept up.
    bursty = BandwidthEstimate(estimate=900_000, confirmed=True, asked_level=0.05)
    heard(bursty, 10.0, acked=600_000)
    bursty.on_transport_feedback([], OVERUSE, 600_000, 10.1, sent=610_000, lost=0.15)
    assert bursty.estimate == pytest.approx(900_000 * OVERUSE_CUT), "once, by 0.85: not a layer down"


def test_a_queue_overflowing_with_the_streams_own_packets_right_after_a_failed_probe_is_the_link_falling() -> None:
    bwe = BandwidthEstimate(estimate=1_800_000, confirmed=True)
    heard(bwe, 0.0, acked=1_700_000)
    bwe.on_report(0, now=0.1)
    assert bwe.probe_rate(10.0, wanted=4_000_000) is not None
    bwe.on_transport_feedback(packets(10.0, 0.1, 2_600_000), OVERUSE, 1_700_000, 10.15, sent=1_750_000)
    bwe.on_transport_feedback(packets(10.1, 0.1, 2_600_000, first_seq=100), OVERUSE, 1_600_000, 10.25)
    assert bwe.probe is None and bwe.failed_probes == 1 and bwe.estimate == 1_800_000  # (its queue: no cut)
    # Within its blame, the link falls to 300 kbit/s: what arrives has not yet halved, but four in five of the
    # stream's own packets are lost.
    bwe.on_transport_feedback(dropped(10.35), OVERUSE, 1_000_000, 10.45, sent=1_050_000, lost=0.8)
    assert bwe.estimate == pytest.approx(1_000_000 * OVERUSE_CUT), "cut at once, to what arrives"


def test_a_link_that_has_just_fallen_is_cut_to_what_arrives_now_not_the_half_seconds_average() -> None:
    bwe = BandwidthEstimate(estimate=1_800_000, confirmed=True)
    heard(bwe, 10.0, acked=1_700_000)
    bwe.on_transport_feedback([], OVERUSE, 1_000_000, 10.2, sent=1_500_000, lost=0.5, arriving=310_000)
    assert bwe.estimate == pytest.approx(310_000 * OVERUSE_CUT)


def test_a_queue_overflowing_cuts_before_the_delay_trend_reads_overuse() -> None:
    bwe = BandwidthEstimate(estimate=1_800_000, confirmed=True)
    heard(bwe, 10.0, acked=1_700_000)
    bwe.on_transport_feedback(dropped(10.0), NORMAL, 1_500_000, 10.1, sent=1_700_000, lost=0.6, arriving=320_000)
    assert bwe.estimate == pytest.approx(320_000 * OVERUSE_CUT)
    # The share still counts those losses for half a second: they cut nothing more. Losses of packets sent
    # after the cut do.
    bwe.on_transport_feedback(dropped(10.05, first_seq=6000), NORMAL, 700_000, 10.35, sent=800_000, lost=0.6,
                              arriving=250_000)
    assert bwe.overuse_cuts == 1 and bwe.estimate >= 320_000 * OVERUSE_CUT
    bwe.on_transport_feedback(dropped(10.2, first_seq=7000), NORMAL, 400_000, 10.5, sent=500_000, lost=0.5,
                              arriving=250_000)
    assert bwe.estimate == pytest.approx(250_000 * OVERUSE_CUT)
    # a link's own loss, as high, is no overflow once known
    lossy = BandwidthEstimate(estimate=900_000, confirmed=True, asked_level=0.5)
    heard(lossy, 10.0, acked=800_000)
    lossy.on_transport_feedback(dropped(10.0), NORMAL, 800_000, 10.1, sent=800_000, lost=0.6, arriving=800_000)
    assert lossy.estimate >= 900_000


def test_losses_without_a_standing_queue_are_the_links_own_and_no_overflow() -> None:
    # nara bench adapt's burst10 at its start: the 300 kbit/s guess on a 1 Mbit/s link, a third of the half
    # second's few packets lost in a burst, and every packet that came, came at the link's least delay.
    burst = BandwidthEstimate(estimate=300_000)
    heard(burst, 0.3, acked=80_000)
    burst.on_transport_feedback(dropped(0.3), NORMAL, 78_000, 0.45, sent=78_000, lost=0.31, arriving=67_000,
                                queued=0.002)
    assert burst.estimate == 300_000 and burst.overuse_cuts == 0
    # the same losses from a queue standing 250 ms over the least: a full queue, dropping
    full = BandwidthEstimate(estimate=300_000)
    heard(full, 0.3, acked=80_000)
    full.on_transport_feedback(dropped(0.3), NORMAL, 78_000, 0.45, sent=78_000, lost=0.31, arriving=67_000,
                               queued=0.25)
    assert full.estimate == pytest.approx(67_000 * OVERUSE_CUT)


def test_a_remb_far_under_what_the_per_packet_feedback_sees_arrive_cuts_no_further_than_an_overuse() -> None:
    # A link fallen from 2 Mbit/s to 300 kbit/s: the receiver's REMB overshoots the fall, to 63 kbit/s.
    bwe = BandwidthEstimate(estimate=1_800_000, confirmed=True, carried=1_800_000)
    heard(bwe, 0.0, acked=1_700_000)
    bwe.on_remb(1_800_000, now=0.5)
    bwe.on_transport_feedback([], OVERUSE, 160_000, 1.0)  # (cut at once to what arrives)
    assert bwe.estimate == pytest.approx(160_000 * OVERUSE_CUT)
    bwe.on_remb(63_000, now=1.3)
    assert bwe.estimate == pytest.approx(160_000 * OVERUSE_CUT)  # not paused on the REMB's word
    # without per-packet feedback, the REMB is all there is to go by
    alone = BandwidthEstimate(estimate=1_800_000, confirmed=True, carried=1_800_000)
    alone.on_remb(1_800_000, now=0.5)
    alone.on_remb(63_000, now=1.3)
    assert alone.estimate == 63_000


def test_probes_on_a_full_link_back_off_to_eight_seconds_after_three_failures() -> None:
    # A 150 kbit/s link, full: each probe's packets queue up (their delay grows), and the probe fails.
    bwe, rate = probing(acked=120_000, wanted=2_000_000, estimate=120_000, confirmed=True, carried=150_000)
    now, seq = 1.0, 0
    waits: list[int] = []
    for _ in range(5):
        assert bwe.probe is not None
        results = packets(now, 0.3, rate, delay_growth=0.3, size=300, first_seq=seq)
        seq += len(results)
        bwe.on_transport_feedback(results, NORMAL, 120_000, now + 0.35)
        assert bwe.probe is None  # failed
        failed_at = now + 0.35
        now = failed_at
        while bwe.probe_rate(now, wanted=2_000_000) is None:
            heard(bwe, now, acked=120_000)
            now = round(now + 0.05, 3)
        waits.append(round(now - failed_at))
        rate = bwe.probe.rate if bwe.probe is not None else rate
    assert waits == [1, 2, 4, 8, 8]
