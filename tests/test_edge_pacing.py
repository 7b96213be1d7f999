"""Photo upload pacing: the bytes keep to the rate, and the rate gives way to the call's audio."""

from __future__ import annotations

import pytest

from edge.pacing import KIB, MAX_CHUNK, MIN_CHUNK, RttSample, ScavengerRate, ScavengerSettings, TokenBucket, chunk_size

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
