"""The per-subscriber bandwidth estimate, driven with a fake clock."""

from __future__ import annotations

import pytest

from mediaserver.bwe import PACKET_OVERHEAD, BandwidthEstimate, DeliveryMeter, NackLoss
from mediaserver.forwarder import RESEND_TWICE_ABOVE


def lost(fraction: float) -> int:
    return int(fraction * 256)


def test_grows_five_percent_a_second_while_loss_is_low() -> None:
    bwe = BandwidthEstimate(estimate=500_000, confirmed=True)
    bwe.on_report(lost(0.0), now=0.0)
    for second in range(1, 11):
        bwe.on_report(lost(0.01), now=float(second))
    assert bwe.estimate == pytest.approx(500_000 * 1.05 ** 10, rel=1e-6)


def test_holds_between_two_and_ten_percent() -> None:
    bwe = BandwidthEstimate(estimate=500_000)
    for second in range(10):
        bwe.on_report(lost(0.05), now=float(second))
    assert bwe.estimate == 500_000


@pytest.mark.parametrize("loss", [0.15, 0.3, 0.5])
def test_heavy_loss_cuts_by_half_the_loss_once_per_round_trip(loss: float) -> None:
    bwe = BandwidthEstimate(estimate=1_000_000, rtt=0.7)
    bwe.on_report(lost(loss), now=10.0)
    after_one = bwe.estimate
    assert after_one == pytest.approx(1_000_000 * (1 - lost(loss) / 256 / 2))
    bwe.on_report(lost(loss), now=10.6)  # within the same round trip: no second cut
    assert bwe.estimate == after_one
    bwe.on_report(lost(loss), now=10.8)
    assert bwe.estimate < after_one


def test_a_falling_remb_cuts_but_a_lagging_one_is_no_ceiling() -> None:
    bwe = BandwidthEstimate(estimate=800_000, minimum=30_000, confirmed=True)
    bwe.on_remb(900_000, now=0.0, sending=700_000)
    bwe.on_remb(600_000, now=0.5, sending=300_000)  # less is sent: it sinks with what arrives, no overuse
    assert bwe.estimate == 800_000
    bwe.on_remb(300_000, now=1.0, sending=700_000)  # under what is sent: the receiver saw overuse
    assert bwe.estimate == 300_000
    bwe.on_remb(320_000, now=1.5)
    for second in range(2, 30):
        bwe.on_report(0, now=float(second))
    assert bwe.estimate > 320_000 * 2  # a REMB that only lags behind does not hold it down
    for t in range(100):
        bwe.on_report(lost(0.9), now=100.0 + t)
    assert bwe.estimate == 30_000


def test_a_filling_queue_cuts_and_stops_growth() -> None:
    bwe = BandwidthEstimate(estimate=1_000_000)
    bwe.on_rtt(0.1, now=0.0)
    bwe.on_report(0, now=0.0)
    bwe.on_rtt(0.19, now=1.0)  # 90 ms of queue: hold
    bwe.on_report(0, now=1.0)
    bwe.on_report(0, now=2.0)
    assert bwe.estimate == 1_000_000
    bwe.on_rtt(0.3, now=3.0)  # 200 ms of queue: congestion
    assert bwe.estimate == pytest.approx(850_000)


def probe_to(bwe: BandwidthEstimate, now: float, wanted: float) -> float | None:
    """Start a probe if one is due: its rate."""
    if bwe.probe_rate(now, wanted) is None:
        return None
    assert bwe.probe is not None
    return bwe.probe.rate


def clean_link(bwe: BandwidthEstimate, start: float, end: float, rtt: float = 0.1,
               delivered: float = 300_000) -> None:
    """Reports every half second of a link that is clean and carries ``delivered`` bit/s."""
    t = start
    while t <= end:
        bwe.on_delivered(delivered, now=t)
        bwe.on_rtt(rtt, now=t)
        bwe.on_report(0, now=t)
        t += 0.5


def test_a_probe_that_keeps_the_round_trip_flat_raises_the_estimate() -> None:
    bwe = BandwidthEstimate(estimate=300_000)
    clean_link(bwe, 0.0, 3.0)
    before = bwe.estimate
    rate = probe_to(bwe, 3.0, wanted=2_000_000)
    assert rate == pytest.approx(before * 2)  # the first probe reaches twice as far
    assert bwe.probe_rate(3.5, wanted=2_000_000) == rate and bwe.padding(3.5)
    assert bwe.probe_rate(4.1, wanted=2_000_000) == rate and not bwe.padding(4.1)  # waiting for the last report
    clean_link(bwe, 4.1, 5.1)
    assert bwe.estimate == pytest.approx(rate * 0.95)
    assert bwe.successful_probes == 1
    second = probe_to(bwe, 5.1, wanted=20_000_000)
    assert second == pytest.approx(bwe.estimate * 1.5)  # one that worked is followed at once, a gentler step up


def test_a_probe_that_fills_a_queue_fails_and_backs_off() -> None:
    bwe = BandwidthEstimate(estimate=300_000)
    clean_link(bwe, 0.0, 3.0)
    before = bwe.estimate
    first = probe_to(bwe, 3.0, wanted=2_000_000)
    assert first is not None
    bwe.on_rtt(0.4, now=3.5)  # the queue fills: the probe stops at once
    assert not bwe.padding(3.6) and bwe.failed_probes == 1
    bwe.on_report(0, now=4.0)
    clean_link(bwe, 4.5, 5.0)
    assert bwe.estimate < before * 1.2  # no jump
    assert bwe.failed_probes == 1
    assert bwe.probe_rate(5.0, wanted=2_000_000) is None  # backing off
    clean_link(bwe, 5.0, 6.0)
    again = probe_to(bwe, 6.0, wanted=2_000_000)
    assert again == pytest.approx((bwe.usable + first) / 2)  # halfway to the rate that failed


def test_no_probe_when_nothing_more_is_wanted_or_right_after_a_cut() -> None:
    bwe = BandwidthEstimate(estimate=300_000)
    clean_link(bwe, 0.0, 3.0)
    assert bwe.probe_rate(3.0, wanted=bwe.estimate) is None
    bwe.on_report(lost(0.3), now=3.2)
    clean_link(bwe, 3.5, 4.5)
    assert bwe.probe_rate(4.5, wanted=2_000_000) is None


def test_no_growth_right_after_a_cut() -> None:
    bwe = BandwidthEstimate(estimate=1_000_000, confirmed=True)
    bwe.on_report(lost(0.2), now=5.0)
    cut = bwe.estimate
    bwe.on_report(0, now=5.5)
    assert bwe.estimate == cut
    for t in (6.0, 6.5, 7.0, 7.5):
        bwe.on_report(0, now=t)
    assert bwe.estimate > cut  # growing again once the loss has died away


def test_random_loss_that_peaks_in_one_report_does_not_cut() -> None:
    # 5 % random loss over ~40 packets a report: now and then one report shows over 10 %
    bwe = BandwidthEstimate(estimate=600_000)
    for t, loss in enumerate([0.05, 0.05, 0.125, 0.05, 0.025, 0.075, 0.125, 0.05, 0.05]):
        bwe.on_report(lost(loss), now=float(t))
    assert bwe.estimate == 600_000
    for t in range(10, 13):  # a lasting rise is congestion
        bwe.on_report(lost(0.25), now=float(t))
    assert bwe.estimate < 600_000


def test_streams_with_different_round_trips_are_not_a_queue() -> None:
    # audio and video reports of one link: each stream's reports wait a different time
    bwe = BandwidthEstimate(estimate=300_000)
    for t in range(8):
        bwe.on_delivered(300_000, now=float(t))
        bwe.on_rtt(0.10, now=t + 0.0, stream="audio")
        bwe.on_rtt(0.18, now=t + 0.5, stream="video")
        bwe.on_report(0, now=t + 0.5)
    assert bwe.estimate > 300_000 and bwe.queue_delay == pytest.approx(0.0)
    rate = probe_to(bwe, 8.0, wanted=2_000_000)
    assert rate is not None
    for t in (8.0, 8.5, 9.0, 9.5, 10.0, 10.5):
        bwe.on_rtt(0.10, now=t, stream="audio")
        bwe.on_rtt(0.18, now=t + 0.25, stream="video")
        bwe.on_report(0, now=t + 0.25)
    assert bwe.successful_probes == 1 and bwe.estimate == pytest.approx(rate * 0.95)
    bwe.on_rtt(0.35, now=11.0, stream="video")  # that stream's round trip grows: a queue
    assert bwe.queue_delay == pytest.approx(0.17)


def test_nacks_stop_a_probe_only_on_a_link_that_was_clean() -> None:
    clean = BandwidthEstimate(estimate=300_000)
    clean_link(clean, 0.0, 3.0)
    assert clean.probe_rate(3.0, wanted=2_000_000) is not None
    clean.on_nack(3.2)  # the probe overflows a queue
    assert clean.failed_probes == 1 and not clean.padding(3.3)
    # a radio link losing 5 % in bursts, all of it repaired: reports show no loss, the NACKs show it
    lossy = BandwidthEstimate(estimate=300_000)
    for t in range(4):
        lossy.on_delivered(300_000, now=float(t))
        lossy.on_rtt(0.1, now=float(t))
        lossy.on_nack(t + 0.5)
        lossy.on_report(0, now=float(t), asked=0.05)
    assert lossy.probe_rate(4.0, wanted=2_000_000) is not None
    lossy.on_nack(4.2, packets=9)  # a burst of its own loss, asked for three times: says nothing about the probe
    lossy.on_report(0, now=4.5, asked=0.12)
    assert lossy.failed_probes == 0 and lossy.padding(4.6)
    lossy.on_rtt(0.3, now=4.8)  # a queue building: that is the probe
    assert lossy.failed_probes == 1 and not lossy.padding(4.85)


def test_a_links_own_repaired_loss_does_not_cut_but_more_of_it_stops_growth() -> None:
    bwe = BandwidthEstimate(estimate=800_000, confirmed=True)
    for t in range(30):  # 10 % radio loss, repaired: the receiver reports none
        bwe.on_report(0, now=float(t), asked=0.10 if t % 2 else 0.08)
    assert bwe.estimate > 800_000  # never cut: this loss is the link's own, at any rate
    before = bwe.estimate
    for t in range(30, 36):  # then far more is asked for: no more growth
        bwe.on_report(0, now=float(t), asked=0.30)
    assert bwe.estimate == before


def test_a_calm_links_own_loss_is_learned_in_seconds_a_queues_is_not() -> None:
    """A link that loses 5 % of its own, with no queue, is known as one within five reports (each video resend
    then goes twice: forwarder.RESEND_TWICE_ABOVE); the same NACKs with a queue standing are a queue overflowing
    and move the link's own level slowly."""
    radio = BandwidthEstimate(estimate=800_000, confirmed=True)
    queue = BandwidthEstimate(estimate=800_000, confirmed=True)
    for bwe in (radio, queue):  # (the call's first report: nothing lost yet)
        bwe.on_rtt(0.1, now=0.0)
        bwe.on_report(0, now=0.0, asked=0.0)
    for t in range(1, 6):
        radio.on_rtt(0.1, now=float(t))
        radio.on_report(0, now=float(t), asked=0.05)
        queue.on_rtt(0.1 + 0.06 * t, now=float(t))  # a queue growing: 60 ms more every second
        queue.on_report(0, now=float(t), asked=0.05)
    assert radio.own_loss() >= RESEND_TWICE_ABOVE
    assert queue.own_loss() < 0.5 * RESEND_TWICE_ABOVE


def test_radio_loss_with_a_flat_round_trip_does_not_stop_probing() -> None:
    bwe = BandwidthEstimate(estimate=300_000)
    for t in range(4):
        bwe.on_delivered(300_000, now=float(t))
        bwe.on_rtt(0.1, now=float(t))
        bwe.on_report(lost(0.05), now=float(t))
    assert bwe.probe_rate(4.0, wanted=1_000_000) is not None


def test_what_arrived_is_read_from_receiver_reports() -> None:
    meter = DeliveryMeter()
    assert meter.update(0.0, highest=1000, lost=0, sent_packets=1000, sent_octets=1_000_000) is None
    # In one second 200 more were sent (1000 bytes each); the report says 50 of them were lost.
    rate = meter.update(1.0, highest=1200, lost=50, sent_packets=1200, sent_octets=1_200_000)
    assert rate == pytest.approx(150 * (1000 + PACKET_OVERHEAD) * 8)


def test_after_a_flood_the_estimate_lands_on_what_the_link_delivered() -> None:
    bwe = BandwidthEstimate(estimate=800_000)
    for t in range(10):
        bwe.on_delivered(140_000, now=10.0 + t * 0.6)  # a 150 kbit/s link, flooded
        bwe.on_report(lost(0.6), now=10.0 + t * 0.6)
    assert bwe.estimate == pytest.approx(140_000 * 0.9)


def test_a_lost_packet_reported_during_a_probe_stops_it() -> None:
    bwe = BandwidthEstimate(estimate=300_000)
    clean_link(bwe, 0.0, 3.0)
    assert bwe.probe_rate(3.0, wanted=2_000_000) is not None
    bwe.on_nack(3.3)
    assert not bwe.padding(3.4) and bwe.failed_probes == 1


def test_a_new_link_is_watched_before_the_first_probe() -> None:
    bwe = BandwidthEstimate(estimate=300_000)
    clean_link(bwe, 0.0, 1.0)
    assert bwe.probe_rate(1.0, wanted=2_000_000) is None
    clean_link(bwe, 1.5, 2.0)
    assert bwe.probe_rate(2.0, wanted=2_000_000) is not None


def test_loss_that_retransmissions_hide_from_reports_is_read_from_nacks() -> None:
    loss = NackLoss()
    assert loss.update(sent_packets=100, nacked=0) == 0.0  # the first report only sets the mark
    assert loss.update(sent_packets=200, nacked=5) == pytest.approx(0.05)
    assert loss.update(sent_packets=200, nacked=9) == 0.0  # nothing sent in between: nothing to measure
    assert loss.update(sent_packets=300, nacked=9) == 0.0


def test_a_falling_remb_stops_a_probe() -> None:
    bwe = BandwidthEstimate(estimate=300_000)
    clean_link(bwe, 0.0, 3.0)
    assert bwe.probe_rate(3.0, wanted=2_000_000) is not None
    bwe.on_remb(700_000, now=3.1)
    bwe.on_remb(690_000, now=3.2)  # sinking a little: nothing
    assert bwe.padding(3.25)
    bwe.on_remb(550_000, now=3.3)  # the receiver saw the probe overflow its link
    assert bwe.failed_probes == 1 and not bwe.padding(3.35)
    assert bwe.estimate > 300_000  # still above the estimate: no cut


def test_a_remb_that_falls_message_by_message_under_what_is_sent_cuts() -> None:
    bwe = BandwidthEstimate(estimate=800_000)
    for k in range(40):  # 2 % lower with each message, 50 ms apart: no single step is a fall
        bwe.on_remb(900_000 * 0.98 ** k, now=k * 0.05, sending=700_000)
    assert bwe.estimate < 500_000


# --- the starting guess, and probes that close in on what the link carries -------------------------


def test_the_starting_guess_moves_no_one_up_and_probes_step_from_what_arrived() -> None:
    bwe = BandwidthEstimate()  # a guess: 300 kbit/s
    clean_link(bwe, 0.0, 3.0, delivered=80_000)  # the lowest layer and the sound: 80 kbit/s arrive
    assert bwe.known and not bwe.confirmed
    assert bwe.estimate == 300_000  # (a guess does not grow)
    assert bwe.usable == 80_000  # what a subscriber may move up to
    assert probe_to(bwe, 3.0, wanted=2_000_000) == pytest.approx(160_000)  # twice what arrived, not the guess
    clean_link(bwe, 3.0, 5.0, delivered=80_000)
    assert bwe.successful_probes == 1 and bwe.usable == pytest.approx(152_000)
    assert probe_to(bwe, 5.0, wanted=2_000_000) == pytest.approx(228_000)  # worked: the next at once


def test_a_link_that_carries_the_guess_confirms_it() -> None:
    bwe = BandwidthEstimate()
    clean_link(bwe, 0.0, 1.0, delivered=320_000)
    assert bwe.confirmed and bwe.usable == bwe.estimate


def test_probes_close_in_on_a_rate_that_failed_then_look_a_little_above_it() -> None:
    bwe = BandwidthEstimate()
    clean_link(bwe, 0.0, 3.0, delivered=80_000)
    assert probe_to(bwe, 3.0, wanted=2_000_000) == pytest.approx(160_000)
    bwe.on_rtt(0.3, now=3.4)  # a 150 kbit/s link: the queue grows
    assert bwe.failed_probes == 1 and bwe.ceiling == pytest.approx(160_000)
    clean_link(bwe, 5.5, 6.0, delivered=80_000)
    assert probe_to(bwe, 6.0, wanted=2_000_000) == pytest.approx(120_000)  # halfway to the rate that failed
    t, targets = 6.0, []
    while (target := probe_to(bwe, t, wanted=2_000_000)) is not None and target < 160_000:
        targets.append(target)  # each works, and the next goes halfway from there to the rate that failed
        clean_link(bwe, t, t + 2.0, delivered=80_000)
        t += 2.0
    assert len(targets) == 3 and targets == sorted(targets) and bwe.usable == pytest.approx(targets[-1] * 0.95)
    assert target == pytest.approx(160_000 * 1.1)  # close under it: is the link still no faster?
    usable = bwe.usable
    bwe.on_rtt(0.3, now=t + 0.4)
    assert bwe.ceiling == pytest.approx(160_000) and bwe.usable == usable
    assert bwe.probe_rate(t + 3.0, wanted=2_000_000) is None  # two failures in a row: 4 s apart
    clean_link(bwe, t + 4.5, t + 5.0, delivered=80_000)
    assert probe_to(bwe, t + 5.0, wanted=2_000_000) == pytest.approx(176_000)
    clean_link(bwe, t + 5.0, t + 7.0, delivered=80_000)  # the link has grown: it works
    assert bwe.ceiling is None
    assert probe_to(bwe, t + 7.0, wanted=2_000_000) == pytest.approx(1.5 * 176_000 * 0.95)  # on up, at once


def test_what_a_failed_probe_leaves_in_the_queue_cuts_nothing() -> None:
    bwe = BandwidthEstimate(estimate=600_000)
    clean_link(bwe, 0.0, 3.0, delivered=600_000)
    before = bwe.estimate
    assert bwe.probe_rate(3.0, wanted=4_000_000) is not None
    bwe.on_remb(1_500_000, now=3.1, sending=1_200_000)
    bwe.on_remb(700_000, now=3.3, sending=1_200_000)  # the probe overflows the link: it stops
    assert bwe.failed_probes == 1 and not bwe.padding(3.35)
    bwe.on_rtt(0.3, now=3.6)  # its queue, draining
    bwe.on_remb(500_000, now=3.8, sending=650_000)
    assert bwe.estimate == before
    bwe.on_rtt(0.3, now=5.0)  # a queue a while after it ended is the link's
    assert bwe.estimate < before


def test_a_packet_asked_for_sooner_than_the_link_answers_is_still_on_its_way() -> None:
    bwe = BandwidthEstimate()
    assert bwe.transit(0.0) is None
    bwe.on_rtt(0.06, now=0.0, stream="audio")
    bwe.on_rtt(0.06, now=0.0, stream="video")
    bwe.on_rtt(0.20, now=1.0, stream="video")  # the video stream's report waited in a queue
    bwe.on_rtt(0.07, now=1.2, stream="audio")
    assert bwe.transit(1.5) == pytest.approx(0.20)  # the queue any stream showed lately counts
    assert bwe.transit(3.1) == pytest.approx(0.07)  # an old reading does not


def test_a_remb_far_under_what_arrives_cuts_no_further_than_what_arrives() -> None:
    # A thin link: every video frame is a burst the receiver's delay detector reads as overuse.
    bwe = BandwidthEstimate(estimate=120_000, confirmed=True)
    for k in range(10):
        bwe.on_delivered(80_000, now=k * 1.0)
        bwe.on_remb(60_000, now=k * 1.0, sending=80_000)
        bwe.on_remb(33_000, now=k * 1.0 + 0.5, sending=80_000)
    assert bwe.estimate == 80_000  # not shaved by a tenth with every dip, down to a pause
