"""The link model, driven with an exact clock: rates, delays, losses, bursts, outages, traces."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bench.link import MTU, DeliveryTrace, GilbertElliott, Link, LinkProfile

PACKET = 1200


def offer(link: Link, rate_bps: float, seconds: float, size: int = PACKET) -> list[tuple[float, float | None]]:
    """Offer packets at ``rate_bps`` for ``seconds``; (sent, arrived) for each."""
    interval = size * 8 / rate_bps
    out = []
    t = 0.0
    while t < seconds:
        out.append((t, link.send(size, t)))
        t += interval
    return out


def throughput(results: list[tuple[float, float | None]], size: int = PACKET) -> float:
    arrivals = sorted(a for _, a in results if a is not None)
    return (len(arrivals) - 1) * size * 8 / (arrivals[-1] - arrivals[0])


@pytest.mark.parametrize("rate", [150_000, 500_000, 2_000_000])
def test_throughput_is_the_configured_rate(rate: int) -> None:
    link = Link(LinkProfile(rate_bps=rate, queue_ms=200))
    measured = throughput(offer(link, rate * 2, 20))
    assert measured == pytest.approx(rate, rel=0.02)
    assert link.counters.lost_queue > 0, "offered twice the rate: the queue must overflow"


def test_queue_bounds_the_delay() -> None:
    link = Link(LinkProfile(rate_bps=500_000, queue_ms=100, delay_ms=40))
    delays = [a - s for s, a in offer(link, 1_000_000, 10) if a is not None]
    assert max(delays) <= 0.040 + 0.100 + PACKET * 8 / 500_000 + 1e-9
    byte_queue = Link(LinkProfile(rate_bps=500_000, queue_bytes=50 * 1500))
    delays = [a - s for s, a in offer(byte_queue, 1_000_000, 10) if a is not None]
    assert max(delays) <= 50 * 1500 * 8 / 500_000 + 1e-9


def test_delay_and_jitter_distribution() -> None:
    link = Link(LinkProfile(delay_ms=50, jitter_ms=20, reorder=True), seed=3)
    delays = [a - s for s, a in offer(link, 1_000_000, 20) if a is not None]
    assert min(delays) >= 0.050 and max(delays) <= 0.070
    assert statistics.mean(delays) == pytest.approx(0.060, abs=0.001)
    assert statistics.pstdev(delays) == pytest.approx(0.020 / 12 ** 0.5, rel=0.05)  # uniform


def test_no_reordering_unless_asked() -> None:
    link = Link(LinkProfile(delay_ms=50, jitter_ms=30), seed=1)
    arrivals = [a for _, a in offer(link, 1_000_000, 5) if a is not None]
    assert arrivals == sorted(arrivals)
    reordering = Link(LinkProfile(delay_ms=50, jitter_ms=30, reorder=True), seed=1)
    arrivals = [a for _, a in offer(reordering, 1_000_000, 5) if a is not None]
    assert arrivals != sorted(arrivals)


def test_random_loss_rate() -> None:
    link = Link(LinkProfile(loss=0.05), seed=7)
    results = offer(link, 1_000_000, 200)  # about 20 800 packets
    lost = sum(1 for _, a in results if a is None) / len(results)
    # 3 standard deviations of a binomial proportion
    assert abs(lost - 0.05) < 3 * (0.05 * 0.95 / len(results)) ** 0.5


def test_gilbert_elliott_bursts_have_the_configured_mean_length() -> None:
    model = GilbertElliott.with_mean(loss=0.10, mean_burst=4)
    assert model.mean_loss == pytest.approx(0.10)
    link = Link(LinkProfile(bursts=model), seed=11)
    drops = [a is None for _, a in offer(link, 1_000_000, 2000)]
    bursts, run = [], 0
    for dropped in drops:
        if dropped:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    assert statistics.mean(bursts) == pytest.approx(4, rel=0.05)
    # Losses are correlated, so the spread of the loss rate is wider than a binomial's:
    # variance grows by (1 + r) / (1 - r), r = 1 - p_good_to_bad - p_bad_to_good.
    r = 1 - model.p_good_to_bad - model.p_bad_to_good
    sigma = (0.1 * 0.9 / len(drops) * (1 + r) / (1 - r)) ** 0.5
    assert abs(sum(drops) / len(drops) - 0.10) < 3 * sigma


def test_same_seed_same_decisions_other_seed_others() -> None:
    profile = LinkProfile(rate_bps=400_000, queue_ms=300, delay_ms=175, jitter_ms=30, loss=0.05,
                          bursts=GilbertElliott.with_mean(0.05, 3))

    def decisions(seed: int) -> bytes:
        link = Link(profile, seed=seed)
        return bytes(a is None for _, a in offer(link, 600_000, 30))

    assert decisions(42) == decisions(42)
    assert decisions(42) != decisions(43)


def test_outage_drops_everything_then_recovers() -> None:
    link = Link(LinkProfile(rate_bps=1_000_000, outages=((5.0, 3.0),)))
    results = offer(link, 500_000, 12)
    during = [a for s, a in results if 5.0 <= s < 8.0]
    after = [a for s, a in results if s >= 8.0]
    assert during and all(a is None for a in during)
    assert after and all(a is not None for a in after)
    assert link.capacity_at(6.0) == 0.0


def test_rate_steps_as_in_rfc_8867() -> None:
    steps = ((40.0, 2_500_000.0), (60.0, 600_000.0), (80.0, 1_000_000.0))
    link = Link(LinkProfile(rate_bps=1_000_000, rate_steps=steps, queue_ms=300))
    results = offer(link, 3_000_000, 100)
    for start, end, rate in ((0, 40, 1e6), (40, 60, 2.5e6), (60, 80, 6e5), (80, 100, 1e6)):
        window = [(s, a) for s, a in results if start + 1 <= s < end - 1]
        assert throughput(window) == pytest.approx(rate, rel=0.02)
        assert link.capacity_at(start + 0.5) == rate


def test_trace_replay_delivers_the_trace_rate() -> None:
    trace = DeliveryTrace.constant(800_000, seconds=2)
    assert trace.mean_bits_per_second() == pytest.approx(800_000, rel=0.01)
    link = Link(LinkProfile(trace=trace, queue_ms=500))
    measured = throughput(offer(link, 1_600_000, 20, size=MTU), size=MTU)
    assert measured == pytest.approx(800_000, rel=0.02)


def test_trace_with_a_gap_holds_packets_until_it_ends(tmp_path: Path) -> None:
    # 1 s of 1.2 Mbit/s, then a 2 s gap, looping every 3 s
    busy = DeliveryTrace.constant(1_200_000, seconds=1).opportunities_ms
    path = tmp_path / "gap.trace"
    path.write_text("\n".join(map(str, [*busy, 3000])) + "\n")
    trace = DeliveryTrace.load(path)
    link = Link(LinkProfile(trace=trace))
    arrival = link.send(MTU, 1.5)  # offered in the gap: waits for the next opportunity
    assert arrival == pytest.approx(3.0)
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.trace"
        bad.write_text("5\n3\n")
        DeliveryTrace.load(bad)
