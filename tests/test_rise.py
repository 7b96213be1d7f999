"""The way back up after a link recovers, on a fake clock: the estimate climbs, probes step past a rate that
failed while the link was low, and the publisher's cap is not held to the pace of aiortc's uplink estimate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from mediaserver.bwe import GROWTH_ABOVE_ACKED, GROWTH_PER_PACKET, PROBE_ABOVE_CEILING, BandwidthEstimate
from mediaserver.delay_detector import NORMAL, OVERUSE
from mediaserver.forwarder import UPLINK_CALM, UPLINK_STEP, Publication
from mediaserver.ladder import SOURCE_HEADROOM
from tests.test_bwe_per_packet import fifo_link, heard, packets, probing


def lossy_feedback(bwe: BandwidthEstimate, start: float, seconds: float, acked: float, state: str = NORMAL) -> None:
    """Transport feedback every 75 ms and a receiver report every second from a link that loses 5 % of its
    packets of its own (all asked for again and repaired: the reports' own loss reads 2-4 %)."""
    now = start
    while now < start + seconds:
        now = round(now + 0.075, 6)
        bwe.on_transport_feedback([], state, acked, now)
        if int(now) != int(now - 0.075):
            bwe.on_report(8, now, asked=0.05)


def test_random_loss_the_delay_does_not_confirm_does_not_hold_the_climb() -> None:
    bwe = BandwidthEstimate(estimate=400_000, confirmed=True)
    heard(bwe, 0.0, acked=380_000)
    lossy_feedback(bwe, 0.0, 1.0, acked=380_000)
    before = bwe.estimate
    lossy_feedback(bwe, 1.0, 3.0, acked=380_000)
    assert bwe.estimate == pytest.approx(before * GROWTH_PER_PACKET ** 3, rel=0.02)  # 8 % a second


def test_a_cluster_on_a_link_that_loses_packets_of_its_own_is_judged_by_its_packets_not_by_nacks() -> None:
    bwe = BandwidthEstimate()
    heard(bwe, 0.0, acked=90_000)
    bwe.on_report(0, now=0.1)
    rate = bwe.probe_rate(0.6, wanted=2_000_000)  # the first, before the link has lost enough to count as lossy
    assert rate is not None
    bwe.on_nack(0.65)  # a random loss in the middle of it
    bwe.on_report(0, now=0.7, asked=0.05)
    assert bwe.padding(0.7)
    bwe.on_transport_feedback(packets(0.6, 0.3, rate, size=300), NORMAL, 90_000, 0.95)  # its packets came on time
    assert bwe.successful_probes == 1 and bwe.failed_probes == 0


def test_growth_stops_while_the_queue_grows_and_goes_no_further_than_half_again_what_arrives() -> None:
    bwe = BandwidthEstimate(estimate=400_000, confirmed=True)
    heard(bwe, 0.0, acked=380_000)
    lossy_feedback(bwe, 0.0, 1.0, acked=380_000, state=OVERUSE)
    assert bwe.estimate < 400_000  # (cut, and no growth while the detector reads overuse)
    cut = bwe.estimate
    lossy_feedback(bwe, 1.0, 0.5, acked=300_000, state="underuse")
    assert bwe.estimate == cut
    lossy_feedback(bwe, 2.0, 20.0, acked=300_000)  # a publisher that sends no more than 300 kbit/s
    assert bwe.estimate == pytest.approx(300_000 * GROWTH_ABOVE_ACKED)


def test_a_probe_that_works_steps_past_a_rate_that_failed_while_the_link_was_low() -> None:
    bwe = BandwidthEstimate(estimate=200_000, confirmed=True)
    heard(bwe, 0.0, acked=200_000)
    bwe.on_report(0, now=0.1)
    bwe.ceiling = 330_000  # a probe failed there while the link was at 300 kbit/s
    first = bwe.probe_rate(1.0, wanted=2_000_000)
    assert first == pytest.approx((200_000 + 330_000) / 2)  # (closing in on it, as before)
    bwe.on_transport_feedback(packets(1.0, 0.3, first), NORMAL, 200_000, 1.35)  # on time: the link has room
    assert bwe.probe is None and bwe.successful_probes == 1
    usable = bwe.usable
    second = bwe.probe_rate(1.4, wanted=2_000_000)
    assert second == pytest.approx(330_000 * PROBE_ABOVE_CEILING)  # past the old failure, not halfway to it
    assert second > (usable + 330_000) / 2
    bwe.on_transport_feedback(packets(1.4, 0.3, second, first_seq=1000), NORMAL, 200_000, 1.75)
    assert bwe.ceiling is None  # (it worked above the rate that failed: forgotten)


def test_a_link_back_from_300_kbit_s_to_2_mbit_s_is_found_within_seconds() -> None:
    bwe = BandwidthEstimate()
    heard(bwe, 0.0)
    bwe.on_report(0, now=0.0)
    fifo_link(bwe, capacity=300_000, until=15.0)  # probes fail at the link and back off
    assert bwe.usable < 330_000 and bwe.failed_probes >= 1
    fifo_link(bwe, capacity=2_000_000, until=22.0, start=15.0)
    assert bwe.usable >= 1_600_000  # within the seven seconds after it came back


@dataclass
class _Tap:
    uplink_estimate: int | None = None
    told: list[int] = field(default_factory=list)

    async def send_remb(self, bitrate: int, ssrcs: list[int]) -> None:
        self.told.append(bitrate)


@dataclass
class _Budget:
    budget: float

    def video_budget(self) -> float | None:
        return self.budget


@dataclass(eq=False)
class _Subscriber:
    link: _Budget


async def test_a_lagging_uplink_estimate_does_not_hold_the_publishers_cap_but_a_falling_one_does() -> None:
    now = [0.0]
    tap = _Tap(uplink_estimate=300_000)  # aiortc's: at most 1.5 times what arrives, 8 % a second more
    publication = Publication("kit", "video", cast(Any, tap), clock=lambda: now[0])
    publication.source_ssrc = 1234
    publication.meter.rate = 250_000.0
    publication.subscriptions.add(cast(Any, _Subscriber(_Budget(2_000_000))))  # a link proven to 2 Mbit/s
    await publication._tell_rate_cap()
    assert tap.told[-1] == pytest.approx(250_000 * UPLINK_STEP)  # twice what it sends, not 300 kbit/s
    publication.meter.rate = 480_000.0  # its encoder followed
    now[0] = 1.5
    await publication._tell_rate_cap()
    assert tap.told[-1] == pytest.approx(480_000 * UPLINK_STEP)
    publication.meter.rate = 950_000.0
    tap.uplink_estimate = 1_400_000
    now[0] = 2.5
    await publication._tell_rate_cap()
    assert tap.told[-1] == pytest.approx(2_000_000 / SOURCE_HEADROOM, rel=0.01)  # the subscriber's, from there
    now[0] = 3.0
    tap.uplink_estimate = 400_000  # overuse on the uplink: aiortc cut its estimate
    await publication._tell_rate_cap()
    assert tap.told[-1] == 400_000
    now[0] = 3.0 + UPLINK_CALM - 1
    tap.uplink_estimate = 430_000  # (growing again)
    await publication._tell_rate_cap()
    assert tap.told[-1] == 430_000  # a ceiling while its fall is recent
    now[0] = 3.0 + UPLINK_CALM + 1
    publication.meter.rate = 400_000.0  # (what it sends under that ceiling)
    await publication._tell_rate_cap()
    assert tap.told[-1] == pytest.approx(400_000 * UPLINK_STEP)  # calm again: twice what it sends

    # The subscriber's link falls: the publisher is told less and sends less, and aiortc's estimate sinks with
    # what arrives, staying over it. That is no congestion: the cap may still go a step over what it sends.
    now[0] = 20.0
    publication.meter.rate = 130_000.0
    tap.uplink_estimate = 190_000
    await publication._tell_rate_cap()
    now[0] = 21.0
    tap.uplink_estimate = 160_000
    await publication._tell_rate_cap()
    assert tap.told[-1] == pytest.approx(130_000 * UPLINK_STEP)


def test_the_kits_encoder_uses_a_fast_links_cap_and_keeps_its_spare_on_a_thin_one() -> None:
    from aiortc.mediastreams import VideoStreamTrack

    from mediaserver.video_encoders import EncodedVideoTrack, Vp8Encoder

    track = EncodedVideoTrack(VideoStreamTrack(), Vp8Encoder(640, 360, 15, 800_000))
    try:
        track.follow_remb(100_000)
        assert track.encoder.bitrate == 90_000  # a tenth spare for a keyframe's overshoot
        track.follow_remb(1_800_000)
        assert track.encoder.bitrate == 1_740_000  # not 1.62 Mbit/s: 60 kbit/s spare is plenty at this rate
    finally:
        track.stop()


def test_the_queue_a_cluster_left_on_a_full_link_is_its_own_doing_and_cuts_nothing() -> None:
    bwe, rate = probing(acked=300_000, wanted=2_000_000, estimate=600_000, confirmed=True)
    # the link is about full: the cluster arrives at 90 % of the rate it was sent at, and is proven at that
    bwe.on_transport_feedback(packets(1.0, 0.3, rate, size=300, delay_growth=0.11), NORMAL, 300_000, 1.35)
    proven = bwe.estimate
    assert proven > 600_000 and bwe.probe is None
    bwe.on_transport_feedback([], OVERUSE, 320_000, 1.5)  # the queue it left, read a moment later
    assert bwe.estimate == proven  # not cut to 0.85 times what the publisher sends


async def test_the_subscriber_the_cap_follows_stays_on_the_original_through_a_cut_but_not_a_drop() -> None:
    from mediaserver.forwarder import Subscription
    from mediaserver.rewriter import StreamRewriter
    from tests.test_steady_probes import _Link

    levels = [(0, 50_000.0), (1, 150_000.0), (3, 1_630_000.0)]  # the original at its cap, 1.48 Mbit/s, and headroom
    publication = Publication("kit", "video", cast(Any, None), clock=lambda: 0.0)
    link = _Link(1_350_000)  # overuse at the link's capacity: cut to 0.85 times what was acknowledged
    link.bandwidth.on_report(0, 9.0)
    subscription = Subscription(publication, cast(Any, None), StreamRewriter(90000), link)
    subscription.level = subscription.chooser.current = 3
    await subscription.decide(10.0, levels, cap_limited=True, best_budget=1_350_000)
    assert subscription.level == 3 and subscription.target is None  # (its cap follows the cut within a second)
    link.bandwidth.estimate = 260_000  # the link dropped to 300 kbit/s
    await subscription.decide(10.25, levels, cap_limited=True, best_budget=260_000)
    assert subscription.target == 1  # a layer, at once


@dataclass(eq=False)
class _Deciding:
    """A subscriber as Publication.decide sees it: its link's budget, and a level it keeps."""

    link: _Budget
    level: int | None = 3
    target: int | None = None

    async def decide(self, now: float, levels: Any, cap_limited: bool, best: float | None = None) -> None:
        pass


async def test_a_cap_that_falls_by_more_than_a_third_is_told_at_once_a_smaller_fall_at_the_next_second() -> None:
    from mediaserver.forwarder import REMB_INTERVAL

    now = [0.0]
    tap = _Tap(uplink_estimate=None)
    publication = Publication("kit", "video", cast(Any, tap), clock=lambda: now[0], adaptation=True)
    publication.source_ssrc = 1234
    subscriber = _Deciding(_Budget(1_650_000))
    publication.subscriptions.add(cast(Any, subscriber))
    await publication._tell_rate_cap()
    assert tap.told == [pytest.approx(1_500_000, abs=1)]
    subscriber.link.budget = 1_400_000  # a cut at the link's capacity
    now[0] = 0.25
    await publication.decide(0.25)
    assert len(tap.told) == 1  # (at the next REMB_INTERVAL)
    subscriber.link.budget = 260_000  # the link dropped
    now[0] = 0.5
    await publication.decide(0.5)
    assert tap.told[-1] == pytest.approx(260_000 / SOURCE_HEADROOM, rel=0.01) and now[0] < REMB_INTERVAL


def test_a_link_that_falls_right_after_a_probe_is_cut_at_once() -> None:
    bwe = BandwidthEstimate(estimate=1_800_000, confirmed=True)
    heard(bwe, 0.0, acked=1_700_000)
    bwe.on_report(0, now=0.1)
    bwe.blame_until, bwe.blame_acked = 10.6, 1_700_000  # a probe failed at 10.0: the queue it left is its own
    bwe.on_transport_feedback([], OVERUSE, 1_600_000, 10.1)
    assert bwe.estimate == 1_800_000
    bwe.on_transport_feedback([], OVERUSE, 320_000, 10.4)  # what arrives fell to a sixth: that is the link
    assert bwe.estimate == pytest.approx(320_000 * 0.85)


async def test_the_cap_steps_from_what_the_publisher_sent_in_its_last_half_second_not_from_the_smoothed_rate() -> None:
    now = [0.0]
    tap = _Tap(uplink_estimate=200_000)
    publication = Publication("kit", "video", cast(Any, tap), clock=lambda: now[0])
    publication.source_ssrc = 1234
    publication.subscriptions.add(cast(Any, _Subscriber(_Budget(2_000_000))))
    meter = publication.meter
    for tick in range(40):  # four seconds at 150 kbit/s
        meter.add(150_000 // 8 // 10, tick / 10)
    for tick in range(40, 46):  # then half a second at 450 kbit/s: its encoder used the cap it was told
        meter.add(450_000 // 8 // 10, tick / 10)
    meter.current(4.6)
    assert meter.rate < 300_000 < meter.latest, "the smoothed rate still lags"
    now[0] = 4.6
    await publication._tell_rate_cap()
    assert tap.told[-1] == pytest.approx(meter.latest * UPLINK_STEP)


def test_a_cluster_a_little_slower_than_it_was_sent_that_still_proves_much_more_does_not_back_the_next_off() -> None:
    bwe, rate = probing(acked=900_000, wanted=4_000_000, estimate=1_000_000, confirmed=True)
    # its packets arrive over 1.07 times the span they were sent in: the link is about full at what arrived,
    # which is still well over the estimate
    bwe.on_transport_feedback(packets(1.0, 0.2, rate, delay_growth=0.07), NORMAL, 900_000, 1.3)
    assert bwe.probe is None and bwe.usable >= 1_000_000 * 1.1
    assert bwe.failed_probes == 0, "it proved more: no back-off"
    assert bwe.probe_rate(1.35, wanted=4_000_000) is not None, "the next at once"
