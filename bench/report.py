"""A run's results as files: summary.json, per-second.csv and a self-contained report.html."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
CSV_FIELDS = ["mode", "second", "receiver", "publisher", "fps", "freeze_ms", "latency_p50_ms", "latency_p95_ms",
              "psnr_db", "audio_missing", "link_kbps", "capacity_kbps", "server_cores", "server_mem_mb"]


def write_results(folder: Path, summary: dict[str, Any], results: dict[str, Any]) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    with (folder / "per-second.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for result in results.values():
            for row in result["rows"]:
                writer.writerow({k: _cell(row.get(k)) for k in CSV_FIELDS})
    (folder / "report.html").write_text(render_html(summary, results))


def _cell(value: Any) -> Any:
    return "" if value is None else (round(value, 3) if isinstance(value, float) else value)


def line_chart(title: str, series: dict[str, list[tuple[float, float | None]]], unit: str,
               width: int = 640, height: int = 220) -> str:
    """An inline SVG line chart; ``series`` maps a name to (x, y) points (None: a gap)."""
    points = [(x, y) for values in series.values() for x, y in values if y is not None]
    if not points:
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    x_max = max(x for x, _ in points) or 1
    y_max = max(y for _, y in points) * 1.1 or 1
    left, bottom, top, right = 55, 30, 10, 10
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + plot_w * x / x_max

    def sy(y: float) -> float:
        return top + plot_h * (1 - y / y_max)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#999"/>']
    for i in range(5):
        y = y_max * i / 4
        parts.append(f'<text x="{left - 5}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end">{y:.4g}</text>')
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    for i in range(6):
        x = x_max * i / 5
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 13}" font-size="11" '
                     f'text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 3}" font-size="11" text-anchor="middle">'
                 f'seconds</text>')
    legend = []
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        dash = ' stroke-dasharray="5,3"' if "capacity" in name else ""
        run: list[str] = []
        ended: list[tuple[float, float | None]] = [*values, (0.0, None)]
        for px, py in ended:
            if py is None:
                if len(run) > 1:
                    parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8"{dash} '
                                 f'points="{" ".join(run)}"/>')
                run = []
            else:
                run.append(f"{sx(px):.1f},{sy(py):.1f}")
        legend.append(f'<span style="color:{colour}">■ {html.escape(name)}</span>')
    parts.append("</svg>")
    return (f"<figure><figcaption><b>{html.escape(title)}</b> ({html.escape(unit)})</figcaption>"
            f"{''.join(parts)}<div class='legend'>{' '.join(legend)}</div></figure>")


def render_html(summary: dict[str, Any], results: dict[str, Any]) -> str:
    scenario = summary["scenario"]
    modes = list(summary["modes"])
    keys = list(next(iter(summary["modes"].values())).keys()) if modes else []
    table = ["<table><tr><th></th>" + "".join(f"<th>{m}</th>" for m in modes) + "</tr>"]
    for key in keys:
        cells = "".join(f"<td>{_fmt(summary['modes'][m].get(key))}</td>" for m in modes)
        table.append(f"<tr><th>{key}</th>{cells}</tr>")
    table.append("</table>")
    charts = []
    for mode, result in results.items():
        rows = result["rows"]
        by_receiver: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_receiver.setdefault(f"{row['receiver']}←{row['publisher']}", []).append(row)
        link: dict[str, list[tuple[float, float | None]]] = {}
        for sample in result["samples"]:
            for who, values in sample["links"].items():
                link.setdefault(f"{who} received", []).append((sample["second"], values["kbps"]))
                link.setdefault(f"{who} capacity", []).append((sample["second"], values["capacity_kbps"]))
        charts.append(f"<h2>{html.escape(mode)}</h2>")
        charts.append(line_chart("Received bitrate against link capacity", link, "kbit/s"))
        for key, title, unit in (("latency_p95_ms", "End-to-end latency, p95", "ms"),
                                 ("fps", "Frames per second received", "fps"),
                                 ("freeze_ms", "Frozen time per second", "ms"),
                                 ("psnr_db", "Picture quality (PSNR)", "dB")):
            series = {name: [(r["second"], r[key]) for r in values] for name, values in by_receiver.items()}
            charts.append(line_chart(title, series, unit))
        if any("server_cores" in s for s in result["samples"]):
            charts.append(line_chart("Server CPU", {"server": [(s["second"], s.get("server_cores"))
                                                               for s in result["samples"]]}, "cores"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Nära bench: {html.escape(scenario['profile'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #111; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 0.2rem 0.7rem; border-bottom: 1px solid #ddd;
text-align: right; }} th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5rem 1rem 1rem 0; }} .legend {{ font-size: 12px; max-width: 640px; }}
</style></head><body>
<h1>Nära bench: {html.escape(scenario['profile'])}</h1>
<p>{html.escape(scenario['profile_source'])}</p>
<p>{scenario['rooms']} room(s) × {scenario['participants']} participants, {scenario['duration_s']:g} s,
video {html.escape(scenario['video'])} at {scenario['fps']} fps, seed {scenario['seed']};
summaries leave out the first {scenario['settle_s']:g} s.<br><code>{html.escape(scenario['command'])}</code></p>
{''.join(table)}
{''.join(charts)}
</body></html>
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return html.escape(str(value))
