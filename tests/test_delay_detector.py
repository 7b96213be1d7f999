"""The delay-based detector, driven by made-up per-packet feedback on a fake clock."""

from __future__ import annotations

from mediaserver.delay_detector import NORMAL, OVERUSE, UNDERUSE, DelayDetector
from mediaserver.twcc import PacketResult

from .gc_helpers import young_objects_after


def link(rate_bps: float, send_bps: float, seconds: float, start: float = 0.0, first_seq: int = 0,
         free_at: float = 0.0, size: int = 1000) -> tuple[list[PacketResult], float]:
    """Packets sent at ``send_bps`` through a bottleneck of ``rate_bps`` that is busy until ``free_at``:
    their results, and when the bottleneck is free again."""
    results: list[PacketResult] = []
    gap, service = size * 8 / send_bps, size * 8 / rate_bps
    for i in range(int(seconds / gap)):
        sent = start + i * gap
        free_at = max(free_at, sent) + service
        results.append(PacketResult(first_seq + i, sent, size, False, free_at + 0.05))
    return results, free_at


def feed(detector: DelayDetector, results: list[PacketResult], every: int = 10) -> list[str]:
    return [detector.on_results(results[i:i + every]) for i in range(0, len(results), every)]


def test_a_link_with_room_reads_normal_and_acknowledges_what_was_sent() -> None:
    detector = DelayDetector()
    results, _ = link(rate_bps=2_000_000, send_bps=500_000, seconds=5)
    states = feed(detector, results)
    assert set(states) == {NORMAL}
    assert detector.acked_rate is not None and abs(detector.acked_rate - 500_000 * 1028 / 1000) < 50_000


def test_sending_over_the_link_reads_overuse_within_a_fraction_of_a_second() -> None:
    detector = DelayDetector()
    calm, _ = link(rate_bps=2_000_000, send_bps=1_000_000, seconds=3)
    feed(detector, calm)
    assert detector.state == NORMAL
    flood, _ = link(rate_bps=300_000, send_bps=1_000_000, seconds=2, start=3.0, first_seq=len(calm))
    states = feed(detector, flood, every=5)
    first_overuse = states.index(OVERUSE)
    # each step is five packets of 8 ms: overuse within about 0.3 s of the link dropping
    assert first_overuse * 5 * 0.008 < 0.3
    # and what the receiver acknowledges falls to what the link carries
    assert detector.acked_rate is not None and detector.acked_rate < 400_000


def test_a_queue_draining_reads_underuse_then_normal_once_it_is_empty() -> None:
    detector = DelayDetector()
    flood, busy = link(rate_bps=600_000, send_bps=1_000_000, seconds=1.5)
    assert OVERUSE in feed(detector, flood)
    draining, busy = link(rate_bps=600_000, send_bps=200_000, seconds=1.5, start=1.5, first_seq=len(flood),
                          free_at=busy)
    assert busy < 3.0  # (the queue has drained)
    assert UNDERUSE in feed(detector, draining, every=5)
    after, _ = link(rate_bps=600_000, send_bps=200_000, seconds=4, start=3.0, first_seq=len(flood) + len(draining),
                    free_at=busy)
    assert feed(detector, after)[-1] == NORMAL


def test_lost_packets_and_jitter_within_a_burst_say_nothing() -> None:
    detector = DelayDetector()
    results, _ = link(rate_bps=2_000_000, send_bps=500_000, seconds=5)
    shaken = [PacketResult(r.sequence, r.sent, r.size, r.copy,
                           None if r.sequence % 7 == 0 else (r.arrival or 0) + (0.002 if r.sequence % 2 else 0.0))
              for r in results]
    assert set(feed(detector, shaken)) == {NORMAL}


def test_the_threshold_adapts_to_a_noisy_link_but_stays_bounded() -> None:
    detector = DelayDetector()
    results, _ = link(rate_bps=2_000_000, send_bps=500_000, seconds=20)
    noisy = [PacketResult(r.sequence, r.sent, r.size, r.copy, (r.arrival or 0) + 0.004 * ((r.sequence // 3) % 2))
             for r in results]
    feed(detector, noisy)
    assert 6.0 <= detector.threshold <= 600.0


def test_the_rate_sent_beside_the_rate_acknowledged_tells_a_link_that_keeps_up_from_a_full_one() -> None:
    roomy = DelayDetector()
    feed(roomy, link(rate_bps=1_000_000, send_bps=400_000, seconds=3)[0])
    assert roomy.acked_rate is not None and roomy.sent_rate is not None
    assert roomy.acked_rate >= 0.9 * roomy.sent_rate, "everything sent arrives as fast as it was sent"
    full = DelayDetector()
    feed(full, link(rate_bps=250_000, send_bps=500_000, seconds=3)[0])
    assert full.acked_rate is not None and full.sent_rate is not None
    assert full.acked_rate < 0.6 * full.sent_rate, "a full link stretches them: what arrives lags"


def test_a_full_queue_that_drops_what_overflows_it_reads_as_a_link_that_does_not_keep_up() -> None:
    # 1.5 Mbit/s into a 300 kbit/s link with a 300 ms queue: the packets that get in leave at about the rate
    # they came (one in five), and only the lost ones tell it from a link with room.
    detector = DelayDetector()
    free_at, results = 0.0, []
    gap, service = 1000 * 8 / 1_500_000, 1000 * 8 / 300_000
    for i in range(int(2.0 / gap)):
        sent = i * gap
        if max(free_at, sent) - sent > 0.3:
            results.append(PacketResult(i, sent, 1000, False, None))
            continue
        free_at = max(free_at, sent) + service
        results.append(PacketResult(i, sent, 1000, False, free_at + 0.05))
    feed(detector, results)
    assert detector.acked_rate is not None and detector.sent_rate is not None
    assert detector.acked_rate > 0.8 * detector.sent_rate, "the ones it keeps are not stretched"
    assert detector.lost_share > 0.7, "four in five are lost"
    clean = DelayDetector()
    results, _ = link(rate_bps=1_000_000, send_bps=400_000, seconds=3)
    # (a probe's duplicates, every third packet, are dropped by the receiver unnoted: they are no loss)
    feed(clean, [PacketResult(r.sequence, r.sent, r.size, True, None) if r.sequence % 3 == 0 else r for r in results])
    assert clean.lost_share == 0.0


def test_what_arrives_now_shows_a_fall_at_once_where_the_half_seconds_average_lags() -> None:
    detector = DelayDetector()
    calm, free_at = link(rate_bps=2_000_000, send_bps=1_500_000, seconds=3)
    feed(detector, calm)
    assert detector.arriving_rate is not None and abs(detector.arriving_rate - 1_500_000 * 1028 / 1000) < 150_000
    # The link falls to 300 kbit/s: 0.2 s of arrivals later, the half second's average still reads about 1 Mbit/s.
    fallen, _ = link(rate_bps=300_000, send_bps=1_500_000, seconds=0.05, start=3.0, first_seq=len(calm),
                     free_at=free_at)
    feed(detector, fallen)
    assert detector.acked_rate is not None and detector.acked_rate > 600_000
    assert detector.arriving_rate is not None and detector.arriving_rate < 350_000


def test_the_queue_is_the_newest_arrivals_delay_over_the_least_lately() -> None:
    detector = DelayDetector()
    # a link with room: every packet at its least delay, whatever the clocks' offset (here 1000 s)
    results, free_at = link(rate_bps=2_000_000, send_bps=500_000, seconds=2)
    feed(detector, [PacketResult(r.sequence, r.sent, r.size, r.copy, (r.arrival or 0) + 1000) for r in results])
    assert detector.queue_delay is not None and detector.queue_delay < 0.005
    # sent at twice the link for half a second: a queue half a second deep by its end
    results, _ = link(rate_bps=500_000, send_bps=1_000_000, seconds=0.5, start=2.0, first_seq=1000, free_at=free_at)
    feed(detector, [PacketResult(r.sequence, r.sent, r.size, r.copy, (r.arrival or 0) + 1000) for r in results])
    assert detector.queue_delay is not None and 0.45 < detector.queue_delay < 0.55


def test_the_packets_of_the_last_half_second_are_kept_without_objects_the_collector_walks() -> None:
    detector = DelayDetector()
    results, _ = link(rate_bps=10_000_000, send_bps=5_000_000, seconds=3)  # 625 packets a second
    states: list[str] = []
    young = young_objects_after(lambda: states.extend(feed(detector, results)))
    assert set(states) == {NORMAL}
    assert young < 60  # the detector's few groups and points, not the 300 packets of its window
    assert detector.acked_rate is not None and abs(detector.acked_rate - 5_000_000 * 1028 / 1000) < 250_000
