"""Photo upload pacing: the bytes keep to the rate, and the rate gives way to the call's audio."""

from __future__ import annotations

import random

import pytest

from edge.pacing import (
    KIB,
    MAX_CHUNK,
    MIN_CHUNK,
    HeldEstimate,
    RttSample,
    ScavengerRate,
    ScavengerSettings,
    SocketSignal,
    TokenBucket,
    chunk_size,
)
from edge.uplink import QueueSample

CEILING = 250_000.0  # 2 Mbit/s in bytes per second


def test_the_bucket_lets_a_burst_through_then_paces_at_its_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=500.0, now=0.0)
    assert bucket.take(500, 0.0) == 0.0
    assert bucket.take(250, 0.0) == pytest.approx(0.25)
    assert bucket.take(250, 0.25) == pytest.approx(0.25)  # the debt carried over: 0.5 s from the start
    bucket.set_rate(2000.0, 0.5)
    assert bucket.take(1000, 0.5) == pytest.approx(0.5)


def test_the_bucket_sends_no_more_than_its_rate_over_time() -> None:
    bucket = TokenBucket(rate=32_000.0, burst=2 * KIB, now=0.0)
    now, sent = 0.0, 0
    while now < 10.0:
        now += bucket.take(1 * KIB, now)
        sent += 1 * KIB
    assert sent <= 32_000 * 10 + 2 * KIB + 1 * KIB


@pytest.mark.parametrize(
    ("rate", "size"),
    [(1_000.0, MIN_CHUNK), (32_000.0, 48_000), (250_000.0, 375_000), (5_000_000.0, MAX_CHUNK)],
)
def test_a_chunk_is_about_one_and_a_half_seconds_of_bytes_within_bounds(rate: float, size: int) -> None:
    assert chunk_size(rate) == size


def scavenger() -> ScavengerRate:
    return ScavengerRate(ScavengerSettings(ceiling=CEILING))


def test_without_a_call_the_ceiling_applies() -> None:
    rate = scavenger()
    assert rate.update(0.0, None) == CEILING and rate.update(10.0, None) == CEILING
    assert not rate.in_call


def test_a_call_starts_it_low_then_it_grows_fast_until_a_queue_shows_and_slowly_after() -> None:
    rate = scavenger()
    start = rate.update(0.0, RttSample(0.100, 0.0))
    assert start == 8 * KIB and rate.in_call
    at_five = rate.update(5.0, RttSample(0.100, 4.5))  # no queue: slow start
    assert at_five == pytest.approx(start * 2 ** (0.7 * 5))
    rate.update(6.0, RttSample(0.140, 6.0))  # 40 ms of queue: the slow start ends, no cut below the target
    at_six = rate.rate
    at_sixteen = rate.update(16.0, RttSample(0.100, 15.5))
    assert at_six < at_sixteen < at_six * 1.09**10
    assert rate.update(17.0, None) == CEILING


def test_queueing_above_the_target_cuts_once_a_second_down_to_the_floor() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0))
    before = rate.update(5.0, RttSample(0.100, 5.0))
    assert rate.update(5.5, RttSample(0.300, 5.5)) == pytest.approx(before * 0.75)
    assert rate.update(5.9, RttSample(0.300, 5.9)) == pytest.approx(before * 0.75)  # not again within a second
    assert rate.update(6.5, RttSample(0.300, 6.5)) == pytest.approx(before * 0.75**2)
    for second in range(7, 40):
        last = rate.update(float(second), RttSample(0.300, float(second)))
    assert last == rate.settings.floor
    assert rate.queueing == pytest.approx(0.200)


def test_the_base_is_the_lowest_round_trip_of_the_last_two_minutes() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.080, 0.0))
    rate.update(1.0, RttSample(0.200, 1.0))
    assert rate.base == pytest.approx(0.080)
    rate.update(200.0, RttSample(0.200, 200.0))  # the route changed: 80 ms is history
    assert rate.base == pytest.approx(0.200) and rate.queueing == 0.0


def test_beside_a_call_on_a_256_kbits_uplink_the_audio_keeps_a_short_queue() -> None:
    """A fluid model of the kit's uplink: capacity, the call's audio, the upload, and one queue in front.

    Receiver reports come twice a second and carry the queue's delay; the upload
    should use most of what the audio leaves and keep the queue near its target.
    """
    capacity, audio, base, step = 32_000.0, 4_000.0, 0.100, 0.05
    rate = scavenger()
    backlog, sample = 0.0, RttSample(base, 0.0)
    delays, rates, peak = [], [], 0.0
    for n in range(int(180 / step)):
        now = n * step
        if n % 20 == 0:  # a receiver report a second
            sample = RttSample(base + backlog / capacity, now)
        sending = rate.update(now, sample)
        backlog = max(0.0, backlog + (sending + audio - capacity) * step)
        peak = max(peak, backlog / capacity)
        if now >= 60.0:
            delays.append(backlog / capacity)
            rates.append(sending)
    print(f"queue: peak {peak * 1000:.0f} ms, after the first minute at most {max(delays) * 1000:.0f} ms, "
          f"{sum(delays) / len(delays) * 1000:.0f} ms on average; upload {sum(rates) / len(rates) * 8 / 1000:.0f} "
          f"kbit/s of the {(capacity - audio) * 8 / 1000:.0f} left")
    assert peak < 0.300  # once, as the slow start ends
    assert max(delays) < 0.150  # the audio never waits long behind photo bytes
    assert sum(delays) / len(delays) < 0.040
    assert sum(rates) / len(rates) > 0.8 * (capacity - audio)  # and the photo still gets most of the rest


def test_beside_a_call_on_a_good_link_a_large_photo_still_takes_seconds() -> None:
    capacity, audio, base, step = 250_000.0, 4_000.0, 0.050, 0.05
    rate = scavenger()
    backlog, sample, sent, now = 0.0, RttSample(base, 0.0), 0.0, 0.0
    while sent < 3_000_000:
        if round(now / step) % 20 == 0:
            sample = RttSample(base + backlog / capacity, now)
        sending = rate.update(now, sample)
        backlog = max(0.0, backlog + (sending + audio - capacity) * step)
        sent += sending * step
        now += step
    assert now < 25.0  # 3 MB over 2 Mbit/s: 12 s alone on the link


def test_a_call_without_a_measurement_yet_holds_the_starting_rate() -> None:
    rate = scavenger()
    assert rate.update(0.0, None, in_call=True) == 8 * KIB and rate.in_call
    assert rate.update(5.0, None, in_call=True) == 8 * KIB
    assert rate.update(6.0, RttSample(0.100, 6.0), in_call=True) == 8 * KIB  # the first measurement: the base
    assert rate.update(7.0, RttSample(0.100, 7.0), in_call=True) > 8 * KIB
    assert rate.update(8.0, None, in_call=False) == CEILING


def test_without_a_fresh_round_trip_the_rate_holds_instead_of_growing_on_an_old_one() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0))
    grown = rate.update(2.0, RttSample(0.100, 2.0))  # slow start on fresh reports
    last = RttSample(0.110, 3.0)
    assert rate.update(3.0, last) > grown
    held = rate.update(5.0, last)  # two seconds without a report: still news enough
    for second in range(6, 30):  # none since: lost, or stuck behind a queue that keeps growing
        assert rate.update(float(second), last) == held
    # A report again, half a second after the last update: growth goes on from the held rate, for that
    # half second only, not for the silent time.
    assert rate.update(29.5, RttSample(0.105, 29.5)) == pytest.approx(held * 2 ** (0.7 * 0.5))


def test_while_tcp_is_behind_the_rate_it_does_not_grow_but_a_queue_still_cuts_it() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0))
    rate.update(6.0, RttSample(0.140, 6.0))  # past the slow start
    before = rate.rate
    # Two seconds of bytes wait unsent in the socket (TCP repairing losses): a low queue says nothing.
    for second in range(7, 20):
        assert rate.update(float(second), RttSample(0.110, float(second)), unsent=int(2 * before)) == before
    assert rate.update(20.0, RttSample(0.400, 20.0), unsent=int(2 * before)) == pytest.approx(0.75 * before)
    assert rate.update(22.0, RttSample(0.110, 22.0), unsent=0) > 0.75 * before  # caught up: it grows again


# --- with the upload connection's own round trip and deliveries (TCP_INFO) ---


def reading(at: float, acked: float, rtt: float = 0.150, min_rtt: float = 0.100, connection: int = 1,
            unsent: int = 0) -> SocketSignal:
    return SocketSignal(at, connection, int(acked) + 64 * KIB, rtt, min_rtt, unsent)


def test_the_connections_round_trip_cuts_at_once_to_under_what_tcp_delivered() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 30_000.0  # well past the slow start, far above the link
    rate.update(2.0, RttSample(0.100, 1.5), sock=reading(2.0, 48_000))  # TCP delivered 24 kB/s
    assert rate.delivered == pytest.approx(24_000)
    # The call's report (half a second old) shows 60 ms of queue, not over its 60 ms target; the connection's
    # round trip, 170 ms above its base (the lowest of its smoothed round trips), says the queue has grown
    # since: cut at once, under what was delivered, the deeper the longer the queue (gone in a second).
    cut = rate.update(2.2, RttSample(0.160, 1.7), sock=reading(2.2, 52_000, rtt=0.320))
    assert cut == pytest.approx(24_000 * (1 - 0.170 / 1.0))
    # The same queue, shorter, a moment later: draining already, no second cut.
    assert rate.update(3.3, RttSample(0.160, 2.5), sock=reading(3.3, 70_000, rtt=0.315)) == cut
    # Longer still a second later: cut again.
    assert rate.update(3.5, RttSample(0.160, 2.5), sock=reading(3.5, 72_000, rtt=0.370)) < cut


def test_the_connections_round_trip_alone_cuts_only_when_long() -> None:
    """A slow upload's round trip grows with no queue at all (its packets come far apart, and the server
    delays its acknowledgements): unless the call's report shows a queue too, only a long one counts."""
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 12_000.0
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 24_000))
    kept = rate.update(2.2, RttSample(0.100, 2.0), sock=reading(2.2, 26_000, rtt=0.330))
    assert kept >= 12_000.0  # 180 ms above its base: not cut
    assert rate.update(2.4, RttSample(0.100, 2.0), sock=reading(2.4, 28_000, rtt=0.500)) < 12_000.0  # 350 ms


def test_the_rate_grows_to_at_most_a_little_above_what_tcp_delivered() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    acked = 0.0
    for tenth in range(1, 300):  # the link carries 10 kB/s of the upload, however fast it is asked to go
        now = tenth / 10
        acked += min(rate.rate, 10_000.0) / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked))
        assert rate.rate <= 8 * KIB * 2 ** (0.7 * now) + 1
    assert rate.share == pytest.approx(10_000, rel=0.01)
    # The slow start ended when TCP stopped keeping up; without the connection's reading, a link whose
    # round trips show no queue would have grown it to the ceiling.
    assert 10_000 < rate.rate <= 15_000
    rate.update(30.1, RttSample(0.100, 30.1), sock=reading(30.1, acked + 500, rtt=0.500))  # a queue: cut
    for tenth in range(302, 600):
        now = tenth / 10
        acked += min(rate.rate, 10_000.0) / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked))
    assert rate.rate <= 10_000 * 1.05 + 2 * KIB + 1  # after a queue: at most 5 % and 16 kbit/s above what TCP did


def test_a_new_connection_counts_its_deliveries_from_its_own_start() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 20_000))
    rate.update(3.0, RttSample(0.100, 3.0), sock=reading(3.0, 500, connection=2))  # after an outage
    assert rate.delivered == pytest.approx(10_000)  # not a negative rate, nor the new one's from the old start
    rate.update(5.0, RttSample(0.100, 5.0), sock=reading(5.0, 24_500, connection=2))
    assert rate.delivered == pytest.approx(12_000)


def test_beside_a_call_on_a_256_kbits_uplink_with_the_connections_reading_the_queue_stays_shorter() -> None:
    """The fluid model above, with the upload's own connection: its round trip carries the queue within a
    third of a second (smoothed), the call's reports come a second apart and half a second late; the call
    takes 55 kbit/s (24 kbit/s of Opus in 50 packets a second, with their headers)."""
    capacity, audio, base, step = 32_000.0, 7_000.0, 0.100, 0.02  # the call: 55 kbit/s with its headers
    rate = scavenger()
    backlog, acked, srtt = 0.0, 0.0, base
    sample, reports = RttSample(base, 0.0), []
    delays, carried, peak = [], [], 0.0
    for n in range(int(180 / step)):
        now = n * step
        if n % int(1 / step) == 0:
            reports.append(RttSample(base + backlog / capacity, now + 0.5))
        while reports and reports[0].at <= now:
            sample = reports.pop(0)
        srtt += (base + backlog / capacity - srtt) * step / 0.3
        sending = rate.update(now, sample, sock=reading(now, acked, srtt, base))
        through = sending if backlog == 0 and sending + audio <= capacity else capacity * sending / (sending + audio)
        backlog = max(0.0, backlog + (sending + audio - capacity) * step)
        acked += through * step
        peak = max(peak, backlog / capacity)
        if now >= 60.0:
            delays.append(backlog / capacity)
            carried.append(through)
    print(f"queue: peak {peak * 1000:.0f} ms, after the first minute at most {max(delays) * 1000:.0f} ms, "
          f"{sum(delays) / len(delays) * 1000:.0f} ms on average; upload {sum(carried) / len(carried) * 8 / 1000:.0f} "
          f"kbit/s of the {(capacity - audio) * 8 / 1000:.0f} left")
    assert peak < 0.200  # once, as the slow start ends
    assert max(delays) < 0.130
    assert sum(delays) / len(delays) < 0.040
    assert sum(carried) / len(carried) > 0.9 * (capacity - audio)


def test_the_uplink_counts_as_thin_for_a_minute_after_a_queue_showed_beside_a_slow_upload() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    assert rate.thin_uplink(0.0)  # presumed so as the call's upload begins
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 40_000))  # 20 kB/s: 160 kbit/s
    rate.update(2.5, RttSample(0.100, 2.0), sock=reading(2.5, 45_000, rtt=0.500))  # a queue in front of the call
    assert rate.thin_uplink(3.0) and rate.thin_uplink(62.0) and not rate.thin_presumed(3.0)
    assert not rate.thin_uplink(63.0)  # a minute without another: the call may spend more on headers again


def test_a_calls_upload_begins_with_the_uplink_presumed_thin_until_it_shows_itself() -> None:
    """Thin until TCP delivers more than a thin link carries, or a queue shows (judged as ever from then),
    or ten seconds pass: the slow start then no longer meets the call's audio in 20 ms packets."""
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    assert rate.thin_uplink(0.0) and rate.thin_presumed(0.0)
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 20_000))  # 80 kbit/s delivered: still unknown
    assert rate.thin_uplink(2.0)
    rate.update(4.0, RttSample(0.100, 4.0), sock=reading(4.0, 100_000))  # 320 kbit/s: room shown
    assert not rate.thin_uplink(4.0)
    assert not rate.thin_uplink(5.0), "once shown, the presumption is over"

    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 20_000))
    assert rate.thin_uplink(9.9) and not rate.thin_uplink(10.0), "neither shown in ten seconds: presumed no longer"
    rate.update(30.0, None, in_call=False)
    rate.update(31.0, RttSample(0.100, 31.0), sock=reading(31.0, 20_000))
    assert rate.thin_uplink(31.0), "the next call's upload begins presumed thin again"
    rate.update(32.0, None, in_call=False)
    assert not rate.thin_uplink(32.0), "without a call, nothing is thin"


def test_a_queue_beside_a_fast_upload_does_not_make_the_uplink_thin() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 200_000.0
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 400_000))  # 1.6 Mbit/s delivered
    rate.update(2.5, RttSample(0.100, 2.0), sock=reading(2.5, 500_000, rtt=0.500))
    assert not rate.thin_uplink(3.0)


def test_a_rate_cut_low_grows_back_after_an_outage_towards_what_the_link_carried_before() -> None:
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 20_000.0
    acked = 0.0
    for tenth in range(1, 300):  # 30 s: the link carries the 20 kB/s asked of it
        acked += 2_000.0
        rate.update(tenth / 10, RttSample(0.100, tenth / 10), sock=reading(tenth / 10, acked))
    rate.rate = 8_000.0  # cut low as a 20 s outage began (its queue showed, then nothing came)
    for half in range(60, 100):  # the outage: the call's last report grows old, nothing is acknowledged
        rate.update(half / 2, RttSample(0.100, 29.9), sock=reading(half / 2, acked))
    assert rate.rate < 10_000.0  # grown only while the last report was fresh
    acked = 0.0
    for tenth in range(500, 650):  # after it, a new connection, no queue; TCP delivers three quarters of
        now = tenth / 10  # the rate (a timeout on the new connection, the chunks' round trips)
        acked += 0.75 * rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked, connection=2))
    # In 15 s back at 80 % of what the link carried before; capped near what it delivered itself, it
    # would still be under 10 kB/s.
    assert rate.rate >= 0.8 * 20_000 - 1
    assert rate.rate <= 20_000 * 1.05 + 2 * KIB


def test_beside_a_call_on_a_good_link_with_noisy_round_trips_a_large_photo_still_takes_seconds() -> None:
    """The good link again, with the upload's own connection and the noise a busy kit sees with no queue at
    all: its round trip jumps by up to 40 ms (delayed acknowledgements), the call's by up to 30 ms, and
    between two 5 s chunks TCP idles for a round trip."""
    capacity, audio, base, step = 250_000.0, 4_000.0, 0.050, 0.02
    noise = random.Random(7)
    rate = scavenger()
    backlog, acked, sent, now = 0.0, 0.0, 0.0, 0.0
    sample, chunk_left = RttSample(base, 0.0), 0.0
    while sent < 3_000_000 and now < 120.0:
        if round(now / step) % 50 == 0:
            sample = RttSample(base + backlog / capacity + noise.uniform(0.0, 0.030), now)
        srtt = base + backlog / capacity + noise.uniform(0.0, 0.040)
        sending = rate.update(now, sample, sock=reading(now, acked, srtt, base))
        if chunk_left <= 0.0:  # the next PATCH: one round trip with nothing sent
            chunk_left = sending * 5.0
            now += base
            continue
        through = min(sending, capacity - audio)
        backlog = max(0.0, backlog + (sending + audio - capacity) * step)
        acked += through * step
        sent += through * step
        chunk_left -= through * step
        now += step
    print(f"3 MB in {now:.1f} s, the rate at the end {rate.rate * 8 / 1000:.0f} kbit/s")
    assert now < 36.0  # 3 MB over 2 Mbit/s: 12 s alone on the link, here from the call's 64 kbit/s start


def test_a_new_connections_first_round_trips_are_no_queue_until_it_has_carried_enough() -> None:
    """After an outage the new connection's first round trips were inflated to 2 s, which read against the old
    connection's base as a queue of a second and cut the rate by half with no queue in front of the call."""
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 24_000.0
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 48_000))  # settled: its base is 150 ms
    fresh = 24_000.0
    for tenth in range(1, 20):  # the new connection, its first 60 kB: round trips of 2 s, the call's report calm
        now = 30.0 + tenth / 10
        raw = SocketSignal(now, 2, tenth * 3_000, 2.0, 0.150)
        assert rate.update(now, RttSample(0.100, now), sock=raw) >= fresh
    assert rate.socket_queueing is None
    settled = SocketSignal(32.5, 2, 70 * KIB, 2.0, 0.150)  # settled, and still 2 s: a queue after all
    assert rate.update(32.5, RttSample(0.100, 32.5), sock=settled) < fresh


def test_the_kernel_may_send_faster_than_the_rate_to_catch_up_unless_a_queue_cut_it_lately() -> None:
    rate = scavenger()
    assert rate.pacing_rate(0.0) == CEILING  # no call: the ceiling
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 24_000.0
    rate.update(2.0, RttSample(0.100, 2.0), sock=reading(2.0, 48_000))
    assert rate.pacing_rate(2.0) == pytest.approx(rate.rate * 1.25)  # room to make up a repaired loss's stall
    cut = rate.update(2.2, RttSample(0.100, 2.0), sock=reading(2.2, 50_000, rtt=0.500))  # a long queue: cut
    assert cut < 24_000.0
    assert rate.pacing_rate(2.5) == cut  # what waits in the socket goes at the new rate, not faster
    assert rate.pacing_rate(4.3) == pytest.approx(rate.rate * 1.25)
    # A new connection (after an outage) has nothing to make up: the rate itself until it has carried 64 KiB.
    rate.update(5.0, RttSample(0.100, 5.0), sock=SocketSignal(5.0, 2, 0, 0.150, 0.150))
    rate.update(6.0, RttSample(0.100, 6.0), sock=SocketSignal(6.0, 2, 30_000, 0.150, 0.150))
    assert rate.pacing_rate(6.0) == rate.rate
    rate.update(9.0, RttSample(0.100, 9.0), sock=SocketSignal(9.0, 2, 70_000, 0.150, 0.150))
    assert rate.pacing_rate(9.0) == pytest.approx(rate.rate * 1.25)
    # BBR started afresh (it begins at nearly three times its estimate): the rate itself for two seconds.
    rate.restarted(9.0)
    assert rate.pacing_rate(10.9) == rate.rate
    assert rate.pacing_rate(11.1) == pytest.approx(rate.rate * 1.25)


def grown_for_ten_seconds() -> tuple[ScavengerRate, float]:
    """A rate past its slow start, grown from 24 kbit/s for 10 s over a link that carries what is asked,
    and the bytes acknowledged by then. The uplink counts as thin from the start (a queue showed just before)."""
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.update(0.1, RttSample(0.100, 0.1), sock=reading(0.1, 100))
    rate.update(0.2, RttSample(0.100, 0.2), sock=reading(0.2, 200, rtt=0.450))
    assert rate.thin_uplink(0.2)
    acked = 200.0
    rate.rate = 24_000.0
    rate._starting = False
    for tenth in range(1, 100):
        acked += rate.rate / 10
        rate.update(tenth / 10, RttSample(0.100, tenth / 10), sock=reading(tenth / 10, acked))
    return rate, acked


def test_after_a_cut_the_rate_grows_back_quickly_to_near_where_the_queue_showed_then_slowly() -> None:
    rate, acked = grown_for_ten_seconds()
    knee = rate.rate
    acked += knee / 10
    cut = rate.update(10.0, RttSample(0.100, 10.0), sock=reading(10.0, acked, rtt=0.450))  # a 300 ms queue
    assert cut <= 0.75 * knee
    now, back_at = 10.0, None
    while now < 25.0 and (back_at is None or now < back_at + 2.0):
        now = round(now + 0.1, 1)  # TCP delivers what is asked; its round trip 40 ms above its base, the
        acked += rate.rate / 10  # call's report shows no queue (in the benchmark: the link at about 80 %)
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked, rtt=0.190))
        if back_at is None and rate.rate >= 0.9 * knee - 1:
            back_at = now
    assert back_at is not None and back_at - 10.0 <= 3.0  # at the usual pace: 5 s
    assert rate.rate <= 0.9 * knee * 1.02**2 + 1  # from there on, a quarter of the usual pace


def test_a_second_cut_for_the_same_queue_grows_back_to_near_where_the_first_showed() -> None:
    """After an outage the call's first reports showed one queue twice, a second apart: the rate grows back
    quickly towards the rate the first cut was for, not the lower one of the second."""
    rate, acked = grown_for_ten_seconds()
    knee = rate.rate
    for now, queue in ((10.0, 0.300), (11.2, 0.400)):  # longer at the second look: cut again
        acked += rate.rate / 10
        rate.update(now, RttSample(0.100 + queue, now), sock=reading(now, acked, rtt=0.150 + queue))
    assert rate.rate < 0.65 * knee
    now = 11.2
    while now < 14.2:
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked, rtt=0.190))
    assert rate.rate >= 0.9 * knee - 1  # within three seconds (from the second cut's knee: over 20 s)


def test_beside_a_call_only_a_third_of_a_second_of_bytes_may_wait_unsent_in_the_socket() -> None:
    rate = scavenger()
    assert rate.backlog_limit() == float("inf")  # no call: the ceiling paces, the socket holds what it takes
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 24_000.0
    assert rate.backlog_limit() == pytest.approx(24_000 * 0.3)
    rate.rate = 2_000.0
    assert rate.backlog_limit() == 4 * KIB  # on the slowest link still a few packets


def test_past_the_rate_of_the_last_cut_the_rate_grows_at_the_usual_pace_again() -> None:
    """Slow near the rate the last cut was for, but not for good: each cut a little under the last one's rate
    would bring the next lower."""
    rate, acked = grown_for_ten_seconds()
    knee = rate.rate
    acked += knee / 10
    rate.update(10.0, RttSample(0.100, 10.0), sock=reading(10.0, acked, rtt=0.450))
    now = 10.0
    while rate.rate < 1.05 * knee and now < 60.0:  # no queue at all: TCP delivers what is asked
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked))
    assert now < 35.0  # 3 s back to 90 %, then slowly (more slowly still above what TCP delivered lately)
    above = rate.rate
    for _ in range(20):  # 2 s more
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked))
    assert rate.rate >= above * 1.03  # the usual pace above what TCP delivered lately: 2 % a second, not 0.5


def test_a_new_connection_not_keeping_up_at_first_does_not_end_the_slow_start() -> None:
    """A photo's first connection delivers 60-80 % of what the slow start asks while it gets going (its
    handshake, its first round trips); that is no sign of a full link until it has carried 64 KiB."""
    rate = scavenger()
    acked, now = 0.0, 0.0
    rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, 0, 0.150, 0.150))
    while acked < 60 * KIB:
        now = round(now + 0.1, 1)
        acked += 0.7 * rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
    assert rate.kept_up is False and rate._starting
    for _ in range(80):  # settled, and still not keeping up, two intervals in a row: the link is full after all
        now = round(now + 0.1, 1)
        acked += 0.7 * rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
    assert not rate._starting


def test_one_retransmission_timeout_does_not_end_the_slow_start() -> None:
    """On the lossy link a timeout (a second and a half without deliveries) left one interval short; that
    ended the slow start at 106 kbit/s where the link had room for 200. Only a second short interval does."""
    rate = scavenger()
    acked, now = 0.0, 0.0
    rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, 0, 0.150, 0.150))
    for step in range(1, 121):
        now = round(now + 0.1, 1)
        stalled = 80 <= step < 95  # a timeout once the connection has settled
        acked += 0.0 if stalled else rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
        if step == 100:
            assert rate.kept_up is False and rate._starting, "one short interval"
    assert acked > 64 * KIB and rate._starting


def test_a_queue_as_a_photos_first_bytes_go_cuts_the_rate_but_the_slow_start_goes_on() -> None:
    """The call's report showed 77 ms of queue a second after a photo was put in (its first requests, the
    agent busy starting it): the rate is cut, and once the queue is gone it doubles again, not at the usual
    pace. A queue once the connection has carried 64 KiB ends the slow start."""
    rate = scavenger()
    acked, now = 0.0, 0.0
    rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, 0, 0.150, 0.150))
    for step in range(1, 31):
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rtt = 0.197 if step == 10 else 0.100  # 97 ms of queue: over the 60 ms the report may show
        rate.update(now, RttSample(rtt, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
        if step == 10:
            cut = rate.rate
    assert acked < 64 * KIB and rate._starting and rate.rate > 1.5 * cut
    while acked < 64 * KIB:
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
    now = round(now + 0.1, 1)
    rate.update(now, RttSample(0.197, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
    assert not rate._starting


def test_the_slow_start_ends_at_a_short_queue_well_under_the_targets() -> None:
    """In the benchmark, with the targets at 90 and 160 ms, the slow start doubled once more with 33 ms of
    queue in the call's report, to 217 kbit/s beside a call still in 20 ms packets: 300-350 ms of queue for
    two seconds in front of the audio. At half of the 60 ms target it ends; the rate then grows at the usual
    pace."""
    rate = scavenger()
    acked, now = 0.0, 0.0
    rate.update(now, RttSample(0.100, now), sock=SocketSignal(now, 1, 0, 0.150, 0.150))
    while acked < 96 * KIB:  # settled, the queue short, TCP keeping up: doubling
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.110, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
    assert rate._starting
    before = rate.rate
    for _ in range(10):  # a second with 33 ms of queue in the call's report
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.133, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
    assert not rate._starting and rate.rate < 1.1 * before


def test_the_cut_that_finds_the_uplink_thin_keeps_no_knee() -> None:
    """That queue had the call's audio in 20 ms packets in it, which the thin uplink packs into 60 ms ones:
    the rate it showed at says little of the link's room, and growing past it slowly cost the photo's first
    minute a third of the link."""
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 16_000.0
    rate._starting = False
    acked, now = 0.0, 0.0
    for _ in range(20):
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked))
    knee = rate.rate
    acked += knee / 10
    rate.update(2.1, RttSample(0.100, 2.1), sock=reading(2.1, acked, rtt=0.450))  # the first queue: thin from now
    assert rate.thin_uplink(2.1) and rate.rate < 0.8 * knee
    now = 2.1
    while rate.rate < 1.05 * knee and now < 60.0:  # no queue at all: TCP delivers what is asked
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked))
    assert now < 12.0  # with that cut's knee kept: 18 s


def test_a_queue_the_call_reports_before_the_uploads_connection_is_read_cuts_but_the_slow_start_goes_on() -> None:
    """The call's report showed 66 ms of queue a second after a photo went in, before its connection could be
    read: the rate was cut to 49 kbit/s and the slow start ended, and the usual pace took 26 s to 110 kbit/s
    on a link with room for 180. Now the rate is cut and, once the connection is read and the queue is short,
    goes on doubling."""
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), in_call=True)  # the photo goes in: nothing read of its connection
    before = rate.update(0.5, RttSample(0.100, 0.5), in_call=True)
    cut = rate.update(1.0, RttSample(0.166, 1.0), in_call=True)
    assert cut == pytest.approx(before * 0.75) and rate._starting
    acked, now = 0.0, 1.0
    rate.update(now, RttSample(0.166, 1.0), sock=SocketSignal(now, 1, 0, 0.150, 0.150))
    while now < 11.0:  # the connection is open; TCP delivers what is asked; the queue 27 ms, then none
        now = round(now + 0.1, 1)
        acked += rate.rate / 10
        rtt = 0.127 if now < 5.0 else 0.100
        rate.update(now, RttSample(rtt, now), sock=SocketSignal(now, 1, int(acked), 0.150, 0.150))
    assert rate.rate > 110_000 / 8 and rate._starting


def test_with_the_uplinks_standing_queue_a_report_behind_one_of_the_photos_packets_does_not_cut() -> None:
    """On a 256 kbit/s uplink one of the photo's full packets takes 47 ms to send: the report of a packet that
    came behind one or two reads 60-100 ms while the link is not full. Where the server's transport feedback
    tells the queue every packet of the last half second met, that is what counts, against its own target."""
    rate, acked = grown_for_ten_seconds()
    grown = rate.rate
    behind = RttSample(0.180, 10.0)  # 80 ms over the base: over the report's 60 ms target
    acked += grown / 10
    kept = rate.update(10.0, behind, sock=reading(10.0, acked), queue=QueueSample(0.008, 10.0, 9))
    assert kept >= grown and rate.queueing == pytest.approx(0.008)
    # A queue that stands over its target (40 ms) cuts, by a twentieth where the report's cut a tenth: it is
    # measured, and cuts again a second later if it still stands.
    acked += kept / 10
    cut = rate.update(10.1, behind, sock=reading(10.1, acked), queue=QueueSample(0.070, 10.1, 9))
    assert rate.share is not None
    assert cut == pytest.approx(min(0.95 * kept, 0.95 * rate.share))
    acked += cut / 10
    assert rate.update(11.1, behind, sock=reading(11.1, acked), queue=QueueSample(0.070, 11.1, 9)) < cut
    # Without the feedback (older than half a second), the report counts again: over its target, a cut.
    rate, acked = grown_for_ten_seconds()
    acked += rate.rate / 10
    assert rate.update(10.0, behind, sock=reading(10.0, acked), queue=QueueSample(0.008, 9.4, 9)) < 0.9 * grown


def test_with_the_uplinks_standing_queue_the_slow_start_runs_further_ahead_of_what_tcp_delivered() -> None:
    """A queue now shows within about half a second: the slow start may run to 1.6 times what TCP delivered
    (1.3 times on the reports), so a photo beside a call reaches the link's rate in seconds, not tens."""
    for standing, headroom in ((True, 1.6), (False, 1.3)):
        rate = scavenger()
        acked, now = 0.0, 0.0
        highest = 0.0
        while now < 12.0:
            acked += min(rate.rate, 12_000.0) / 10  # the link carries 12 kB/s (96 kbit/s) of the upload
            queue = QueueSample(0.0, now, 8) if standing else None
            rate.update(now, RttSample(0.100, now), sock=reading(now, acked), queue=queue)
            highest = max(highest, rate.rate)
            now = round(now + 0.1, 1)
        assert rate.share == pytest.approx(12_000, rel=0.02)
        assert highest == pytest.approx(headroom * 12_000, rel=0.03), standing


def test_bbr_holding_its_estimate_under_the_rate_is_restarted_once_it_has_held_for_a_while() -> None:
    """BBR's long-term mode: a gain of exactly 1 and an unchanged estimate, 48 round trips long."""
    held = HeldEstimate(held_for=3.0, rounds=10, share=0.95, every=15.0)
    rate = 25_000.0  # 200 kbit/s
    assert not any(held.held(t / 4, 22_600, 1.0, 0.15, rate) for t in range(12))  # under 3 s
    assert held.held(3.0, 22_600, 1.0, 0.15, rate)
    assert held.restarts == 1
    # ... at most once per 15 s, even if it holds again at once
    assert not any(held.held(3.25 + t / 4, 22_600, 1.0, 0.15, rate) for t in range(40))
    assert held.held(18.25, 22_600, 1.0, 0.15, rate)


def test_bbr_probing_or_at_the_rate_or_on_a_long_path_is_left_alone() -> None:
    rate = 25_000.0
    probing = HeldEstimate()
    gains = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # ProbeBW's cycle, one phase a round trip (0.2 s)
    assert not any(probing.held(k * 0.2, 22_600, gains[k % 8], 0.2, rate) for k in range(200))
    at_the_rate = HeldEstimate()
    assert not any(at_the_rate.held(t / 4, 24_000, 1.0, 0.15, rate) for t in range(80))  # 0.96 of it
    changing = HeldEstimate()
    assert not any(changing.held(t / 4, 20_000 + t, 1.0, 0.15, rate) for t in range(80))
    # a satellite path: six phases of 1.0 last 3.6 s at 0.6 s a round trip, so ten round trips must pass
    far = HeldEstimate()
    assert not any(far.held(t / 4, 22_600, 1.0, 0.6, rate) for t in range(24))
    assert far.held(6.0, 22_600, 1.0, 0.6, rate)


def test_a_connection_back_from_an_outage_settles_again_before_its_round_trip_cuts() -> None:
    """The upload's connection lives through a 20 s outage (its retransmission timeout is capped): the round
    trips of its first packets after it are seconds long (the burst it sends as the link returns, into the
    call's rebuilding) and say nothing of a queue; they count again once it has carried ``socket_settle``."""
    rate = scavenger()
    rate.update(0.0, RttSample(0.100, 0.0), sock=reading(0.0, 0))
    rate.rate = 20_000.0
    acked = 0.0
    for tenth in range(1, 300):  # 30 s at the rate, the round trip at its base
        acked += 2_000.0
        rate.update(tenth / 10, RttSample(0.100, tenth / 10), sock=reading(tenth / 10, acked, rtt=0.150))
    before = rate.rate
    for half in range(60, 100):  # the outage: nothing acknowledged, the call's last report grows old
        rate.update(half / 2, RttSample(0.100, 29.9), sock=reading(half / 2, acked, rtt=0.150))
    # Back: the same connection carries on, its smoothed round trip 1.9 s. No cut for it.
    for tenth in range(500, 510):
        acked += 2_000.0
        rate.update(tenth / 10, RttSample(0.100, 29.9), sock=reading(tenth / 10, acked, rtt=1.9))
    assert rate.rate == before
    # Once it has carried 64 KiB more, a queue on it counts again, and cuts.
    for tenth in range(510, 560):
        acked += 2_000.0
        rate.update(tenth / 10, RttSample(0.100, tenth / 10), sock=reading(tenth / 10, acked, rtt=0.150))
    settled = rate.rate
    assert rate.update(56.1, RttSample(0.100, 56.0), sock=reading(56.1, acked + 2_000, rtt=0.600)) < settled


def test_with_the_uplinks_standing_queue_the_slow_start_measures_what_tcp_delivered_each_second() -> None:
    """Held to 1.6 times what TCP delivered, measured every 2 s, the slow start took 6.4 s from 64 kbit/s to a
    link's 192; measured each second while the standing queue is known, it gets there in 3.6 (on the call's
    reports alone, at 1.3 times measured every 2 s, in 10)."""
    reached: dict[bool, float] = {}
    for standing in (True, False):
        rate = scavenger()
        acked, now = 0.0, 0.0
        rate.update(now, RttSample(0.100, now), sock=reading(now, acked))  # the call's upload begins: 64 kbit/s
        while rate.rate < 24_000.0 and now < 30.0:
            now = round(now + 0.1, 1)
            acked += min(rate.rate, 24_000.0) / 10  # the link carries 24 kB/s (192 kbit/s) of the upload
            queue = QueueSample(0.0, now, 8) if standing else None
            rate.update(now, RttSample(0.100, now), sock=reading(now, acked), queue=queue)
        reached[standing] = now
    assert reached[True] <= 4.5 and reached[False] >= 7.0, reached


def test_one_report_of_the_call_cuts_once() -> None:
    """The last report before an outage showed 68 ms: it cut the rate as the link died, and again a second
    later (the report still fresh, nothing newer), and the photo spent the outage and the call's rebuilding
    a fifth under its rate. One report is one measurement: it cuts once; the next one, if it shows the
    queue still, cuts again."""
    rate, acked = grown_for_ten_seconds()
    report = RttSample(0.170, 10.0)  # 70 ms over the base, over the 60 ms target
    before = rate.rate
    acked += before / 10
    cut = rate.update(10.0, report, sock=reading(10.0, acked))
    assert cut < before
    for tenth in range(101, 120):  # the link is dead: nothing acknowledged, the report stays the latest
        assert rate.update(tenth / 10, report, sock=reading(tenth / 10, acked)) == cut
    acked += cut / 10
    again = rate.update(12.0, RttSample(0.170, 11.9), sock=reading(12.0, acked))
    assert again < cut, "a new report of the same queue cuts again"
