"""The SFU in worker processes: consultations spread over them, one killed mid-call, none left behind.

A real ``nara serve --workers 2``, a real home kit agent (which joins again by
itself) and real aiortc participants on loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mediaserver.aiortc_adapter import MediaPortsExhausted
from mediaserver.errors import CodedError, MediaError
from mediaserver.figures import ConsultationFigures, ParticipantFigures, VideoReceived
from mediaserver.pool import WorkerLoad, WorkerPool, least_loaded, port_slices
from mediaserver.worker_protocol import (
    encode,
    error_from_json,
    error_json,
    figures_from_json,
    figures_json,
    read_message,
)
from signalling import settings
from signalling.client import ConsultationClient, JoinRefused

from .conftest import start_server
from .edge_helpers import KitWatcher, ServerProcess, admin, agent_running, enrolled_kit, kit_config
from .ports import free_udp_range
from .test_browser_client import browser, join_call, rising  # noqa: F401 - browser is a fixture

# --- the pieces, on plain data ----------------------------------------------------------


def test_the_port_range_is_cut_into_one_slice_per_worker_with_nothing_shared() -> None:
    assert port_slices(40000, 40999, 2) == [(40000, 40499), (40500, 40999)]
    assert port_slices(40000, 40010, 3) == [(40000, 40003), (40004, 40007), (40008, 40010)]


def test_a_new_consultation_goes_to_the_worker_with_least_cpu_and_never_to_a_saturated_one_with_room_elsewhere(
        ) -> None:
    # least CPU; within a tenth of a core (readings are 2 s old), fewest participants
    assert least_loaded([WorkerLoad(0, True, 2, 0.45), WorkerLoad(1, True, 9, 0.12)]) == 1
    assert least_loaded([WorkerLoad(0, True, 2, 0.31), WorkerLoad(1, True, 4, 0.35)]) == 0
    assert least_loaded([WorkerLoad(0, True, 4, 0.02), WorkerLoad(1, True, 2, 0.05)]) == 1
    # saturated (70 % of its core, or its loop behind): only when every other one is too
    assert least_loaded([WorkerLoad(0, True, 2, 0.72), WorkerLoad(1, True, 40, 0.69)]) == 1
    assert least_loaded([WorkerLoad(0, True, 2, 0.10, loop_lag=0.02), WorkerLoad(1, True, 40, 0.6)]) == 1
    assert least_loaded([WorkerLoad(0, True, 2, 0.95), WorkerLoad(1, True, 40, 0.75)]) == 1
    assert least_loaded([WorkerLoad(0, True, 60, 0.99)]) == 0  # the only one up still takes it
    assert least_loaded([WorkerLoad(0, False, 0, 0.0), WorkerLoad(1, True, 9, 0.9)]) == 1
    assert least_loaded([WorkerLoad(0, False, 0, 0.0)]) is None


async def test_messages_errors_and_figures_cross_the_stream_unchanged() -> None:
    reader = asyncio.StreamReader()
    message = {"id": 3, "op": "join", "info": {"id": "p1", "name": "Åsa", "role": "kit", "can_publish": True}}
    reader.feed_data(encode(message) + encode({"event": "changed"}))
    reader.feed_eof()
    assert await read_message(reader) == message
    assert await read_message(reader) == {"event": "changed"}
    assert await read_message(reader) is None
    for error in (MediaPortsExhausted("127.0.0.1", 40000, 40001), MediaError("sdp_invalid", "bad"),
                  CodedError("media_session_gone", "gone")):
        back = error_from_json(error_json(error))
        assert (type(back), back.code, back.message) == (type(error), error.code, error.message)
    figures = [ConsultationFigures("c1", 1.0, [ParticipantFigures(
        "c1", "p1", "kit", 2.0, "connected", "host", {"video": 300e3}, {"audio": 24e3}, {"video": (100, 3)},
        {"audio": 50}, {"audio": 4000}, 0.01, 0.02, 0.05, 8e5, 5e5, 1, [VideoReceived("p2", "180p", 180, False)])])]
    assert figures_from_json(figures_json(figures)) == figures


def test_workers_is_checked_like_every_other_key() -> None:
    _, problems = settings.load(None, {"NARA_MEDIA_WORKERS": "-1"})
    assert [(p.field, p.code) for p in problems] == [("media.workers", "out_of_range")]
    config, problems = settings.load(None, {"NARA_MEDIA_WORKERS": "3", "NARA_MEDIA_PORT_MIN": "40000",
                                            "NARA_MEDIA_PORT_MAX": "40004"})
    assert [(p.field, p.code) for p in problems] == [("media.port_max", "range_too_narrow")]
    assert config.media_workers == 3


async def server_ports(page: Any) -> set[int]:
    """The UDP ports of the server's ICE candidates in a browser's current call."""
    sdp = await page.evaluate("() => naraDebug.call.pc.remoteDescription.sdp")
    ports = {int(line.split()[5]) for line in sdp.splitlines() if line.startswith("a=candidate:")}
    assert ports
    return ports


# --- a real server with two workers ---------------------------------------------------------


async def _workers(served: ServerProcess) -> list[dict[str, Any]]:
    listing = await admin(served.url, served.admin_key, "GET", "/api/workers")
    assert listing["mode"] == "workers"
    return list(listing["workers"])


async def _wait_for_workers(served: ServerProcess, predicate: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Ask /api/workers until ``predicate`` holds of its list (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = await _workers(served)
        if predicate(workers):
            return workers
        assert time.monotonic() < deadline, workers
        await asyncio.sleep(0.1)  # the pace of asking, not a wait for the event


async def _wait_for_live(served: ServerProcess, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Ask /api/live until ``predicate`` holds of its report (it samples every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        report: dict[str, Any] = await admin(served.url, served.admin_key, "GET", "/api/live")
        if predicate(report):
            return report
        assert time.monotonic() < deadline, report
        await asyncio.sleep(0.2)  # the pace of asking, not a wait for the event


def _holding(workers: list[dict[str, Any]], consultation: str) -> list[dict[str, Any]]:
    return [w for w in workers if consultation in w["consultations"]]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def _participant(served: ServerProcess, room: str, name: str) -> tuple[str, str]:
    minted = await admin(served.url, served.admin_key, "POST", f"/api/consultations/{room}/tokens",
                         {"name": name, "role": "clinician"})
    return str(minted["token"]), str(minted["participant_id"])


async def _metrics(served: ServerProcess) -> str:
    headers = {"Authorization": f"Bearer {served.admin_key}"}
    async with aiohttp.ClientSession(headers=headers) as http, http.get(f"{served.url}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_a_killed_worker_takes_only_its_consultation_whose_kit_comes_back_on_a_live_worker(
        tmp_path: Path) -> None:
    served = ServerProcess(tmp_path / "server", "--workers", "2")
    await asyncio.to_thread(served.start)
    watchers: list[KitWatcher] = []
    try:
        kit_id, credential = await enrolled_kit(served.url, served.admin_key, tmp_path)
        home = (await admin(served.url, served.admin_key, "POST", "/api/consultations",
                            {"title": "Hemma", "scheduled_for": time.time()}))["id"]
        await admin(served.url, served.admin_key, "PUT", f"/api/consultations/{home}/kit", {"device_id": kit_id})
        other = (await admin(served.url, served.admin_key, "POST", "/api/consultations", {"title": "Annan"}))["id"]
        async with agent_running(kit_config(served.url, credential)):
            clinician = await KitWatcher.join(served.url, home, await served.token(home), kit_id)
            watchers.append(clinician)
            await clinician.wait_for(clinician.sees_kit, 20)
            # The other consultation: two people who see each other.
            (token_a, id_a), (token_b, id_b) = [await _participant(served, other, n) for n in ("A", "B")]
            a = await KitWatcher.join(served.url, other, token_a, id_b)
            b = await KitWatcher.join(served.url, other, token_b, id_a)
            watchers += [a, b]
            await b.wait_for(lambda: len(b.video_at) >= 10, 20)

            # Spread: each consultation whole on one worker, the two on different workers.
            workers = await _wait_for_workers(served, lambda ws: sorted(w["participants"] for w in ws) == [2, 2])
            (home_worker,), (other_worker,) = _holding(workers, home), _holding(workers, other)
            assert home_worker["index"] != other_worker["index"]
            assert all(w["up"] for w in workers)
            # What the REST API and the IT staff page show is asked of the workers.
            shown = await admin(served.url, served.admin_key, "GET", f"/api/consultations/{other}")
            assert sorted(p["id"] for p in shown["participants"]) == sorted([id_a, id_b])
            live = await _wait_for_live(served, lambda report: len(report["consultations"]) == 2)
            assert {c["id"]: len(c["participants"]) for c in live["consultations"]} == {home: 2, other: 2}
            # ... and each worker's load, as the page shows it (two calls of two are far from saturating one)
            assert [(w["index"], w["up"], w["participants"], w["saturated"]) for w in live["workers"]] == [
                (0, True, 2, False), (1, True, 2, False)]
            assert all(0.0 <= w["cpu_share"] < 0.7 for w in live["workers"])

            os.kill(home_worker["pid"], signal.SIGKILL)
            killed = time.monotonic()

            # The clinician is told why and must join again (as the browser does by itself).
            await clinician.client.wait_for(lambda: clinician.client.ended, 10)
            assert [e["code"] for e in clinician.client.errors] == ["media_worker_lost"]
            clinician = await KitWatcher.join(served.url, home, await served.token(home), kit_id)
            watchers.append(clinician)
            # The kit comes back by itself; its video reaches the clinician again.
            await clinician.wait_for(lambda: clinician.kit_video_after(killed) is not None, 25)

            workers = await _wait_for_workers(
                served, lambda ws: all(w["up"] for w in ws) and len(_holding(ws, home)) == 1
                and _holding(ws, home)[0]["consultations"][home] == 2)
            (now_home,) = _holding(workers, home)
            assert now_home["pid"] != home_worker["pid"] and not _alive(home_worker["pid"])
            assert [w["restarts"] for w in workers if w["index"] == home_worker["index"]] == [1]

            # The other consultation went on untouched, on the same worker process, its video not held up.
            (still_other,) = _holding(workers, other)
            assert still_other["pid"] == other_worker["pid"] and still_other["consultations"][other] == 2
            assert not a.client.ended and not b.client.ended and not a.client.errors and not b.client.errors
            await b.wait_for(lambda: b.video_at[-1] > killed + 2.0, 10)
            around = [t for t in b.video_at if killed - 2 < t]
            assert max(later - earlier for earlier, later in zip(around, around[1:], strict=False)) < 1.5

            text = await _metrics(served)
            assert f'nara_media_worker_restarts_total{{worker="{home_worker["index"]}"}} 1.0' in text
            assert 'nara_media_worker_up{worker="0"} 1.0' in text and 'nara_media_worker_up{worker="1"} 1.0' in text
            # Every participant's figures, asked of the workers.
            info = [line for line in text.splitlines() if line.startswith("nara_participant_info{")]
            assert any(f'consultation="{other}"' in line and f'participant="{id_a}"' in line for line in info)
            assert sum(f'consultation="{home}"' in line for line in info) == 2
            # How long each worker held the copies it forwarded, counted in the worker since it started: the
            # untouched one forwarded a's video to b all along (the new one's kit video reaches the clinician
            # on a layer it makes, which is not a forwarded copy).
            copies = {s.labels["worker"]: s.value for f in text_string_to_metric_families(text)
                      if f.name == "nara_forwarding_delay_seconds" for s in f.samples if s.name.endswith("_count")}
            assert set(copies) == {"0", "1"} and copies[str(other_worker["index"])] > 100
    finally:
        for watcher in watchers:
            await watcher.close()
        if served.process is not None:
            served.process.terminate()
            await asyncio.to_thread(served.process.wait, 20)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_no_worker_outlives_its_server(tmp_path: Path, how: str) -> None:
    served = ServerProcess(tmp_path / "server", "--workers", "2")
    await asyncio.to_thread(served.start)
    assert served.process is not None
    try:
        pids = [w["pid"] for w in await _workers(served)]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        async with aiohttp.ClientSession() as http, http.get(f"{served.url}/health/ready") as response:
            assert response.status == 200
        served.process.send_signal(getattr(signal, how))  # SIGTERM drains (nobody is in a call) and exits
        await asyncio.to_thread(served.process.wait, 20)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, [pid for pid in pids if _alive(pid)]
            await asyncio.sleep(0.05)  # the pace of looking, not a wait for the event
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


async def test_the_browsers_of_a_consultation_whose_worker_died_rejoin_by_themselves(
        tmp_path: Path, browser: Any) -> None:  # noqa: F811 - the fixture
    low = free_udp_range(4)  # two workers, two ports each: one call of two on either
    # This process signals; two worker processes carry the media, each in its own half of the range.
    server, runner = await start_server(tmp_path, media_workers=2, media_port_min=low, media_port_max=low + 3)
    try:
        pool = server.hub.media
        assert isinstance(pool, WorkerPool)
        room = server.consultation()
        doctor = await join_call(browser, server, room, "Dr Berg", "clinician", "doctor")
        relative = await join_call(browser, server, room, "Anna", "relative", "anna")
        await rising(doctor, "anna", "framesDecoded", 20)
        (holding,) = [w for w in pool.describe() if room in w["consultations"]]
        assert sorted(w["port_range"] for w in pool.describe()) == [[low, low + 1], [low + 2, low + 3]]
        for page in (doctor, relative):
            assert await server_ports(page) <= set(range(holding["port_range"][0], holding["port_range"][1] + 1))
        os.kill(holding["pid"], signal.SIGKILL)
        for page in (doctor, relative):
            await page.wait_for_function("() => naraDebug.stateLog.includes('reconnecting')")
        for page, other in ((doctor, "anna"), (relative, "doctor")):
            await page.wait_for_function("() => naraDebug.call.state === 'connected'", timeout=20000)
            await rising(page, other, "framesDecoded", 30)
        (now,) = [w for w in pool.describe() if room in w["consultations"]]
        assert now["pid"] != holding["pid"] and now["consultations"][room] == 2
        for page in (doctor, relative):
            assert await server_ports(page) <= set(range(now["port_range"][0], now["port_range"][1] + 1))
    finally:
        await runner.cleanup()


async def test_while_no_worker_is_up_the_server_is_not_ready_and_a_join_is_told_to_come_back(tmp_path: Path) -> None:
    server, runner = await start_server(tmp_path, media_workers=1)
    try:
        pool = server.hub.media
        assert isinstance(pool, WorkerPool)
        room = server.consultation()
        (worker,) = pool.describe()
        os.kill(worker["pid"], signal.SIGKILL)
        await pool.wait_until(lambda: pool.ready() is not None, 10)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/health/ready") as response:
                assert response.status == 503
                assert (await response.json())["reasons"] == ["media: none of 1 worker(s) is up"]
            client = ConsultationClient(server.url, room, server.token(room))
            with pytest.raises(JoinRefused) as refused:
                await client.join()
            assert refused.value.code == "media_unavailable"
            await client.close()
            await pool.wait_until(lambda: pool.ready() is None, 20)  # a new worker took its place
            async with http.get(f"{server.url}/health/ready") as response:
                assert response.status == 200
        assert [w["restarts"] for w in pool.describe()] == [1]
    finally:
        await runner.cleanup()


# --- a worker that stops answering, and one that cannot be started ----------------------------


async def test_a_worker_that_stops_answering_is_killed_and_replaced_and_its_participant_told() -> None:
    from mediaserver.peer import ParticipantInfo
    from mediaserver.pool import WORKER_LOST, WorkerSettings

    pool = WorkerPool(1, WorkerSettings(addresses=["127.0.0.1"]), stuck_after=3.0)  # (it reports every 2 s)
    await pool.start()
    stopped: int | None = None
    try:
        failures: list[str] = []
        told = asyncio.Event()

        async def on_failed(peer: Any, code: str) -> None:
            failures.append(code)
            told.set()

        async def signal_(message: dict[str, Any]) -> None:
            pass

        await pool.join("room-1", ParticipantInfo("p1", "Åsa", "clinician", True), signal_, on_failed)
        (worker,) = pool.describe()
        stopped = int(worker["pid"])
        os.kill(stopped, signal.SIGSTOP)  # its loop answers nothing, as a worker stuck in a loop
        await asyncio.wait_for(told.wait(), 10)
        assert failures == [WORKER_LOST]
        assert not _alive(stopped)
        await pool.wait_until(lambda: pool.ready() is None, 20)
        (replaced,) = pool.describe()
        assert replaced["pid"] != stopped and replaced["restarts"] == 1
    finally:
        if stopped is not None and _alive(stopped):
            os.kill(stopped, signal.SIGKILL)
        await pool.close()


async def test_a_worker_behind_gets_no_new_consultation_while_another_has_room_and_shows_as_saturated() -> None:
    from mediaserver.peer import ParticipantInfo
    from mediaserver.pool import WorkerSettings
    from signalling.metrics import NaraCollector

    pool = WorkerPool(2, WorkerSettings(addresses=["127.0.0.1"]))
    await pool.start()
    try:
        await pool.wait_until(lambda: pool.ready() is None and all(w["up"] for w in pool.describe()), 20)

        async def ignore(*_: Any) -> None:
            pass

        def saturated() -> dict[str, float]:
            families = {f.name: f for f in NaraCollector._workers(pool)}
            return {s.labels["worker"]: s.value for s in families["nara_media_worker_saturated"].samples}

        # worker 0 reports its loop 30 ms behind (the load event each worker sends every 2 s; told again before
        # each join, as its own report, with its loop idle, may come in between)
        busy = pool.workers[0]
        assert busy is not None
        behind = {"event": "load", "rooms": 0, "participants": 0, "loop_lag": 0.03}
        pool._dispatch(busy, behind)
        assert saturated() == {"0": 1, "1": 0}
        assert [w["saturated"] for w in pool.describe()] == [True, False]
        for n in range(3):  # every new consultation goes to worker 1, however many it already has
            pool._dispatch(busy, behind)
            await pool.join(f"room-{n}", ParticipantInfo(f"p{n}", "Åsa", "clinician", True), ignore, ignore)
        assert [sorted(w["consultations"]) for w in pool.describe()] == [[], ["room-0", "room-1", "room-2"]]
        # caught up: it takes the next one (it has fewer participants)
        pool._dispatch(busy, {"event": "load", "rooms": 0, "participants": 0, "loop_lag": 0.0})
        await pool.join("room-3", ParticipantInfo("p3", "Åsa", "clinician", True), ignore, ignore)
        assert sorted(pool.describe()[0]["consultations"]) == ["room-3"]
        assert saturated() == {"0": 0, "1": 0}
    finally:
        await pool.close()


async def test_a_worker_that_cannot_start_is_tried_again_later_and_later_and_joins_are_told_so() -> None:
    import sys

    from mediaserver.peer import ParticipantInfo
    from mediaserver.pool import WorkerSettings

    started = time.monotonic()
    pool = WorkerPool(1, WorkerSettings(), command=(sys.executable, "-c", "raise SystemExit(3)"))
    await pool.start()
    try:
        assert pool.ready() == "media: none of 1 worker(s) is up"

        async def ignore(*_: Any) -> None:
            pass

        with pytest.raises(CodedError) as refused:
            await pool.join("room-1", ParticipantInfo("p1", "Åsa", "clinician", True), ignore, ignore)
        assert refused.value.code == "media_unavailable"
        # tried again after 0.5 s, then 1 s: not in a loop
        await pool.wait_until(lambda: pool.restarts[0] >= 2, 10)
        assert time.monotonic() - started >= 1.5
        assert pool.restarts[0] <= 3 and pool.deaths_in_a_row[0] >= 2 and pool.ready() is not None
    finally:
        await pool.close()
