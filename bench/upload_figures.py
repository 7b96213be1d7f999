"""The figures of ``nara bench upload``, from what the run recorded: plain functions over plain data.

Times are seconds since the run began. An outage is ``(start, end)``; the
link carries nothing then, so no audio can be judged there, nor until the
kit's call is back and its audio plays again: how long that took is reported
apart, as the recovery time. The audio gap is what did not play while the
call was up. A call that does not come back leaves nothing out: its silence
is all gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .metrics import AudioReceipt, audio_gap

Interval = tuple[float, float]


def overlap(a: Interval, b: Interval) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def up_windows(span: Interval, outages: Sequence[Interval], allowance: float = 0.0) -> list[Interval]:
    """The parts of ``span`` outside every outage and the ``allowance`` after it."""
    windows = [span]
    for start, end in sorted(outages):
        cut = (start, end + allowance)
        kept: list[Interval] = []
        for a, b in windows:
            if cut[1] <= a or cut[0] >= b:
                kept.append((a, b))
                continue
            if a < cut[0]:
                kept.append((a, cut[0]))
            if cut[1] < b:
                kept.append((cut[1], b))
        windows = kept
    return [w for w in windows if w[1] > w[0]]


def up_time(span: Interval, outages: Sequence[Interval]) -> float:
    """Seconds of ``span`` during which the link was up."""
    return sum(b - a for a, b in up_windows(span, outages))


def gap_share(receipts: Sequence[AudioReceipt], windows: Sequence[Interval]) -> float | None:
    """Share of the audio due in ``windows`` that did not play, weighted by each window's length."""
    total = sum(b - a for a, b in windows)
    if total <= 0:
        return None
    missing = 0.0
    for a, b in windows:
        gap = audio_gap(list(receipts), a, b)
        missing += (1.0 if gap is None else gap) * (b - a)
    return missing / total


def recovery(receipts: Sequence[AudioReceipt], outage: Interval, limit: float = 60.0) -> float | None:
    """Seconds from the outage's end to the first audio frame that played, or None within ``limit``."""
    end = outage[1]
    first = next((r.at for r in receipts if r.played and end <= r.at < end + limit), None)
    return None if first is None else first - end


def goodput_share(image_bytes: int, span: Interval, outages: Sequence[Interval], rate_bps: float) -> float | None:
    """Image bytes over the time the link was up while uploading, as a share of the link's rate."""
    seconds = up_time(span, outages)
    return None if seconds <= 0 else image_bytes * 8 / seconds / rate_bps


@dataclass(frozen=True)
class PhaseFigures:
    """The call's audio in one phase of the run."""

    span: Interval
    outages: tuple[Interval, ...]
    judged_seconds: float  # link up and the call back after each outage
    audio_gap: float | None  # share, 0..1
    recoveries: tuple[float | None, ...]  # seconds until audio played again, per outage


def phase_figures(receipts: Sequence[AudioReceipt], span: Interval, outages: Sequence[Interval],
                  recovery_limit: float = 60.0) -> PhaseFigures:
    inside = tuple(o for o in outages if overlap(o, span) > 0)
    recoveries = tuple(recovery(receipts, o, recovery_limit) for o in inside)
    until_back = [(start, end + (back or 0.0)) for (start, end), back in zip(inside, recoveries, strict=True)]
    windows = up_windows(span, until_back)
    return PhaseFigures(span, inside, sum(b - a for a, b in windows), gap_share(receipts, windows), recoveries)


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None:
        return None
    if baseline == 0:
        return None if value else 1.0
    return value / baseline


def percent(share: float | None, digits: int = 1) -> str:
    return "-" if share is None else f"{100 * share:.{digits}f} %"


def seconds_list(values: Sequence[float | None]) -> str:
    return ", ".join("never" if v is None else f"{v:.1f} s" for v in values) or "-"
