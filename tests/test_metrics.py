"""/metrics and /api/live during a real call between two aiortc participants."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from mediaserver.forwarding_delay import BOUNDS_NS, DelaySnapshot
from signalling.client import ConsultationClient

from .conftest import RunningServer, start_server
from .media_helpers import TONES, Watcher, receiving_from

TITLE = "Hemsjukvård Pajala"
PATIENT_REF = "pat-7f3a"
NAMES = {"p1": "Ingrid Berg", "p2": "Sven Lindqvist"}
LAYERS = {"starting", "paused", "90p", "180p", "360p", "original"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(server: RunningServer, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics", headers=headers) as response:
        return response.status, await response.text()


def parse(text: str) -> Samples:
    """Every sample by name and labels, through Prometheus' own text-format parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= set(ls)]
    return sum(found) if found else None


def labels_of(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    wanted = set(labels.items())
    return [dict(ls) for (n, ls) in samples if n == name and wanted <= set(ls)]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Ask again, as a Prometheus server scrapes, until ``check`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the figures never showed up"
        await asyncio.sleep(0.5)  # the scrape interval


async def join(server: RunningServer, room: str, tag: int) -> ConsultationClient:
    pid = f"p{tag}"
    token = server.token(room, NAMES[pid], "clinician", participant_id=pid)
    client = ConsultationClient(server.url, room, token, video=StampedVideoTrack(tag, 320, 240, 15),
                                audio=ToneAudioTrack(TONES[tag]))
    await client.join()
    return client


def participant_figures_plausible(samples: Samples, room: str, me: str, other: str) -> bool:
    who = {"consultation": room, "participant": me}
    up, down = value(samples, "nara_participant_send_bitrate_bps", **who), value(
        samples, "nara_participant_receive_bitrate_bps", **who)
    rtt = value(samples, "nara_participant_rtt_seconds", **who)
    loss_up = value(samples, "nara_participant_loss_ratio", direction="up", **who)
    layers = labels_of(samples, "nara_participant_video_layer", **who)
    return (up is not None and up > 20_000 and down is not None and down > 20_000
            and rtt is not None and loss_up is not None
            and any(layer["from"] == other and layer["layer"] not in ("starting", "paused") for layer in layers))


async def test_metrics_carry_each_participants_link_during_a_live_call(server: RunningServer) -> None:
    room = server.hub.store.create(TITLE, None, PATIENT_REF).id
    clients = [await join(server, room, tag) for tag in (1, 2)]
    watchers = [Watcher(c) for c in clients]
    token = (server.config.data_dir / "metrics-token").read_text().strip()
    try:
        for client, watcher, other in zip(clients, watchers, ("p2", "p1"), strict=True):
            await receiving_from(client, {other})
            watcher.follow()
        for watcher, other in zip(watchers, (2, 1), strict=True):
            await watcher.wait_for(lambda w=watcher, o=other: len(w.frames[o]) >= 10)
        samples: Samples = {}

        async def both_plausible() -> bool:
            nonlocal samples
            status, text = await scrape(server, token)
            assert status == 200
            assert TITLE not in text and PATIENT_REF not in text
            assert not any(name in text for name in NAMES.values())
            samples = parse(text)
            return (participant_figures_plausible(samples, room, "p1", "p2")
                    and participant_figures_plausible(samples, room, "p2", "p1"))

        await until(both_plausible)
        assert value(samples, "nara_consultations") == 1
        assert value(samples, "nara_participants", role="clinician") == 2
        for me, other in (("p1", "p2"), ("p2", "p1")):
            who = {"consultation": room, "participant": me}
            assert 0 < value(samples, "nara_participant_rtt_seconds", **who) < 1  # type: ignore[operator]
            assert value(samples, "nara_participant_estimate_bps", **who) > 30_000  # type: ignore[operator]
            assert value(samples, "nara_participant_loss_ratio", direction="up", **who) < 0.05  # type: ignore[operator]
            assert value(samples, "nara_participant_loss_ratio", direction="down", **who) < 0.05  # type: ignore[operator]
            assert value(samples, "nara_forwarded_packets_total", kind="video", **who) >= 10  # type: ignore[operator]
            assert value(samples, "nara_forwarded_packets_total", kind="audio", **who) >= 10  # type: ignore[operator]
            assert value(samples, "nara_uplink_packets_expected_total", kind="video", **who) >= 10  # type: ignore[operator]
            [layer] = labels_of(samples, "nara_participant_video_layer", **who)
            assert layer["from"] == other and layer["layer"] in LAYERS
            assert value(samples, "nara_participant_video_height_pixels", **who) > 0  # type: ignore[operator]
            assert value(samples, "nara_participant_video_paused", **who) == 0
            [info] = labels_of(samples, "nara_participant_info", **who)
            assert info["role"] == "clinician" and info["connection"] == "connected" and info["route"] == "host"
        assert value(samples, "process_cpu_seconds_total") is not None
        assert value(samples, "process_resident_memory_bytes") > 10_000_000  # type: ignore[operator]
        assert value(samples, "nara_images_stored") == 0
        # The admin key may scrape too.
        status, _ = await scrape(server, server.admin_key)
        assert status == 200

        # IT staff's page reads the same figures, with their history, from /api/live.
        report = await live(server, server.admin_key)
        [consultation] = report["consultations"]
        assert consultation["id"] == room and consultation["started_at"] <= time.time()
        people = {p["id"]: p for p in consultation["participants"]}
        assert set(people) == {"p1", "p2"}
        for pid, person in people.items():
            assert person["role"] == "clinician" and person["connection"] == "connected"
            assert len(person["samples"]["t"]) >= 2 and person["now"]["up"] > 0
            assert person["now"]["video"][0]["from"] == ("p2" if pid == "p1" else "p1")
            assert set(person["samples"]) >= {"t", "up", "down", "loss_up", "loss_down", "rtt", "estimate", "video"}
        latest = max(t for p in people.values() for t in p["samples"]["t"])
        newer = await live(server, server.admin_key, since=latest)
        assert all(not p["samples"]["t"] or min(p["samples"]["t"]) > latest
                   for p in newer["consultations"][0]["participants"])
        assert not any(name in str(report) for name in (TITLE, PATIENT_REF, *NAMES.values()))
    finally:
        for watcher in watchers:
            await watcher.stop()
        for client in clients:
            await client.close()


async def live(server: RunningServer, key: str | None, **query: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/api/live", headers=headers,
                                                         params={k: str(v) for k, v in query.items()}) as response:
        body: dict[str, Any] = await response.json()
        return {"status": response.status, **body} if response.status != 200 else body


async def test_scraping_without_the_token_is_refused(server: RunningServer) -> None:
    status, text = await scrape(server, None)
    assert status == 401 and "metrics_token_missing" in text
    status, text = await scrape(server, "not-the-token")
    assert status == 403 and "metrics_token_invalid" in text
    assert "nara_" not in text
    refused = await live(server, None)
    assert refused["status"] == 401 and refused["error"]["code"] == "admin_key_missing"
    metrics_token = (server.config.data_dir / "metrics-token").read_text().strip()
    refused = await live(server, metrics_token)  # the metrics token reads figures, nothing else
    assert refused["status"] == 403
    malformed = await live(server, server.admin_key, since="soon")
    assert malformed["status"] == 400 and malformed["error"]["code"] == "since_invalid"
    mode = (server.config.data_dir / "metrics-token").stat().st_mode & 0o777
    assert mode == 0o600


async def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    running, runner = await start_server(tmp_path, metrics_enabled=False)
    try:
        status, _ = await scrape(running, running.admin_key)
        assert status == 404
    finally:
        await runner.cleanup()


def copies_held(samples: Samples) -> float:
    """Copies the server forwarded, by its own histograms in ``GET /api/stats``."""
    return float(sum(DelaySnapshot.from_json(published["forwarding_delay"]).total
                     for participants in samples.values() for figures in participants.values()
                     for published in figures["published"].values()))


async def stats(server: RunningServer) -> Any:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    async with aiohttp.ClientSession(headers=headers) as http, http.get(f"{server.url}/api/stats") as response:
        return (await response.json())["rooms"]


def delay_histogram(text: str) -> tuple[list[tuple[float, float]], float, float]:
    """``nara_forwarding_delay_seconds`` of the server (no media workers): its (le, cumulative count) buckets,
    its count and its sum, through Prometheus' own parser."""
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "nara_forwarding_delay_seconds"]
    assert family.type == "histogram"
    buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket"))
    assert all(s.labels["worker"] == "main" for s in family.samples)
    [count] = [s.value for s in family.samples if s.name.endswith("_count")]
    [total] = [s.value for s in family.samples if s.name.endswith("_sum")]
    return buckets, count, total


async def test_forwarding_delay_histogram_counts_every_copy_timed_and_keeps_them_after_a_leave(
        server: RunningServer) -> None:
    room = server.hub.store.create(TITLE, None, PATIENT_REF).id
    clients = [await join(server, room, tag) for tag in (1, 2)]
    token = (server.config.data_dir / "metrics-token").read_text().strip()
    try:
        for client, other in zip(clients, ("p2", "p1"), strict=True):
            await receiving_from(client, {other})

        async def forwarding() -> bool:
            return copies_held(await stats(server)) >= 100

        await until(forwarding)
        # The histogram is read between two readings of the publications' own: it holds every copy they timed.
        before = copies_held(await stats(server))
        status, text = await scrape(server, token)
        after = copies_held(await stats(server))
        assert status == 200
        buckets, count, held = delay_histogram(text)
        assert 100 <= before <= count <= after
        assert [le for le, _ in buckets][-1] == float("inf") and buckets[-1][1] == count
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))  # cumulative
        assert [le for le, _ in buckets][:-1] == [bound / 1e9 for bound in BOUNDS_NS]
        assert 0 < held / count < 0.05  # loopback, two participants: well under 50 ms a copy on average

        # One leaves: what its publications' copies were held stays in the histogram (a counter never drops).
        await clients[0].close()

        async def one_left() -> bool:
            nonlocal text
            text = (await scrape(server, token))[1]
            return value(parse(text), "nara_participants", role="clinician") == 1

        await until(one_left)
        _, count_after_leave, held_after_leave = delay_histogram(text)
        assert count_after_leave >= count and held_after_leave >= held
    finally:
        for client in clients:
            await client.close()
