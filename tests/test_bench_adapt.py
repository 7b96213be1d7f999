"""`nara bench adapt`: a short run end to end, and the measurements it is built on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pytest import approx

from bench.adapt import SCENARIOS, Goal, RunResult, Setup, audio_frames_skipped, seconds_until
from bench.metrics import AudioReceipt, StreamRecord, audio_gap, frozen_time
from bench.participants import LinkRates
from tests.test_bench_run import nara


def test_a_short_run_reports_every_metric_and_goal_per_mode(tmp_path: Path) -> None:
    out = tmp_path / "adapt"
    result = nara("bench", "adapt", "--scenarios", "loss5,thin150", "--modes", "nara,forward,p2p",
                  "--duration-scale", "0.25", "--seed", "3", "--output", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["duration_scale"] == 0.25
    assert list(summary["scenarios"]) == ["loss5", "thin150"]
    for name, scenario in summary["scenarios"].items():
        expected_goals = [g.metric for g in SCENARIOS[name].goals]
        assert [g["metric"] for g in scenario["goals"]] == expected_goals
        assert set(scenario["modes"]) == {"nara", "forward", "p2p"}
        for mode, values in scenario["modes"].items():
            assert [g["metric"] for g in values["goals"]] == expected_goals, (name, mode)
            for goal in values["goals"]:
                assert goal["metric"] in values["metrics"]
                assert goal["pass"] in (True, False, None) and goal["goal"]
            assert values["passed"] + values["failed"] <= len(expected_goals)
    # The relay saw video reach the subscriber on its 1 Mbit/s lossy link, and the picture was the sent one.
    for mode in ("forward", "p2p"):
        loss5 = summary["scenarios"]["loss5"]["modes"][mode]["metrics"]
        assert loss5["delivered_pct"] > 50, mode
        assert loss5["psnr_db"] > 25, mode
        assert 100 < loss5["received_kbps"] <= 1000, mode
        # aiortc's 96 kbit/s Opus and 250 kbit/s VP8 floor cannot fit 150 kbit/s: sound is lost.
        thin = summary["scenarios"]["thin150"]["modes"][mode]["metrics"]
        assert thin["audio_gap_pct"] > 5, mode
        assert thin["paused"] is False
    # The adapting mode ran with Nära's parts: its audio went through Nära's receive path.
    assert summary["scenarios"]["thin150"]["modes"]["nara"]["metrics"]["audio_made_up_frames"] is not None
    rows = list(csv.DictReader((out / "per-second.csv").open()))
    assert {(r["scenario"], r["mode"]) for r in rows} == {(s, m) for s in ("loss5", "thin150")
                                                          for m in ("nara", "forward", "p2p")}
    assert {r["capacity_kbps"] for r in rows if r["scenario"] == "thin150"} == {"150.0"}
    assert any(float(r["received_kbps"]) > 100 for r in rows if r["scenario"] == "loss5")
    assert "delivered_pct" in result.stdout and ("pass" in result.stdout or "FAIL" in result.stdout)


def test_unknown_scenario_is_refused_with_the_known_ones() -> None:
    result = nara("bench", "adapt", "--scenarios", "moonshot")
    assert result.returncode == 2
    assert "'moonshot'" in result.stderr and "layer-cpu" in result.stderr


def frames(*spec: tuple[float, int, bool]) -> list[AudioReceipt]:
    """(arrival, 20 ms frame number, played) -> receipts at 48 kHz."""
    return [AudioReceipt(at, 1_000 + n * 960, 48000, 0.02, played) for at, n, played in spec]


def test_audio_gaps_count_lost_and_concealed_frames_and_silence_at_the_end() -> None:
    steady = [(i * 0.02, i, True) for i in range(50)]
    assert audio_gap(frames(*steady), 0, 1) == 0
    lost = [f for f in steady if f[1] not in (10, 11)]
    assert audio_gap(frames(*lost), 0, 1) == approx(2 / 50)
    concealed = [(at, n, n != 20) for at, n, _ in steady]
    assert audio_gap(frames(*concealed), 0, 1) == approx(1 / 50)
    stopped = steady[:25]  # half a second of sound, then nothing
    gap = audio_gap(frames(*stopped), 0, 1)
    assert gap is not None and 0.3 < gap < 0.5
    assert audio_gap([], 0, 1) == 1.0


def test_audio_gaps_survive_the_rtp_timestamp_wrapping() -> None:
    receipts = [AudioReceipt(i * 0.02, ((1 << 32) - 960 * 5 + i * 960) % (1 << 32), 48000, 0.02, True)
                for i in range(20) if i != 7]
    assert audio_gap(receipts, 0, 0.4) == approx(1 / 20)


def test_audio_gaps_count_frames_of_any_length_once() -> None:
    """Packets of 40 ms and frames lengthened by a period (Nära's playout growing its delay) tile the 20 ms
    units without a gap or an overlap: only the concealed frame counts."""
    lengths = [960, 1920, 960 + 981, 960, 960 + 1090, 960, 960, 960 + 545, 1920, 960] * 3
    receipts, pts, at = [], 0, 0.0
    for i, samples in enumerate(lengths):
        receipts.append(AudioReceipt(at, pts, 48000, samples / 48000, i != 13))
        pts += samples
        at += samples / 48000
    total = pts / 960
    assert audio_gap(receipts, 0, at + 0.01) == approx(1 / total, rel=0.05)
    every_one = [AudioReceipt(r.at, r.pts, r.rate, r.duration, True) for r in receipts]
    assert audio_gap(every_one, 0, at + 0.01) == 0


def test_frames_passed_over_are_counted_within_the_window() -> None:
    record = StreamRecord("sub", "pub")
    for i in range(100):  # one frame passed over at 0.5 s and one at 1.5 s
        record.add_audio(AudioReceipt(i * 0.02, i * 960, 48000, 0.02, True, "packet", (i >= 25) + (i >= 75)))
    assert audio_frames_skipped(record, 0.0, 1.0) == 1
    assert audio_frames_skipped(record, 0.0, 2.0) == 2
    assert audio_frames_skipped(record, 1.0, 1.4) == 0
    assert audio_frames_skipped(StreamRecord("sub", "pub"), 0.0, 2.0) is None  # another receive path


def test_frozen_time_counts_a_picture_that_stopped_coming() -> None:
    smooth = [i / 15 for i in range(150)]  # 10 s at 15 fps
    assert frozen_time(smooth, 1, 9) == 0
    stalled = [t for t in smooth if not 4 <= t < 6]
    assert 1.9 < frozen_time(stalled, 1, 9) < 2.1
    stopped = [t for t in smooth if t < 5]
    assert 3.9 < frozen_time(stopped, 1, 9) < 4.1
    assert frozen_time([], 1, 9) == 8
    sparse = [0.5, 1.0, 3.0, 7.0, 8.95]  # too few frames for a W3C mean: every long wait counts
    assert frozen_time(sparse, 1, 9) == approx(2.0 + 4.0 + 1.95)


def test_goals_pass_fail_or_do_not_apply() -> None:
    assert Goal("x", "<=", 1).judge({"x": 0.5})["pass"] is True
    assert Goal("x", ">=", 30).judge({"x": 29.0})["pass"] is False
    assert Goal("x", "within", 0.05).judge({"x": 1.04})["pass"] is True
    assert Goal("x", "within", 0.05).judge({"x": 0.9})["pass"] is False
    assert Goal("x", "<=", 2).judge({"x": None})["pass"] is False  # never reached
    paused_only = Goal("x", "<=", 2, applies=lambda m: bool(m["paused"]))
    assert paused_only.judge({"x": None, "paused": False})["pass"] is None


def sent_toward(*kbps: float) -> RunResult:
    """Readings every 0.25 s of what was sent toward a 300 kbit/s subscriber."""
    run = RunResult(Setup("step", (), 10), "nara", 10, {}, 0.0)
    run.links = [((i + 1) * 0.25, {"sub": LinkRates(rate, rate, 300.0)}) for i, rate in enumerate(kbps)]
    return run


def test_a_rate_fits_a_capacity_only_once_it_keeps_fitting() -> None:
    def fits(rate: float, capacity: float | None) -> bool:
        return capacity is not None and rate <= capacity

    settles = sent_toward(*[2000] * 4, *[250] * 24)  # fits from 1 s on: the 1 s average from 2 s on
    assert seconds_until(settles, "sub", 0, 10, "sent_kbps", fits, lasting=2) == 2.0
    dips = sent_toward(*[2000] * 4, *[250] * 4, *[4000] * 20)  # a moment's dip, then a flood
    assert seconds_until(dips, "sub", 0, 10, "sent_kbps", fits) == 2.0
    assert seconds_until(dips, "sub", 0, 10, "sent_kbps", fits, lasting=2) is None


def test_the_encoder_benchmark_reports_cost_and_rate_following(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from bench.encoders import main as encoders_main

    assert encoders_main(argparse.Namespace(frames=10)) == 0
    out = capsys.readouterr().out
    assert "CPU per frame" in out and "640x480" in out and "320x180" in out
    assert out.count("keyframes at the change: 0") == 3, out  # rate changes cost no keyframe


def _layer_cpu_run(name: str, relatives: int, layer_frames_per_s: float) -> RunResult:
    """A layer-cpu run read once a second: the doctor on the original, every relative on the 90p layer, which
    encodes ``layer_frames_per_s`` at 0.5 ms each; the ladder's totals grow evenly."""
    from types import SimpleNamespace

    from bench.adapt import DOCTOR, LadderWork, LayerCounts, Member

    members = (Member("pub", "adapt-clean", publishes=True), Member(DOCTOR, "adapt-4m"),
               *(Member(f"r{i}", "adapt-120k") for i in range(1, relatives + 1)))
    participants: dict[str, object] = {m.label: SimpleNamespace(records={}, events=[]) for m in members}
    run = RunResult(Setup(name, members, 25), "nara", 25.0, participants, 0.0)  # type: ignore[arg-type]
    for second in range(1, 25):
        run.cores.append((float(second), 0.05 + 0.008 * relatives))
        run.levels.append((float(second), {DOCTOR: "original", **{m.label: "90p" for m in members[2:]}}))
        encode_s = 0.0005 * layer_frames_per_s * second
        run.ladder_cpu.append((float(second), LadderWork(0.012 * second, encode_s, 15.0 * second,
                                                         layer_frames_per_s * second)))
        run.layer_work.append((float(second), {"90p": LayerCounts(layer_frames_per_s * second, encode_s,
                                                                  float(second), float(relatives), 8.0)}))
    return run


def test_layer_cpu_passes_a_layer_encoded_once_and_fails_one_encoded_per_subscriber() -> None:
    from bench.adapt import Settings

    scenario = SCENARIOS["layer-cpu"]
    shared = scenario.evaluate({"layer-cpu-1": _layer_cpu_run("layer-cpu-1", 1, 7.8),
                                "layer-cpu-10": _layer_cpu_run("layer-cpu-10", 10, 8.0)}, Settings())
    assert shared["layer"] == "90p" and shared["same_layer_10"] is True
    assert shared["layer_frames_ratio_10_to_1"] == approx(8.0 / 7.8)
    assert shared["layer_frames_over_own_rate_10"] == approx(1.0)
    assert shared["layer_encode_ms_per_frame_10"] == approx(0.5)
    assert shared["layer_subscribers_10"] == 10 and shared["other_layers_frames_per_s_10"] == 0
    assert all(goal.judge(shared)["pass"] for goal in scenario.goals)
    per_subscriber = scenario.evaluate({"layer-cpu-1": _layer_cpu_run("layer-cpu-1", 1, 8.0),
                                        "layer-cpu-10": _layer_cpu_run("layer-cpu-10", 10, 80.0)}, Settings())
    assert per_subscriber["layer_frames_over_own_rate_10"] == approx(10.0)
    assert [goal.judge(per_subscriber)["pass"] for goal in scenario.goals] == [True, False, False]
