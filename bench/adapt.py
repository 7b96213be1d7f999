"""``nara bench adapt``: does Nära's link adaptation meet its goals? Six scenarios, three ways each.

Every scenario is one or two consultations of synthetic participants, each
on its own emulated link (a profile of bench/profiles.py, for its up- and
downlink): the publisher on a clean, fast link, the subscribers on the links
the scenario is about. Each runs in three modes in the same invocation:

- **nara**: the SFU with adaptation on (quality ladder, per-subscriber
  layers, pausing), Nära's encoders at the publishers (VP8 that follows the
  SFU's REMB, Opus at 24 kbit/s with in-band FEC), Nära's receive path;
- **forward**: the SFU with ``--adaptation off``, aiortc's encoders and
  receive path: the forwarding-only SFU as it was;
- **p2p**: aiortc to aiortc with its defaults, the baseline.

Bitrates come from the impairing relay, which counts what was sent toward
each participant's downlink and what that link delivered (``LinkMeter``).
Results: ``summary.json`` (per scenario and mode, every metric and every
goal's pass or fail) and ``per-second.csv``, and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from mediaserver.encoders import OpusTrack

from .metrics import StreamRecord, audio_gap, frozen_time
from .participants import LinkMeter, LinkRates, Participant, connect_p2p, join_sfu
from .process import SfuProcess
from .profiles import NamedProfile, time_scaled
from .profiles import profile as find_profile
from .synthetic import StampedVideoTrack, ToneAudioTrack
from .turn import ImpairingTurnServer

LINK_SAMPLE = 0.25  # seconds between readings of the relay's counters
FIT_LASTING = 2.0  # seconds the sent rate must stay within a new capacity to count as fitting it
# A layer's frames encoded a second (and its encode CPU a second) with 10 subscribers on it over those with 1:
# paid once per layer, about 1; an encoder per subscriber would make it about 10.
LAYER_ENCODE_RATIO = 1.2
LAYER_CPU_SETTLE = 10.0  # seconds of layer-cpu's runs left out: eleven joins, and the doctor's climb to the original
DOCTOR = "doctor"  # layer-cpu's subscriber on a fast link, who gets the original
NARA_START_BITRATE = 800_000  # Nära's VP8 encoder starts here, then follows the SFU's REMB
PUBLISHER = "pub"

Metrics = dict[str, Any]


# --- modes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    sfu: bool
    adaptation: bool
    nara_media: bool  # Nära's encoders at the publishers, Nära's receive path at the subscribers
    description: str


MODES = {m.name: m for m in (
    Mode("nara", True, True, True, "SFU with adaptation on; Nära's VP8 and Opus (24 kbit/s, FEC) encoders; "
                                   "Nära's receive path"),
    Mode("forward", True, False, False, "SFU with --adaptation off (forwarding only); aiortc's encoders and "
                                        "receive path"),
    Mode("p2p", False, False, False, "aiortc to aiortc with its defaults, no server"),
)}


def server_options(mode: Mode) -> list[str]:
    return ["--adaptation", "on" if mode.adaptation else "off"]


def nara_video(camera: StampedVideoTrack) -> MediaStreamTrack:
    """Nära's VP8 encoder over the camera; it follows the SFU's REMB."""
    from mediaserver.video_encoders import EncodedVideoTrack, Vp8Encoder

    return EncodedVideoTrack(camera, Vp8Encoder(camera.width, camera.height, camera.fps, NARA_START_BITRATE))


def receive_options(mode: Mode) -> dict[str, Any]:
    return {"nara_receive": True} if mode.nara_media else {}


# --- one consultation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    label: str
    profile: str  # its link, up and down
    publishes: bool = False


@dataclass(frozen=True)
class Setup:
    """One consultation of a scenario, run once per mode."""

    name: str
    members: tuple[Member, ...]
    duration: float  # seconds, at full length
    scene: str = "gradient"  # what the publishers' cameras show (bench/synthetic.py)


@dataclass(frozen=True)
class Settings:
    scale: float = 1.0  # every duration and every scheduled link change, times this
    seed: int = 1
    width: int = 640
    height: int = 360
    fps: int = 15

    @property
    def settle(self) -> float:
        """Seconds left out at the start of steady-state measurements."""
        return max(2.0, 5.0 * self.scale)

    def profile(self, name: str) -> NamedProfile:
        return time_scaled(find_profile(name), self.scale)


class LayerCounts(NamedTuple):
    """One layer's work so far, as the SFU reports it (``ladder_cpu.layers``), and who is on it now."""

    frames: float  # encoded
    encode_s: float  # CPU seconds encoding it
    ran_s: float  # seconds it has run
    subscribers: float  # on it now
    framerate: float  # its own


class LadderWork(NamedTuple):
    """The server's ladders: CPU seconds decoding originals and encoding layers, and the frames of each."""

    decode_s: float
    encode_s: float
    decoded: float
    encoded: float


class RateChain(NamedTuple):
    """The way from a subscriber's link to the publisher's encoder, as the SFU reports it (kbit/s)."""

    estimate_kbps: float | None  # the subscriber's bandwidth estimate
    cap_kbps: float | None  # the rate cap (REMB) the publisher of its video was last told
    source_kbps: float | None  # what that publisher sends (the original)


@dataclass
class RunResult:
    setup: Setup
    mode: str
    duration: float
    participants: dict[str, Participant]
    run_start: float
    links: list[tuple[float, dict[str, LinkRates]]] = field(default_factory=list)  # (seconds, per participant)
    cores: list[tuple[float, float]] = field(default_factory=list)  # (seconds, server cores over the last one)
    levels: list[tuple[float, dict[str, str]]] = field(default_factory=list)  # the SFU's level per subscriber
    # (seconds, per subscriber: its estimate, the publisher's cap and what the publisher sends, kbit/s)
    chain: list[tuple[float, dict[str, RateChain]]] = field(default_factory=list)
    ladder_cpu: list[tuple[float, LadderWork]] = field(default_factory=list)  # (seconds, the ladders' work so far)
    layer_work: list[tuple[float, dict[str, LayerCounts]]] = field(default_factory=list)  # (seconds, by layer)

    def stream(self, receiver: str, publisher: str = PUBLISHER) -> StreamRecord:
        return self.participants[receiver].records.get(publisher) or StreamRecord(receiver, publisher)

    def subscribers(self) -> list[str]:
        return [m.label for m in self.setup.members if not m.publishes]


async def run_setup(mode: Mode, setup: Setup, settings: Settings, workdir: Path) -> RunResult:
    duration = setup.duration * settings.scale
    sfu = SfuProcess(workdir / f"{setup.name}-{mode.name}", server_options(mode)) if mode.sfu else None
    relay = ImpairingTurnServer(seed=settings.seed, profiles=settings.profile)
    await relay.start()
    run_start = time.time()  # the links' clock starts with the relay, a moment before
    tags = {m.label: i + 1 for i, m in enumerate(setup.members) if m.publishes}
    participants: dict[str, Participant] = {}
    for m in setup.members:
        p = Participant(m.label, m.profile, run_start, tags, source_size=(settings.width, settings.height),
                        scene=setup.scene)
        if m.publishes:
            camera = StampedVideoTrack(tags[m.label], settings.width, settings.height, settings.fps, setup.scene)
            tone = ToneAudioTrack(300 + 40 * tags[m.label], voiced=True)
            p.camera, p.video, p.audio = camera, camera, tone
            if mode.nara_media:
                p.audio = OpusTrack(tone)
                p.video = nara_video(camera)
        participants[m.label] = p
    result = RunResult(setup, mode.name, duration, participants, run_start)
    try:
        ordered = sorted(participants.values(), key=lambda p: not p.publishes)
        if sfu is not None:
            room = await sfu.consultation(setup.name)
            for p in ordered:
                await join_sfu(sfu, room, p, relay, **receive_options(mode))
        else:
            fanout: dict[str, MediaRelay] = {}
            for a in (p for p in ordered if p.publishes):
                for b in ordered:
                    if b is not a and not (b.publishes and b.label < a.label):
                        await connect_p2p(a, b, relay, fanout)
        await _measure(result, relay, sfu)
    finally:
        for p in participants.values():
            await p.close()
        if sfu is not None:
            sfu.stop()
        relay.close()
    return result


async def _measure(result: RunResult, relay: ImpairingTurnServer, sfu: SfuProcess | None) -> None:
    """Read the links every LINK_SAMPLE seconds and the server every second, until the run ends."""
    meter = LinkMeter(relay)
    if sfu is not None:
        sfu.sample()
    ticks = int(result.duration / LINK_SAMPLE)
    per_second = int(round(1 / LINK_SAMPLE))
    for tick in range(1, ticks + 1):
        await asyncio.sleep(max(0.0, result.run_start + tick * LINK_SAMPLE - time.time()))
        at = time.time() - result.run_start
        result.links.append((at, meter.sample()))
        if sfu is not None and tick % per_second == 0:
            result.cores.append((at, sfu.sample()[0]))
            stats = await sfu.api("GET", "/api/stats")
            result.levels.append((at, _levels(stats)))
            result.chain.append((at, _rate_chain(stats)))
            result.ladder_cpu.append((at, _ladder_cpu(stats)))
            result.layer_work.append((at, _layer_work(stats)))


def _levels(stats: dict[str, Any]) -> dict[str, str]:
    """Which level of the publisher's video each subscriber gets, as the SFU reports it."""
    levels = {}
    for room in stats.get("rooms", {}).values():
        for subscriber, peer in room.items():
            for received in peer.get("received", []):
                if str(received.get("from", "")).endswith("/video") and received.get("level") is not None:
                    levels[subscriber] = str(received["level"])
    return levels


def _rate_chain(stats: dict[str, Any]) -> dict[str, RateChain]:
    """Per subscriber: its estimate, and the cap and rate of the video it receives."""
    published = {f"{peer_id}/{kind}": p for room in stats.get("rooms", {}).values()
                 for peer_id, peer in room.items() for kind, p in peer.get("published", {}).items()}
    chain = {}
    for room in stats.get("rooms", {}).values():
        for subscriber, peer in room.items():
            video = next((published.get(str(r.get("from"))) for r in peer.get("received", [])
                          if str(r.get("from", "")).endswith("/video")), None)
            if video is None:
                continue
            estimate, cap = peer.get("bandwidth_estimate"), video.get("rate_cap")
            chain[subscriber] = RateChain(None if estimate is None else estimate / 1000,
                                          None if cap is None else cap / 1000, video.get("bitrate", 0) / 1000)
    return chain


def _ladder_cpu(stats: dict[str, Any]) -> LadderWork:
    """What the server's ladders have done so far: CPU seconds and frames, decoding originals and encoding layers."""
    ladders = [published.get("ladder_cpu") or {} for room in stats.get("rooms", {}).values()
               for peer in room.values() for published in peer.get("published", {}).values()]
    return LadderWork(*(sum(float(ladder.get(key) or 0.0) for ladder in ladders)
                        for key in ("decode_s", "encode_s", "decoded_frames", "encoded_frames")))


def _layer_work(stats: dict[str, Any]) -> dict[str, LayerCounts]:
    """Each layer's work so far, by name (a scenario has one publisher; a second one's layers would add up)."""
    layers: dict[str, LayerCounts] = {}
    for room in stats.get("rooms", {}).values():
        for peer in room.values():
            for published in peer.get("published", {}).values():
                for name, work in ((published.get("ladder_cpu") or {}).get("layers") or {}).items():
                    counts = LayerCounts(*(float(work.get(key) or 0.0) for key in (
                        "encoded_frames", "encode_s", "ran_s", "subscribers", "framerate")))
                    before = layers.get(name)
                    layers[name] = counts if before is None else LayerCounts(
                        before.frames + counts.frames, before.encode_s + counts.encode_s,
                        before.ran_s + counts.ran_s, before.subscribers + counts.subscribers, counts.framerate)
    return layers


# --- measurements over a run -----------------------------------------------------------------


def window_rate(run: RunResult, who: str, start: float, end: float, key: str) -> float | None:
    """Mean of a LinkRates field (kbit/s) over the readings in (start, end]."""
    values = [getattr(rates[who], key) for at, rates in run.links if start < at <= end and who in rates]
    return sum(values) / len(values) if values else None


def seconds_until(run: RunResult, who: str, since: float, until: float, key: str,
                  holds: Callable[[float, float | None], bool], lasting: float = 0.0) -> float | None:
    """Seconds from ``since`` until ``holds(rate, capacity)`` is true of the rate over the second
    before, and stays true for ``lasting`` seconds (within ``until``)."""
    readings = [(at, rates[who].capacity_kbps) for at, rates in run.links if since < at <= until and who in rates]
    passing = []
    for at, capacity in readings:
        rate = window_rate(run, who, at - 1.0, at, key)
        passing.append(rate is not None and holds(rate, capacity))
    for i, (at, _) in enumerate(readings):
        if all(ok for (later, _), ok in zip(readings[i:], passing[i:], strict=True) if later <= at + lasting):
            return at - since
    return None


def share_of_time(run: RunResult, who: str, since: float, until: float, key: str,
                  holds: Callable[[float, float | None], bool]) -> float | None:
    """Per cent of readings in (since, until] where ``holds`` is true of the rate over the second before."""
    verdicts = [holds(rate, rates[who].capacity_kbps) for at, rates in run.links if since < at <= until
                and who in rates and (rate := window_rate(run, who, at - 1.0, at, key)) is not None]
    return 100 * sum(verdicts) / len(verdicts) if verdicts else None


def video_fps(record: StreamRecord, start: float, end: float) -> float:
    return sum(1 for r in record.receipts if start <= r.at < end) / max(end - start, 1e-6)


def mean_psnr(record: StreamRecord, start: float, end: float) -> float | None:
    values = [r.psnr_db for r in record.receipts if start <= r.at < end and r.psnr_db is not None]
    return sum(values) / len(values) if values else None


def freeze_pct(record: StreamRecord, start: float, end: float) -> float:
    return 100 * frozen_time([r.at for r in record.receipts], start, end) / max(end - start, 1e-6)


def audio_gap_pct(record: StreamRecord, start: float, end: float) -> float | None:
    gap = audio_gap(record.audio_receipts, start, end)
    return None if gap is None else 100 * gap


def audio_frames_from(record: StreamRecord, start: float, end: float, *sources: str) -> int | None:
    """How many frames Nära's receive path gave from these sources (None: another receive path)."""
    known = [r.source for r in record.audio_receipts if start <= r.at < end and r.source is not None]
    return sum(1 for source in known if source in sources) if known else None


def audio_frames_skipped(record: StreamRecord, start: float, end: float) -> int | None:
    """How many frames Nära's receive path passed over in [start, end) to shrink its delay or catch up (sound
    that never played and that no gap shows: the frames around it follow on). None: another receive path."""
    counts = [r.skipped for r in record.audio_receipts if start <= r.at < end and r.skipped is not None]
    return counts[-1] - counts[0] if counts else None


def audio_figures(record: StreamRecord, start: float, end: float) -> Metrics:
    """The sound in [start, end): its gaps, and where Nära's receive path took its frames from."""
    return {
        "audio_gap_pct": audio_gap_pct(record, start, end),
        "audio_fec_frames": audio_frames_from(record, start, end, "fec"),
        "audio_made_up_frames": audio_frames_from(record, start, end, "conceal", "silence"),
        "audio_stretched_frames": audio_frames_from(record, start, end, "stretch"),
        "audio_shortened_frames": audio_frames_from(record, start, end, "shorten"),
        "audio_skipped_frames": audio_frames_skipped(record, start, end),
    }


def delivered_pct(run: RunResult, receiver: str, start: float, end: float) -> float | None:
    """Frames captured in [start, end) that reached ``receiver``, as a share of those the camera made."""
    camera = run.participants[PUBLISHER].camera
    assert camera is not None
    sent = sum(1 for t in camera.sent_at if start <= t - run.run_start < end)
    got = sum(1 for r in run.stream(receiver).receipts if start <= r.at - r.latency_ms / 1000 < end)
    return 100 * got / sent if sent else None


def pause_events(run: RunResult, subscriber: str) -> list[tuple[float, str]]:
    """(seconds, "video-paused" or "video-resumed") of the publisher's video to ``subscriber``."""
    return [(at, e["type"]) for at, e in run.participants[subscriber].events
            if e.get("type") in ("video-paused", "video-resumed") and e.get("subscriber_id") == subscriber
            and e.get("participant_id") == PUBLISHER]


def paused_seconds(run: RunResult, subscriber: str, start: float, end: float) -> float:
    total, since = 0.0, None
    for at, kind in [*pause_events(run, subscriber), (end, "end")]:
        if kind == "video-paused" and since is None:
            since = at
        elif kind != "video-paused" and since is not None:
            total += max(0.0, min(at, end) - max(since, start))
            since = None
    return total


def main_level(run: RunResult, subscriber: str, start: float, end: float) -> str | None:
    seen = Counter(levels[subscriber] for at, levels in run.levels if start <= at < end and subscriber in levels)
    return seen.most_common(1)[0][0] if seen else None


def steady(run: RunResult, settings: Settings) -> tuple[float, float]:
    return settings.settle, run.duration - 1.0


def ladder_work(run: RunResult, start: float, end: float) -> LadderWork | None:
    """What the server's ladders did a second over (start, end]: cores and frames, decoding and encoding."""
    readings = [(at, work) for at, work in run.ladder_cpu if start < at <= end]
    if len(readings) < 2 or readings[-1][0] <= readings[0][0]:
        return None
    (t0, first), (t1, last) = readings[0], readings[-1]
    return LadderWork(*((b - a) / (t1 - t0) for a, b in zip(first, last, strict=True)))


class LayerRate(NamedTuple):
    """One layer's work a second over a window, from the server's per-layer counts."""

    frames_per_s: float  # frames it encoded a second of the window
    encode_millicores: float  # its encoding's CPU
    ran_share: float  # of the window it ran
    subscribers: float  # on it, mean of the readings
    fewest_subscribers: float
    framerate: float  # its own


def layer_rate(run: RunResult, layer: str, start: float, end: float) -> LayerRate | None:
    readings = [(at, work[layer]) for at, work in run.layer_work if start < at <= end and layer in work]
    if len(readings) < 2 or readings[-1][0] <= readings[0][0]:
        return None
    (t0, first), (t1, last) = readings[0], readings[-1]
    span = t1 - t0
    on = [counts.subscribers for _, counts in readings]
    return LayerRate((last.frames - first.frames) / span, (last.encode_s - first.encode_s) / span * 1000,
                     (last.ran_s - first.ran_s) / span, sum(on) / len(on), min(on), last.framerate)


def other_layers_frames_per_s(run: RunResult, layer: str | None, start: float, end: float) -> float | None:
    """Frames a second every layer but ``layer`` encoded over the window (a subscriber trying the next one up)."""
    readings = [(at, work) for at, work in run.layer_work if start < at <= end]
    if len(readings) < 2 or readings[-1][0] <= readings[0][0]:
        return None
    (t0, first), (t1, last) = readings[0], readings[-1]
    return sum(counts.frames - (first[name].frames if name in first else 0.0)
               for name, counts in last.items() if name != layer) / (t1 - t0)


def core_mean(run: RunResult, start: float, end: float) -> float | None:
    values = [cores for at, cores in run.cores if start < at <= end]
    return sum(values) / len(values) if values else None


# --- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    metric: str
    op: str  # "<=", ">=", or "within": |value - 1| <= target
    target: float
    unit: str = ""
    applies: Callable[[Metrics], bool] | None = None  # None: always

    def text(self) -> str:
        if self.op == "within":
            return f"1 ± {self.target:g}"
        return f"{'≤' if self.op == '<=' else '≥'} {self.target:g}{self.unit}"

    def judge(self, metrics: Metrics) -> dict[str, Any]:
        value = metrics.get(self.metric)
        verdict: bool | None
        if self.applies is not None and not self.applies(metrics):
            verdict = None  # not applicable in this run
        elif not isinstance(value, int | float):
            verdict = False  # never measured, or never reached
        elif self.op == "<=":
            verdict = value <= self.target
        elif self.op == ">=":
            verdict = value >= self.target
        else:
            verdict = abs(value - 1) <= self.target
        return {"metric": self.metric, "goal": self.text(), "value": value, "pass": verdict}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    setups: tuple[Setup, ...]
    evaluate: Callable[[dict[str, RunResult], Settings], Metrics]
    goals: tuple[Goal, ...]
    modes: tuple[str, ...] = ("nara", "forward", "p2p")


def _step(runs: dict[str, RunResult], settings: Settings) -> Metrics:
    run = runs["step"]
    steps = settings.profile("adapt-step").downlink.rate_steps
    down, up = steps[0][0], steps[1][0]
    record = run.stream("sub")
    def fits(rate: float, capacity: float | None) -> bool:
        return capacity is not None and rate <= capacity

    fit = seconds_until(run, "sub", down, up, "sent_kbps", fits, lasting=FIT_LASTING)
    used = seconds_until(run, "sub", up, run.duration, "received_kbps",
                         lambda rate, cap: cap is not None and rate >= 0.8 * cap)
    return {
        "freeze_s_around_step": frozen_time([r.at for r in record.receipts], down - 1, down + 5),
        "fit_after_step_s": fit,
        "use_80pct_after_up_s": used,
        "sent_within_capacity_pct_low": share_of_time(run, "sub", down + 2, up, "sent_kbps", fits),
        "step_down_at_s": down,
        "step_up_at_s": up,
        "sent_kbps_before": window_rate(run, "sub", settings.settle, down, "sent_kbps"),
        "sent_kbps_low": window_rate(run, "sub", down + 5, up, "sent_kbps"),
        "received_kbps_after_up": window_rate(run, "sub", up + 5, run.duration, "received_kbps"),
        "fps_before": video_fps(record, settings.settle, down),
        "fps_low": video_fps(record, down + 5, up),
        "level_low": main_level(run, "sub", down + 5, up),
    }


def _steady_quality(run: RunResult, settings: Settings, subscriber: str = "sub") -> Metrics:
    start, end = steady(run, settings)
    record = run.stream(subscriber)
    return {
        "delivered_pct": delivered_pct(run, subscriber, start, end - 1),
        "freeze_pct": freeze_pct(record, start, end),
        "psnr_db": mean_psnr(record, start, end),
        "fps": video_fps(record, start, end),
        **audio_figures(record, start, end),
        "received_kbps": window_rate(run, subscriber, start, end, "received_kbps"),
        "level": main_level(run, subscriber, start, end),
    }


def _loss5(runs: dict[str, RunResult], settings: Settings) -> Metrics:
    return _steady_quality(runs["loss5"], settings)


def _burst10(runs: dict[str, RunResult], settings: Settings) -> Metrics:
    return _steady_quality(runs["burst10"], settings)


def _thin150(runs: dict[str, RunResult], settings: Settings) -> Metrics:
    run = runs["thin150"]
    start, end = steady(run, settings)
    record = run.stream("sub")
    pauses = [at for at, kind in pause_events(run, "sub") if kind == "video-paused"]
    joined = run.participants["sub"].joined_at or 0.0
    return {
        **audio_figures(record, start, end),
        "video_fps": video_fps(record, start, end),
        "paused": bool(pauses),
        "pause_notice_s": pauses[0] - joined if pauses else None,
        "paused_s": paused_seconds(run, "sub", start, end),
        "freeze_pct": freeze_pct(record, start, end),
        "received_kbps": window_rate(run, "sub", start, end, "received_kbps"),
        "level": main_level(run, "sub", start, end),
    }


def _mixed(runs: dict[str, RunResult], settings: Settings) -> Metrics:
    both, alone = runs["mixed"], runs["mixed-alone"]
    start, end = steady(both, settings)
    fast_both, fast_alone = both.stream("fast"), alone.stream("fast")
    psnr_both, psnr_alone = mean_psnr(fast_both, start, end), mean_psnr(fast_alone, start, end)
    fps_both, fps_alone = video_fps(fast_both, start, end), video_fps(fast_alone, start, end)
    return {
        "fast_psnr_ratio": psnr_both / psnr_alone if psnr_both and psnr_alone else None,
        "fast_fps_ratio": fps_both / fps_alone if fps_alone else None,
        "fast_psnr_db_with_slow": psnr_both,
        "fast_psnr_db_alone": psnr_alone,
        "fast_fps_with_slow": fps_both,
        "fast_fps_alone": fps_alone,
        "slow_fps": video_fps(both.stream("slow"), start, end),
        "slow_level": main_level(both, "slow", start, end),
        "fast_level": main_level(both, "fast", start, end),
    }


def _layer_cpu(runs: dict[str, RunResult], settings: Settings) -> Metrics:
    """The server's work with 1 and with 10 relatives on one low layer.

    The goal is read from the server's counts for the layer the relatives sit on: its frames encoded
    a second, and its encoding's CPU a second, with ten relatives on it over with one. Paid once per
    layer, each is about 1 (and its frames a second about its own frame rate); an encoder per
    subscriber would make each about 10. The doctor, on a fast link, gets the original in both runs,
    so the publisher's rate follows the doctor's link and not the relatives' (its cap follows the
    best-connected subscriber), and the relatives' links have room for the lowest layer and never for
    the next, so none tries it. The whole ladder's figures (every layer's frames, the original's
    decoding) and the process's CPU per extra subscriber (the forwarding's, beside the
    forwarding-only SFU's in the same run) are reported beside them.
    """
    one, ten = runs["layer-cpu-1"], runs["layer-cpu-10"]
    start, end = max(settings.settle, LAYER_CPU_SETTLE * settings.scale), one.duration - 1.0
    relatives_1 = [s for s in one.subscribers() if s != DOCTOR]
    relatives_10 = [s for s in ten.subscribers() if s != DOCTOR]
    cores_1, cores_10 = core_mean(one, start, end), core_mean(ten, start, end)
    fps = [video_fps(ten.stream(s), start, end) for s in relatives_10]
    marginal = None if cores_1 is None or cores_10 is None else (cores_10 - cores_1) / 9 * 1000
    work_1, work_10 = ladder_work(one, start, end), ladder_work(ten, start, end)
    levels = {main_level(run, s, start, end) for run, who in ((one, relatives_1), (ten, relatives_10)) for s in who}
    layer = levels.pop() if len(levels) == 1 else None
    rate_1, rate_10 = (None if layer is None else layer_rate(run, layer, start, end) for run in (one, ten))

    def ratio(a: float | None, b: float | None) -> float | None:  # (None where no layer ran: the goal fails)
        return b / a if a and b is not None else None

    def whole(work: LadderWork | None, key: str) -> float | None:
        return None if work is None else float(getattr(work, key))

    def per_frame_ms(work: LadderWork | None, cpu: str, frames: str) -> float | None:
        return getattr(work, cpu) / getattr(work, frames) * 1000 if work and getattr(work, frames) else None

    def of_layer(rate: LayerRate | None, key: str) -> float | None:
        return None if rate is None else float(getattr(rate, key))

    frames_1, frames_10 = of_layer(rate_1, "frames_per_s"), of_layer(rate_10, "frames_per_s")
    cpu_1, cpu_10 = of_layer(rate_1, "encode_millicores"), of_layer(rate_10, "encode_millicores")
    return {
        "same_layer_10": layer not in (None, "original", "paused"),
        "layer_frames_ratio_10_to_1": ratio(frames_1, frames_10),
        "layer_encode_cpu_ratio_10_to_1": ratio(cpu_1, cpu_10),
        "server_makes_layers": MODES[one.mode].adaptation,
        "layer": layer,
        "layer_framerate": of_layer(rate_10, "framerate"),
        "layer_frames_per_s_1": frames_1,
        "layer_frames_per_s_10": frames_10,
        "layer_frames_over_own_rate_10": ratio(of_layer(rate_10, "framerate"), frames_10),
        "layer_encode_millicores_1": cpu_1,
        "layer_encode_millicores_10": cpu_10,
        "layer_encode_ms_per_frame_1": ratio(frames_1, cpu_1),
        "layer_encode_ms_per_frame_10": ratio(frames_10, cpu_10),
        "layer_ran_share_1": of_layer(rate_1, "ran_share"),
        "layer_ran_share_10": of_layer(rate_10, "ran_share"),
        "layer_subscribers_1": of_layer(rate_1, "subscribers"),
        "layer_subscribers_10": of_layer(rate_10, "subscribers"),
        "layer_fewest_subscribers_10": of_layer(rate_10, "fewest_subscribers"),
        "other_layers_frames_per_s_1": other_layers_frames_per_s(one, layer, start, end),
        "other_layers_frames_per_s_10": other_layers_frames_per_s(ten, layer, start, end),
        # the whole ladder and the whole process, as the earlier versions of this check read them
        "ladder_frames_encoded_per_s_1": whole(work_1, "encoded"),
        "ladder_frames_encoded_per_s_10": whole(work_10, "encoded"),
        "ladder_encodes_ratio_10_to_1": ratio(whole(work_1, "encoded"), whole(work_10, "encoded")),
        "ladder_encode_millicores_1": None if work_1 is None else work_1.encode_s * 1000,
        "ladder_encode_millicores_10": None if work_10 is None else work_10.encode_s * 1000,
        "decodes_ratio_10_to_1": ratio(whole(work_1, "decoded"), whole(work_10, "decoded")),
        "decode_millicores_1": None if work_1 is None else work_1.decode_s * 1000,
        "decode_millicores_10": None if work_10 is None else work_10.decode_s * 1000,
        "decode_ms_per_frame_1": per_frame_ms(work_1, "decode_s", "decoded"),
        "decode_ms_per_frame_10": per_frame_ms(work_10, "decode_s", "decoded"),
        "marginal_millicores_per_subscriber": marginal,
        "cores_1": cores_1,
        "cores_10": cores_10,
        "cost_ratio_10_to_1": cores_10 / cores_1 if cores_1 and cores_10 is not None else None,
        "fps_1": video_fps(one.stream(relatives_1[0]), start, end) if relatives_1 else None,
        "fps_10_worst": min(fps) if fps else None,
        "doctor_level_10": main_level(ten, DOCTOR, start, end),
    }


def _makes_layers(metrics: Metrics) -> bool:
    return bool(metrics.get("server_makes_layers"))


def _with_publisher(*subscribers: Member) -> tuple[Member, ...]:
    return (Member(PUBLISHER, "adapt-clean", publishes=True), *subscribers)


def _was_paused(metrics: Metrics) -> bool:
    return bool(metrics.get("paused"))


SCENARIOS = {s.name: s for s in (
    Scenario("step", "The subscriber's link drops from 2 Mbit/s to 300 kbit/s at 10 s and comes back at 25 s "
                     "(of 40 s). Freeze from 1 s before to 5 s after the drop; seconds until what is sent toward "
                     "the subscriber (1 s average) fits the new capacity and keeps fitting for 2 s; after the "
                     "rise, seconds until the subscriber receives ≥ 80 % of 2 Mbit/s (1 s average). The camera "
                     "shows the detailed scene, which needs more than 2 Mbit/s.",
             # (the gradient never needs more than about 0.6 Mbit/s: no sender could fill the link)
             (Setup("step", _with_publisher(Member("sub", "adapt-step")), 40, scene="detailed"),), _step,
             (Goal("freeze_s_around_step", "<=", 1, " s"), Goal("fit_after_step_s", "<=", 2, " s"),
              Goal("use_80pct_after_up_s", "<=", 10, " s"))),
    Scenario("loss5", "1 Mbit/s, 100 ms RTT, 5 % random loss (25 s): frames delivered of those sent, time frozen, "
                      "picture quality.",
             (Setup("loss5", _with_publisher(Member("sub", "adapt-loss5")), 25),), _loss5,
             (Goal("delivered_pct", ">=", 95, " %"), Goal("freeze_pct", "<=", 1, " %"),
              Goal("psnr_db", ">=", 30, " dB"))),
    Scenario("thin150", "150 kbit/s (25 s): no audio gap; video at ≥ 5 fps on the lowest layer, or, if the SFU "
                        "pauses the video, the notice within 2 s of joining.",
             (Setup("thin150", _with_publisher(Member("sub", "adapt-thin150")), 25),), _thin150,
             (Goal("audio_gap_pct", "<=", 0, " %"),
              Goal("video_fps", ">=", 5, applies=lambda m: not _was_paused(m)),
              Goal("pause_notice_s", "<=", 2, " s", applies=_was_paused))),
    Scenario("burst10", "1 Mbit/s, 10 % loss in bursts of 3 packets on average (25 s): 20 ms audio frames neither "
                        "received nor recovered from FEC, concealed ones included.",
             (Setup("burst10", _with_publisher(Member("sub", "adapt-burst10")), 25),), _burst10,
             (Goal("audio_gap_pct", "<=", 2, " %"),)),
    Scenario("mixed", "One publisher, a subscriber behind 300 kbit/s and one behind 4 Mbit/s, then the same "
                      "without the slow one (20 s each): the fast subscriber's picture should not suffer.",
             (Setup("mixed", _with_publisher(Member("slow", "adapt-300k"), Member("fast", "adapt-4m")), 20),
              Setup("mixed-alone", _with_publisher(Member("fast", "adapt-4m")), 20)), _mixed,
             (Goal("fast_psnr_ratio", "within", 0.05), Goal("fast_fps_ratio", "within", 0.05))),
    Scenario("layer-cpu", "One publisher; a doctor on a fast link (4 Mbit/s), who gets the original; and 1, then "
                          "10 relatives, each behind 120 kbit/s: room for the lowest layer beside the audio, never "
                          "for the next (25 s each). For the layer the relatives sit on, from the server's counts: "
                          "its frames encoded a second and its encoding's CPU a second, with 10 relatives over "
                          f"with 1, at most {LAYER_ENCODE_RATIO:g} each (a layer paid once: about 1, and its frames "
                          "a second about its own frame rate; an encoder per subscriber: about 10). The whole "
                          "ladder's and the whole process's figures beside them.",
             (Setup("layer-cpu-1", _with_publisher(Member(DOCTOR, "adapt-4m"), Member("r1", "adapt-120k")), 25),
              Setup("layer-cpu-10", _with_publisher(Member(DOCTOR, "adapt-4m"),
                                                    *(Member(f"r{i}", "adapt-120k") for i in range(1, 11))), 25)),
             _layer_cpu, (Goal("same_layer_10", ">=", 1, applies=_makes_layers),
                          Goal("layer_frames_ratio_10_to_1", "<=", LAYER_ENCODE_RATIO, applies=_makes_layers),
                          Goal("layer_encode_cpu_ratio_10_to_1", "<=", LAYER_ENCODE_RATIO, applies=_makes_layers)),
             modes=("nara", "forward")),
)}


# --- the command ------------------------------------------------------------------------------


def per_second_rows(scenario: str, run: RunResult) -> list[dict[str, Any]]:
    seconds = int(run.duration)
    rows = []
    for receiver in run.subscribers():
        record = run.stream(receiver)
        arrivals = [r.at for r in record.receipts]
        paused = pause_events(run, receiver)
        for second, values in enumerate(record.per_second(seconds)):
            level = next((lv[receiver] for at, lv in run.levels if second < at <= second + 1 and receiver in lv),
                         None)
            state = [kind for at, kind in paused if at < second + 1]
            chain = next((c[receiver] for at, c in run.chain if second < at <= second + 1 and receiver in c),
                         RateChain(None, None, None))
            rows.append({
                "scenario": scenario, "run": run.setup.name, "mode": run.mode, "second": second,
                "receiver": receiver, "fps": values["fps"],
                "freeze_ms": 1000 * frozen_time(arrivals, second, second + 1),
                "latency_p50_ms": values["latency_p50_ms"], "psnr_db": values["psnr_db"],
                "audio_gap": audio_gap(record.audio_receipts, second, second + 1),
                "sent_kbps": window_rate(run, receiver, second, second + 1, "sent_kbps"),
                "received_kbps": window_rate(run, receiver, second, second + 1, "received_kbps"),
                "capacity_kbps": next((r[receiver].capacity_kbps for at, r in run.links
                                       if second < at <= second + 1 and receiver in r), None),
                "server_cores": next((c for at, c in run.cores if second < at <= second + 1), None),
                "level": level, "video_paused": bool(state) and state[-1] == "video-paused",
                **chain._asdict(),
            })
    return rows


CSV_FIELDS = ["scenario", "run", "mode", "second", "receiver", "fps", "freeze_ms", "latency_p50_ms", "psnr_db",
              "audio_gap", "sent_kbps", "received_kbps", "capacity_kbps", "server_cores", "level", "video_paused",
              "estimate_kbps", "cap_kbps", "source_kbps"]


def run_scenario(scenario: Scenario, modes: Sequence[str], settings: Settings, workdir: Path,
                 rows: list[dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in MODES:
        if name not in modes:
            continue
        if name not in scenario.modes:
            results[name] = {"not_applicable": "peer to peer has no server whose CPU could be measured"}
            continue
        mode = MODES[name]
        runs = {}
        for setup in scenario.setups:
            began = time.monotonic()
            print(f"{scenario.name}/{mode.name}: {setup.name}, {setup.duration * settings.scale:g} s …",
                  file=sys.stderr, flush=True)
            runs[setup.name] = asyncio.run(run_setup(mode, setup, settings, workdir))
            rows.extend(per_second_rows(scenario.name, runs[setup.name]))
            print(f"{scenario.name}/{mode.name}: {setup.name} done in {time.monotonic() - began:.0f} s",
                  file=sys.stderr, flush=True)
        metrics = scenario.evaluate(runs, settings)
        goals = [goal.judge(metrics) for goal in scenario.goals]
        everyone = [p for run in runs.values() for p in run.participants.values()]
        results[name] = {
            "metrics": metrics,
            "goals": goals,
            "passed": sum(1 for g in goals if g["pass"] is True),
            "failed": sum(1 for g in goals if g["pass"] is False),
            # Decoded pictures that were no sent frame, and frames the measuring code failed on.
            "corrupt_frames": sum(p.corrupt_frames for p in everyone),
            "unmeasured_frames": sum(p.unmeasured_frames for p in everyone),
        }
    return results


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def results_table(summary: dict[str, Any]) -> str:
    """Per scenario: each goal (then the other figures) per mode, with pass or FAIL."""
    lines = []
    for name, scenario in summary["scenarios"].items():
        modes = list(scenario["modes"])
        lines.append(f"\n{name}: {scenario['description']}")
        lines.append(f"  {'':34}{'goal':>10}" + "".join(f"{m:>18}" for m in modes))
        goals = {g["metric"]: g["goal"] for g in scenario["goals"]}
        first: dict[str, Any] = next((r for r in scenario["modes"].values() if "metrics" in r), {"metrics": {}})
        for metric in [*goals, *(k for k in first["metrics"] if k not in goals)]:
            cells = []
            for m in modes:
                result = scenario["modes"][m]
                if "metrics" not in result:
                    cells.append("n/a")
                    continue
                verdict = next((g["pass"] for g in result["goals"] if g["metric"] == metric), None)
                mark = {True: " pass", False: " FAIL", None: ""}[verdict]
                cells.append(_fmt(result["metrics"].get(metric)) + mark)
            lines.append(f"  {metric:34}{goals.get(metric, ''):>10}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    scenarios = [s for s in args.scenarios.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [s for s in scenarios if s not in SCENARIOS] + [m for m in modes if m not in MODES]
    if unknown or not scenarios or not modes or args.duration_scale <= 0:
        print(f"nara bench adapt: unknown {', '.join(map(repr, unknown)) or 'or empty choice'}; scenarios: "
              f"{', '.join(SCENARIOS)}; modes: {', '.join(MODES)}; --duration-scale above 0", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.video.split("x"))
    settings = Settings(scale=args.duration_scale, seed=args.seed, width=width, height=height, fps=args.fps)
    out = Path(args.output or f"bench-results/adapt-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "command": " ".join(["nara", "bench", "adapt", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "adapt"]
        else " ".join(sys.argv),
        "seed": settings.seed, "duration_scale": settings.scale, "settle_s": settings.settle,
        "video": f"{settings.width}x{settings.height} at {settings.fps} fps",
        "bitrates": "from the impairing relay: UDP payload bytes (SRTP/RTCP with headers, audio and video "
                    "together) sent toward each participant's downlink, and delivered by it",
        "modes": {name: {"description": MODES[name].description} for name in modes},
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in scenarios:
            scenario = SCENARIOS[name]
            summary["scenarios"][name] = {
                "description": scenario.description,
                "links": {m.label: f"{m.profile}: {find_profile(m.profile).source}"
                          for setup in scenario.setups for m in setup.members},
                "goals": [{"metric": g.metric, "goal": g.text()} for g in scenario.goals],
                "modes": run_scenario(scenario, modes, settings, Path(tmp), rows),
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["elapsed_s"] = round(time.monotonic() - began, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "per-second.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else
                             round(row[k], 3) if isinstance(row[k], float) else row[k] for k in CSV_FIELDS})
    print(results_table(summary))
    print(f"\nresults in {out}/ (summary.json, per-second.csv); {summary['elapsed_s']:.0f} s")
    return 0
