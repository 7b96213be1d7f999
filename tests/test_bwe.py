"""The per-subscriber bandwidth estimate, driven with a fake clock."""

from __future__ import annotations

import pytest

from mediaserver.bwe import BandwidthEstimate


def lost(fraction: float) -> int:
    return int(fraction * 256)


def test_grows_five_percent_a_second_while_loss_is_low() -> None:
    bwe = BandwidthEstimate(estimate=500_000)
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
    bwe = BandwidthEstimate(estimate=1_000_000, rtt=0.2)
    bwe.on_report(lost(loss), now=10.0)
    after_one = bwe.estimate
    assert after_one == pytest.approx(1_000_000 * (1 - lost(loss) / 256 / 2))
    bwe.on_report(lost(loss), now=10.1)  # within the same round trip: no second cut
    assert bwe.estimate == after_one
    bwe.on_report(lost(loss), now=10.3)
    assert bwe.estimate < after_one


def test_never_above_remb_nor_below_the_floor() -> None:
    bwe = BandwidthEstimate(estimate=800_000, minimum=30_000)
    bwe.on_remb(300_000, now=0.0)
    assert bwe.estimate == 300_000
    for second in range(1, 30):
        bwe.on_report(0, now=float(second))
    assert bwe.estimate == 300_000
    for t in range(100):
        bwe.on_report(lost(0.9), now=100.0 + t)
    assert bwe.estimate == 30_000


def test_no_growth_right_after_a_cut() -> None:
    bwe = BandwidthEstimate(estimate=1_000_000)
    bwe.on_report(lost(0.2), now=5.0)
    cut = bwe.estimate
    bwe.on_report(0, now=5.5)
    assert bwe.estimate == cut
    bwe.on_report(0, now=6.0)
    assert bwe.estimate == pytest.approx(cut * 1.05)
