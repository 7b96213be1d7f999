"""``nara bench run``: consultations over emulated rural links, measured as people would notice.

Every synthetic participant reaches the others only through the impairing
TURN relay (bench/turn.py), its TURN username naming its link profile. The
same scenario runs through Nära's SFU (a ``nara serve`` process, whose CPU and
memory are read from /proc) and, as the baseline, peer to peer: aiortc to
aiortc, each participant sending to every other directly (through the relay).

Results go to one folder: ``summary.json``, ``per-second.csv`` and a
self-contained ``report.html``.

Peer to peer with more than two participants is a mesh, and each of a
participant's connections gets its own TURN allocation, hence its own emulated
link: the baseline is then kinder than a real shared uplink would be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from aiortc.contrib.media import MediaRelay

from mediaserver.encoders import OpusTrack

from .participants import LinkMeter, Participant, connect_p2p, join_sfu
from .process import SfuProcess
from .profiles import profile as find_profile
from .synthetic import StampedVideoTrack, ToneAudioTrack
from .turn import ImpairingTurnServer

MODES = ("sfu", "p2p")


# --- scenarios -------------------------------------------------------------------------


async def run_mode(mode: str, args: argparse.Namespace, workdir: Path, progress: Any) -> dict[str, Any]:
    width, height = (int(v) for v in args.video.split("x"))
    relay = ImpairingTurnServer(seed=args.seed)
    await relay.start()
    sfu = SfuProcess(workdir / mode) if mode == "sfu" else None
    run_start = time.time()
    participants: list[list[Participant]] = []
    samples: list[dict[str, Any]] = []
    try:
        for r in range(args.rooms):
            tags = {f"r{r}p{i}": 1 + r * args.participants + i for i in range(args.participants)}
            members = []
            for label, tag in tags.items():
                # Nära's Opus (24 kbit/s, in-band FEC) or aiortc's default (96 kbit/s, no FEC).
                tone = ToneAudioTrack(300 + 40 * tag)
                microphone = OpusTrack(tone) if mode == "sfu" and args.encoders == "nara" else tone
                members.append(Participant(label, args.profile, run_start, tags,
                                           StampedVideoTrack(tag, width, height, args.fps), microphone,
                                           source_size=(width, height)))  # PSNR of layers, scaled
            participants.append(members)
            if sfu is not None:
                room = await sfu.consultation(f"bench {r}")
                for p in members:
                    await join_sfu(sfu, room, p, relay)
            else:
                fanout: dict[str, MediaRelay] = {}
                for i, a in enumerate(members):
                    for b in members[i + 1:]:
                        await connect_p2p(a, b, relay, fanout)
        if sfu is not None:
            sfu.sample()
        meter = LinkMeter(relay)
        for second in range(int(args.duration)):
            await asyncio.sleep(max(0.0, run_start + second + 1 - time.time()))  # the run's own clock
            row: dict[str, Any] = {"second": second, "links": {}}
            if sfu is not None:
                row["server_cores"], row["server_mem_mb"] = sfu.sample()
            for who, rates in meter.sample().items():
                row["links"][who] = {"kbps": rates.received_kbps, "capacity_kbps": rates.capacity_kbps}
            samples.append(row)
            progress(mode, second + 1, int(args.duration))
        forwarding = (await sfu.api("GET", "/api/stats"))["rooms"] if sfu is not None else {}
        links = [link for _, up, down in relay.links(ever=True) for link in (up, down)]
        lost = sum(k.counters.lost_random + k.counters.lost_queue + k.counters.lost_outage for k in links)
        offered = sum(k.counters.offered for k in links)
        residual = await _residual_loss(participants)
    finally:
        for members in participants:
            for p in members:
                await p.close()
        if sfu is not None:
            sfu.stop()
        relay.close()
    return _mode_result(mode, args, participants, samples, forwarding, lost / max(offered, 1), residual,
                        len(relay.history))


async def _residual_loss(participants: list[list[Participant]]) -> float | None:
    """Video packets still missing at the receivers after retransmission, as a share."""
    lost = expected = 0
    for members in participants:
        for p in members:
            for pc in p.peer_connections():
                for transceiver in pc.getTransceivers():
                    if transceiver.kind != "video":
                        continue
                    for stats in (await transceiver.receiver.getStats()).values():
                        if getattr(stats, "type", "") == "inbound-rtp":
                            lost += max(0, stats.packetsLost)
                            expected += stats.packetsReceived + max(0, stats.packetsLost)
    return lost / expected if expected else None


def _mode_result(mode: str, args: argparse.Namespace, participants: list[list[Participant]],
                 samples: list[dict[str, Any]], forwarding: dict[str, Any], link_loss: float,
                 residual: float | None, allocations: int) -> dict[str, Any]:
    seconds = len(samples)
    settle = int(min(args.settle, max(0, seconds - 1)))
    rows = []
    streams = []
    for members in participants:
        for p in members:
            for publisher, record in sorted(p.records.items()):
                for second, values in enumerate(record.per_second(seconds)):
                    sample = samples[second]
                    link = sample["links"].get(p.label, {})
                    rows.append({"mode": mode, "second": second, "receiver": p.label, "publisher": publisher,
                                 **values, "link_kbps": link.get("kbps"), "capacity_kbps": link.get("capacity_kbps"),
                                 "server_cores": sample.get("server_cores"),
                                 "server_mem_mb": sample.get("server_mem_mb")})
                streams.append(record.summary(settle, seconds))
    nacks = keyframes = 0
    for room in forwarding.values():
        for peer in room.values():
            for received in peer["received"]:
                nacks += received["nacks"]
                keyframes += received["keyframe_requests"]

    def mean(key: str) -> float | None:
        values = [float(s[key] or 0) for s in streams if s[key] is not None]
        return sum(values) / len(values) if values else None

    def worst(key: str, pick: Any) -> float | None:
        values = [s[key] for s in streams if s[key] is not None]
        return pick(values) if values else None

    measured = samples[settle:]
    cores = [s["server_cores"] for s in measured if "server_cores" in s]
    link_kbps = [v["kbps"] for s in measured for v in s["links"].values()]
    capacity = [v["capacity_kbps"] for s in measured for v in s["links"].values() if v["capacity_kbps"] is not None]
    summary = {
        "streams": len(streams),
        "fps_mean": mean("fps"),
        "fps_worst_stream": worst("fps", min),
        "freeze_count": sum(int(s["freeze_count"] or 0) for s in streams),
        "freeze_s": sum(float(s["freeze_s"] or 0) for s in streams),
        "freeze_ratio": (sum(float(s["freeze_s"] or 0) for s in streams) / (len(streams) * (seconds - settle))
                         if streams and seconds > settle else None),
        "latency_p50_ms": mean("latency_p50_ms"),
        "latency_p95_ms": worst("latency_p95_ms", max),
        "psnr_db": mean("psnr_db"),
        "audio_missing": mean("audio_missing"),
        "link_loss": link_loss,
        "residual_video_loss": residual,
        "nacks": nacks if mode == "sfu" else None,
        "keyframe_requests": keyframes if mode == "sfu" else None,
        "received_kbps_mean": sum(link_kbps) / len(link_kbps) if link_kbps else None,
        "capacity_kbps_mean": sum(capacity) / len(capacity) if capacity else None,
        "server_cores_mean": sum(cores) / len(cores) if cores else None,
        "server_mem_mb_max": max((s["server_mem_mb"] for s in measured if "server_mem_mb" in s), default=None),
        "corrupt_frames": sum(p.corrupt_frames for members in participants for p in members),
        "relay_allocations": allocations,
        "video_layer": None,  # server-made layers arrive with the adaptation work
    }
    return {"summary": summary, "rows": rows, "samples": samples}


# --- the command ---------------------------------------------------------------------------


def _progress(mode: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():  # in a log, a line every ten seconds
        if done % 10 == 0 or done == total:
            print(f"{mode}: {done}/{total} s", file=sys.stderr, flush=True)
        return
    width = 30
    filled = int(width * done / total)
    print(f"\r{mode:4} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} s", end="", file=sys.stderr,
          flush=True)
    if done == total:
        print(file=sys.stderr)


def check_budget(summary: dict[str, Any], budget_path: Path) -> list[str]:
    """Every threshold of the budget file the SFU run falls short of."""
    budget = tomllib.loads(budget_path.read_text()).get("budget", {})
    sfu = summary["modes"]["sfu"]
    limits = {
        "min_fps": ("fps_mean", min), "min_psnr_db": ("psnr_db", min),
        "max_freeze_ratio": ("freeze_ratio", max), "max_latency_p95_ms": ("latency_p95_ms", max),
        "max_audio_missing": ("audio_missing", max), "max_residual_video_loss": ("residual_video_loss", max),
    }
    failures = []
    for name, threshold in budget.items():
        if name not in limits:
            failures.append(f"unknown budget entry {name!r}")
            continue
        key, kind = limits[name]
        value = sfu.get(key)
        if value is None or (kind is min and value < threshold) or (kind is max and value > threshold):
            failures.append(f"{key} = {value} is outside {name} = {threshold}")
    return failures


def main(args: argparse.Namespace) -> int:
    from .report import write_results

    try:
        named = find_profile(args.profile)
    except (KeyError, OSError, ValueError) as exc:
        print(f"nara bench run: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    out = Path(args.output or f"bench-results/{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            if mode not in MODES:
                print(f"nara bench run: unknown mode {mode!r} (sfu, p2p)", file=sys.stderr)
                return 2
            results[mode] = asyncio.run(run_mode(mode, args, Path(tmp), _progress))
    summary = {
        "scenario": {"profile": args.profile, "profile_source": named.source, "rooms": args.rooms,
                     "participants": args.participants, "duration_s": args.duration, "seed": args.seed,
                     "video": args.video, "fps": args.fps, "settle_s": args.settle, "encoders": args.encoders,
                     "command": " ".join(sys.argv)},
        "modes": {mode: r["summary"] for mode, r in results.items()},
    }
    write_results(out, summary, results)
    print(f"results in {out}/ (summary.json, per-second.csv, report.html)")
    print(compare_table({m: summary["modes"][m] for m in modes}))
    if args.budget:
        failures = check_budget(summary, Path(args.budget))
        for failure in failures:
            print(f"budget: {failure}", file=sys.stderr)
        if failures:
            return 1
    return 0


COMPARE_KEYS = (
    "corrupt_frames", "fps_mean", "fps_worst_stream", "freeze_count", "freeze_ratio", "latency_p50_ms",
    "latency_p95_ms", "psnr_db", "audio_missing", "link_loss", "residual_video_loss", "nacks",
    "keyframe_requests", "received_kbps_mean", "capacity_kbps_mean", "server_cores_mean", "server_mem_mb_max",
)


def compare_table(columns: dict[str, dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    names = list(columns)
    lines = [f"{'':22}" + "".join(f"{n:>16}" for n in names)]
    for key in COMPARE_KEYS:
        lines.append(f"{key:22}" + "".join(f"{fmt(columns[n].get(key)):>16}" for n in names))
    return "\n".join(lines)


def compare_main(args: argparse.Namespace) -> int:
    columns = {}
    for folder in (args.a, args.b):
        summary = json.loads((Path(folder) / "summary.json").read_text())
        for mode, values in summary["modes"].items():
            columns[f"{Path(folder).name[:10]}:{mode}"] = values
    print(compare_table(columns))
    return 0
