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
import contextlib
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection
from aiortc.contrib.media import MediaRelay

from mediaserver.encoders import OpusTrack

from .metrics import StreamRecord, picture_psnr
from .process import NaraServer, cpu_seconds, resident_mb
from .profiles import profile as find_profile
from .synthetic import StampedVideoTrack, ToneAudioTrack, dominant_frequency, read_stamp, wall_ms
from .turn import ImpairingTurnServer

PSNR_EVERY = 3  # frames; PSNR costs a regenerated frame, so sample it
MODES = ("sfu", "p2p")


class Participant:
    """A synthetic participant: stamped video and a tone out, every other participant measured in."""

    def __init__(self, label: str, tag: int, width: int, height: int, fps: int, run_start: float,
                 tags: dict[str, int], nara_audio: bool = False) -> None:
        self.label = label
        self.tags = tags  # every participant's label -> the tag its frames carry
        self.corrupt_frames = 0
        self.tag = tag
        self.video = StampedVideoTrack(tag, width, height, fps)
        tone = ToneAudioTrack(300 + 40 * tag)
        # Nära's Opus (24 kbit/s, in-band FEC) or aiortc's default (96 kbit/s, no FEC).
        self.audio: Any = OpusTrack(tone) if nara_audio else tone
        self.run_start = run_start
        self.records: dict[str, StreamRecord] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.peers: list[RTCPeerConnection] = []
        self.client: Any = None

    def record(self, publisher: str) -> StreamRecord:
        if publisher not in self.records:
            self.records[publisher] = StreamRecord(self.label, publisher)
        return self.records[publisher]

    def follow(self, track: Any, publisher: Any) -> None:
        """Read ``track``; ``publisher`` is a label or a function giving it (slots are reused)."""
        self.tasks.append(asyncio.ensure_future(self._read(track, publisher)))

    async def _read(self, track: Any, publisher: Any) -> None:
        count = 0
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                at = time.time() - self.run_start
                who = publisher() if callable(publisher) else publisher
                if who is None:
                    continue
                if track.kind == "audio":
                    if dominant_frequency(frame) > 0:
                        self.record(who).audio_arrivals.append(at)
                    continue
                luma = frame.to_ndarray(format="yuv420p")[: frame.height]
                stamp = read_stamp(luma)
                latency = (wall_ms() - stamp.capture_ms) % (1 << 32)
                if stamp.tag != self.tags.get(who) or latency > 600_000:
                    self.corrupt_frames += 1  # decoded, but not a picture anyone sent
                    continue
                count += 1
                psnr = picture_psnr(luma, stamp) if count % PSNR_EVERY == 0 else None
                self.record(who).add_frame(at, stamp, float(latency), psnr)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.client is not None:
            await self.client.close()
        for pc in self.peers:
            await pc.close()


# --- the server under test -----------------------------------------------------------


class SfuProcess(NaraServer):
    """The SFU under test, sampled for CPU and memory once a second."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / "sfu-data")
        self._cpu = cpu_seconds(self.process.pid)
        self._at = time.monotonic()

    def sample(self) -> tuple[float, float]:
        """(cores used since the last sample, resident memory in MB)."""
        cpu, now = cpu_seconds(self.process.pid), time.monotonic()
        cores = (cpu - self._cpu) / max(now - self._at, 1e-6)
        self._cpu, self._at = cpu, now
        return cores, resident_mb(self.process.pid)


# --- scenarios -------------------------------------------------------------------------


def _ice(relay: ImpairingTurnServer, profile_name: str, label: str) -> list[RTCIceServer]:
    return [RTCIceServer(urls=relay.url, username=f"{profile_name}/{label}", credential=relay.password)]


async def _join_sfu(sfu: SfuProcess, room: str, p: Participant, relay: ImpairingTurnServer, profile_name: str) -> None:
    from signalling.client import ConsultationClient

    token = await sfu.token(room, p.label, "patient", p.label)
    followed: set[str] = set()

    def owner(mid: str) -> Any:
        return lambda: (client.owners.get(mid) or (None,))[0]

    def follow_new(transceiver: Any) -> None:
        if transceiver.mid is None or transceiver.mid in followed or transceiver.receiver.track is None:
            return
        followed.add(transceiver.mid)
        p.follow(transceiver.receiver.track, owner(transceiver.mid))

    def follow_all(pc: RTCPeerConnection) -> None:
        for transceiver in pc.getTransceivers():
            follow_new(transceiver)

    client = ConsultationClient(sfu.url, room, token, video=p.video, audio=p.audio,
                                ice_servers=_ice(relay, profile_name, p.label), relay_only=True,
                                on_answered=follow_all)
    p.client = client
    await client.join()


async def _connect_p2p(a: Participant, b: Participant, relay: ImpairingTurnServer, profile_name: str,
                       fanout: dict[str, MediaRelay]) -> None:
    """A direct connection a <-> b, each side through its own link."""
    pcs = []
    for me, other in ((a, b), (b, a)):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=_ice(relay, profile_name, me.label),
                                                iceTransportPolicy=RTCIceTransportPolicy.RELAY))
        me.peers.append(pc)
        relayed = fanout.setdefault(me.label, MediaRelay())
        pc.addTrack(relayed.subscribe(me.video, buffered=False))
        pc.addTrack(relayed.subscribe(me.audio, buffered=False))
        pc.on("track", lambda track, me=me, other=other: me.follow(track, other.label))
        pcs.append(pc)
    offerer, answerer = pcs
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


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
            nara_audio = mode == "sfu" and args.encoders == "nara"
            members = [Participant(label, tag, width, height, args.fps, run_start, tags, nara_audio)
                       for label, tag in tags.items()]
            participants.append(members)
            if sfu is not None:
                room = await sfu.consultation(f"bench {r}")
                for p in members:
                    await _join_sfu(sfu, room, p, relay, args.profile)
            else:
                fanout: dict[str, MediaRelay] = {}
                for i, a in enumerate(members):
                    for b in members[i + 1:]:
                        await _connect_p2p(a, b, relay, args.profile, fanout)
        if sfu is not None:
            sfu.sample()
        previous: dict[int, int] = {}  # bytes delivered so far, per allocation
        for second in range(int(args.duration)):
            await asyncio.sleep(max(0.0, run_start + second + 1 - time.time()))  # the run's own clock
            row: dict[str, Any] = {"second": second, "links": {}}
            if sfu is not None:
                row["server_cores"], row["server_mem_mb"] = sfu.sample()
            now = relay.loop.time()
            for index, (label, _, down) in enumerate(relay.links(ever=True)):
                who = label.split("/", 1)[1]
                entry = row["links"].setdefault(who, {"kbps": 0.0, "capacity_kbps": None})
                entry["kbps"] += (down.counters.bytes_delivered - previous.get(index, 0)) * 8 / 1000
                capacity = down.capacity_at(now)
                entry["capacity_kbps"] = None if capacity is None else capacity / 1000
                previous[index] = down.counters.bytes_delivered
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
            pcs = list(p.peers) + ([p.client.pc] if p.client is not None and p.client.pc is not None else [])
            for pc in pcs:
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
