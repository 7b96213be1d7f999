"""`nara bench run` end to end: a short run through the impairing relay, SFU and peer to peer."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def nara(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nara.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_short_run_writes_all_three_results_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    budget = tmp_path / "budget.toml"
    budget.write_text("[budget]\nmin_fps = 1000\nmax_latency_p95_ms = 100000\n")
    result = nara("bench", "run", "--profile", "webrtc-500k-lossy", "--duration", "8", "--settle", "2",
                  "--output", str(out), "--budget", str(budget))
    # The impossible frame-rate budget fails the run; the generous latency budget does not.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fps_mean" in result.stderr and "min_fps" in result.stderr
    assert "max_latency_p95_ms" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["profile"] == "webrtc-500k-lossy"
    for mode in ("sfu", "p2p"):
        values = summary["modes"][mode]
        # Video reached the receivers. (8 s is mostly the start of a call, when the adapting SFU
        # gives a subscriber whose link it does not know yet a low layer at 8-12 fps.)
        assert values["fps_mean"] > 1, f"{mode}: video reached the receivers"
        assert values["latency_p50_ms"] > 25, "the link's delay is in the latency"
        assert 0.01 < values["link_loss"] < 0.06, "3 % loss on the emulated link"
        assert values["psnr_db"] > 25
    assert summary["modes"]["sfu"]["server_cores_mean"] > 0
    rows = list(csv.DictReader((out / "per-second.csv").open()))
    assert {r["mode"] for r in rows} == {"sfu", "p2p"}
    assert any(float(r["fps"]) > 0 for r in rows if r["fps"])
    assert any(r["capacity_kbps"] == "500.0" for r in rows)
    report = (out / "report.html").read_text()
    assert report.count("<svg") >= 8 and "webrtc-500k-lossy" in report
    compared = nara("bench", "compare", str(out), str(out))
    assert compared.returncode == 0 and "latency_p95_ms" in compared.stdout


def test_unknown_profile_is_refused_with_the_known_ones() -> None:
    result = nara("bench", "run", "--profile", "moon-base", "--duration", "1")
    assert result.returncode != 0
    assert "unknown link profile" in result.stderr and "poor-3g" in result.stderr
