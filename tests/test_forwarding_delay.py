"""The forwarding delay histogram: what the benchmark and IT staff read as the server's added delay."""

from __future__ import annotations

import pytest

from mediaserver.forwarding_delay import BOUNDS_NS, DelayHistogram, DelaySnapshot


def test_percentiles_read_from_the_buckets_err_high_by_at_most_one_bucket() -> None:
    histogram = DelayHistogram()
    for _ in range(90):
        histogram.record(60_000)  # 60 µs: in the 75 µs bucket
    for _ in range(9):
        histogram.record(3_100_000)  # 3.1 ms: in the 3.25 ms bucket
    histogram.record(45_000_000)  # one packet held 45 ms
    snapshot = histogram.snapshot()
    assert snapshot.total == 100
    assert snapshot.quantile(0.5) == pytest.approx(75e-6)
    assert snapshot.quantile(0.95) == pytest.approx(3.25e-3)
    assert snapshot.quantile(0.999) == pytest.approx(50e-3)
    assert DelayHistogram().snapshot().quantile(0.95) is None


def test_a_window_is_the_difference_of_two_snapshots_and_survives_json() -> None:
    histogram = DelayHistogram()
    histogram.record(5_000_000_000)  # beyond the last bound: counted in the overflow bucket
    start = DelaySnapshot.from_json(histogram.snapshot().to_json())
    for _ in range(10):
        histogram.record(200_000)
    window = histogram.snapshot().since(start)
    assert window.total == 10 and window.sum_ns == 2_000_000
    assert window.quantile(0.99) == pytest.approx(200e-6)
    assert start.counts[len(BOUNDS_NS)] == 1


def test_a_malformed_histogram_is_refused() -> None:
    with pytest.raises(ValueError):
        DelaySnapshot.from_json({"counts": [1, 2], "sum_ns": 3})
