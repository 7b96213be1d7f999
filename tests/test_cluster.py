"""Scale-out on Redis: a real redis-server and two `nara serve` nodes sharing it (docs/scale-out.md)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from bench.process import PROJECT, free_port
from bench.synthetic import StampedVideoTrack, ToneAudioTrack
from signalling.client import ConsultationClient, JoinRefused
from signalling.cluster import ClusterError, ClusterNode, ClusterSettings, NodeRecord, RedisHealth, placement_order
from signalling.store import ConsultationStore

from .conftest import in_ci
from .media_helpers import TONES, Watcher, receiving_from

LOAD_INTERVAL = 0.3


# --- decisions ------------------------------------------------------------------


def node(node_id: str, load: int, draining: bool = False) -> NodeRecord:
    return NodeRecord(node_id, f"http://{node_id}", load, draining)


@pytest.mark.parametrize(("nodes", "order"), [
    ([], []),
    ([node("a", 3), node("b", 1)], ["b", "a"]),
    ([node("b", 2), node("a", 2)], ["a", "b"]),  # a tie goes to the same node every time
    ([node("a", 0, draining=True), node("b", 9)], ["b"]),
    ([node("a", 0, draining=True)], []),
])
def test_new_consultations_go_to_the_least_loaded_node_that_is_not_draining(
    nodes: list[NodeRecord], order: list[str]
) -> None:
    assert [n.id for n in placement_order(nodes)] == order


def test_redis_loss_is_logged_once_then_once_a_minute_and_its_return_noticed() -> None:
    health = RedisHealth()
    assert health.succeeded() is False  # first contact: not a return
    assert health.failed(100.0) == "unreachable"
    assert [health.failed(100.0 + t) for t in (1, 30, 59)] == [None, None, None]
    assert health.failed(160.0) == "still unreachable after 60 s"
    assert health.failed(161.0) is None
    assert health.succeeded() is True
    assert health.failed(200.0) == "unreachable"


# --- the Python client follows a redirect once ----------------------------------------


@pytest.fixture
async def redirecting_server() -> AsyncIterator[str]:
    """A server whose every join is sent to itself: a client must not follow that round forever."""
    joins = 0

    async def ws(request: web.Request) -> web.WebSocketResponse:
        nonlocal joins
        response = web.WebSocketResponse()
        await response.prepare(request)
        await response.receive()
        joins += 1
        await response.send_json({"type": "redirect", "code": "consultation_elsewhere", "url": url,
                                  "node": "x", "message": "elsewhere"})
        await response.close(code=4307)
        return response

    app = web.Application()
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    yield url
    assert joins == 2, "the client joins where it was sent once, and stops at the second redirect"
    await runner.cleanup()


async def test_a_second_redirect_is_refused_not_followed(redirecting_server: str) -> None:
    client = ConsultationClient(redirecting_server, "room", "token")
    with pytest.raises(JoinRefused) as refused:
        await client.join(timeout=5)
    assert refused.value.code == "redirect_loop"
    await client.close()


# --- real processes: redis-server and two nodes ------------------------------------------


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is missing: .ci/run installs it")
            pytest.skip("redis-server is not installed here")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_line(self.process, "Ready to accept connections", 10)
        except RuntimeError:
            self.stop()
            raise
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # never a full pipe

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class Node:
    """A `nara serve` process that is one node of the cluster."""

    def __init__(self, name: str, tmp_path: Path, redis_url: str, secret: str, admin_key: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp_path / name
        self.data_dir.mkdir(mode=0o700)
        for file, value in (("token-secret", secret), ("admin-key", admin_key)):  # the same on every node
            (self.data_dir / file).write_text(value)
            (self.data_dir / file).chmod(0o600)
        self.admin_key = admin_key
        self.log = tmp_path / f"{name}.log"
        self.env = {**os.environ, "PYTHONPATH": str(PROJECT), "NARA_CLUSTER_REDIS_URL": redis_url,
                    "NARA_CLUSTER_NODE_ID": name, "NARA_CLUSTER_LOAD_INTERVAL": str(LOAD_INTERVAL)}
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nara.cli", "serve", "--port", str(self.port), "--data-dir",
                 str(self.data_dir), "--no-demo", "--adaptation", "off"],
                env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)

    def wait_started(self) -> None:
        assert self.process is not None
        wait_for_line(self.process, "listening on", 30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.admin_key}"}) as http:
            async with http.request(method, f"{self.url}{path}", json=body, allow_redirects=False) as response:
                data = await response.json(content_type=None) if response.content_type == "application/json" else None
                return response.status, data

    async def create(self, title: str = "Konsultation") -> tuple[int, Any]:
        return await self.request("POST", "/api/consultations", {"title": title})

    async def held(self) -> set[str]:
        status, data = await self.request("GET", "/api/consultations")
        assert status == 200, data
        return {c["id"] for c in data["consultations"]}

    async def token(self, room: str, name: str, participant_id: str) -> dict[str, Any]:
        status, data = await self.request("POST", f"/api/consultations/{room}/tokens",
                                          {"name": name, "role": "clinician", "participant_id": participant_id})
        assert status == 201, data
        return dict(data)


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float) -> None:
    """Read the process's output until a line holds ``text``, for at most ``timeout`` seconds."""
    assert process.stdout is not None
    stdout = process.stdout
    found = threading.Event()

    def scan() -> None:
        for line in stdout:
            if text in line:
                found.set()
                return

    threading.Thread(target=scan, daemon=True).start()
    if not found.wait(timeout):
        raise RuntimeError(f"no {text!r} within {timeout} s")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Wait until ``check()`` holds, asking every 0.1 s, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)  # polling interval of a bounded wait


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, Node, Node]]:
    redis = RedisServer(tmp_path)
    redis.start()
    secret, admin_key = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    nodes = [Node(name, tmp_path, redis.url, secret, admin_key) for name in ("node-a", "node-b")]
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_started()
        yield redis, nodes[0], nodes[1]
    finally:
        for n in nodes:
            n.stop()
        redis.stop()


async def test_a_placement_is_stored_and_registered_both_or_neither(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    store = ConsultationStore(tmp_path / "nara.sqlite3")
    node = ClusterNode(ClusterSettings(redis.url, "node-a", "http://127.0.0.1:1"), store, lambda: 0)
    fields = {"title": "Hembesök", "scheduled_for": None, "patient_ref": None}
    try:
        first = await node.create_here("abc123", fields)
        again = await node.create_here("abc123", fields)  # the same placement, its answer lost
        assert again == first and [c.id for c in store.list()] == ["abc123"]
        assert await node.registry.owner("abc123") == "node-a"
        redis.stop()
        with pytest.raises(ClusterError) as refused:
            await node.create_here("def456", fields)
        assert (refused.value.status, refused.value.code) == (503, "cluster_unavailable")
        assert store.get("def456") is None, "not stored when it could not be registered"
    finally:
        await node.stop()
        store.close()
        redis.stop()


async def test_two_nodes_with_one_node_id_are_told_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    stores = [ConsultationStore(tmp_path / f"{n}.sqlite3") for n in (1, 2)]
    twins = [ClusterNode(ClusterSettings(redis.url, "nara-1", f"http://127.0.0.{n}:8080"), store, lambda: 0)
             for n, store in zip((1, 2), stores, strict=True)]
    try:
        for _ in range(3):
            for twin in twins:
                await twin.report()
        said = [r.getMessage() for r in caplog.records if "also calls itself" in r.getMessage()]
        assert said == [f"cluster: another node at http://127.0.0.{n}:8080 also calls itself nara-1; give each node "
                        "its own node_id" for n in (1, 2)], "each twin says it once"
    finally:
        for twin, store in zip(twins, stores, strict=True):
            await twin.stop()
            store.close()
        redis.stop()


async def join(node: Node, room: str, tag: int) -> tuple[ConsultationClient, Watcher]:
    token = await node.token(room, f"P{tag}", f"p{tag}")
    client = ConsultationClient(node.url, room, token["token"], video=StampedVideoTrack(tag, 320, 240, 15),
                                audio=ToneAudioTrack(TONES[tag]))
    await client.join()
    return client, Watcher(client)


async def test_two_nodes_share_placement_redirect_joins_and_outlive_redis(
    cluster: tuple[RedisServer, Node, Node],
) -> None:
    redis, a, b = cluster

    registry = aioredis.Redis.from_url(redis.url)

    async def both_registered() -> bool:
        return bool(await registry.exists("nara:node:node-a", "nara:node:node-b") == 2)
    await eventually(both_registered, 10, "both nodes registered")
    await registry.aclose()

    # Created through A, consultations spread over both nodes.
    placed = {}
    for n in range(6):
        status, data = await a.create(f"Konsultation {n}")
        assert status == 201, data
        placed[data["id"]] = data["node"]
    held_a, held_b = await a.held(), await b.held()
    assert {c for c, owner in placed.items() if owner == "node-a"} <= held_a
    assert {c for c, owner in placed.items() if owner == "node-b"} <= held_b
    assert not held_a & held_b, "a consultation lives on one node"
    assert len(set(placed) & held_a) == len(set(placed) & held_b) == 3, f"spread evenly: {placed}"

    # Two participants join a consultation of B's through A: both land on B and see and hear each other.
    room = next(c for c, owner in placed.items() if owner == "node-b")
    status, _ = await a.request("GET", f"/c/{room}")
    assert status == 307
    clients: list[tuple[ConsultationClient, Watcher]] = []
    try:
        for tag in (1, 2):
            clients.append(await join(a, room, tag))
        for (client, watcher), other in zip(clients, ("p2", "p1"), strict=True):
            assert client.base_url == b.url, "the join was redirected to the owner"
            await receiving_from(client, {other})
            watcher.follow()
        for (_, watcher), other in zip(clients, (2, 1), strict=True):
            await watcher.wait_for(lambda w=watcher, o=other: len(w.frames[o]) >= 20)

        # B drains: new consultations all go to A, and the call on B goes on.
        status, data = await b.request("POST", "/admin/drain")
        assert status == 200, data
        for n in range(3):
            status, data = await (a, b)[n % 2].create(f"Efter {n}")  # through either
            assert (status, data["node"]) == (201, "node-a"), data
        assert not {data["id"]} & await b.held()

        # Redis hangs (stopped, its connections open): a creation is refused within the Redis timeout.
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        status, data = await a.create()
        assert (status, data["error"]["code"]) == (503, "cluster_unavailable")
        assert time.monotonic() - started < 2.5, "a hung Redis holds a request for one Redis timeout at most"
        redis.process.send_signal(signal.SIGCONT)

        # Redis goes away: both nodes stay up and say why they are not ready; creating is refused
        # clearly; the call on B goes on.
        redis.stop()
        async def refused() -> bool:
            return (await a.create())[0] == 503
        await eventually(refused, 10, "creation refused without Redis")
        status, data = await a.create()
        assert (status, data["error"]["code"]) == (503, "cluster_unavailable")
        status, data = await a.request("GET", "/health/ready")
        assert (status, data["reasons"]) == (503, ["redis_unreachable"])
        watcher = clients[0][1]
        before = len(watcher.frames[2])
        await watcher.wait_for(lambda: len(watcher.frames[2]) >= before + 30, timeout=15)
        assert a.process is not None and a.process.poll() is None
        assert b.process is not None and b.process.poll() is None

        # Redis is back (empty): the nodes register again with what they hold, and creation works.
        redis.start()
        async def created() -> bool:
            return (await a.create())[0] == 201
        await eventually(created, 10, "creation works again once Redis is back")

        async def found_again() -> bool:  # through A: B has registered what it holds again
            status, data = await a.request("POST", f"/api/consultations/{room}/tokens", {"name": "X", "role": "nurse"})
            return status == 201 and str(data["join_url"]).startswith(f"{b.url}/c/{room}#token=")
        await eventually(found_again, 10, "B's consultation found through A again")
    finally:
        for client, watcher in clients:
            await watcher.stop()
            await client.close()
    log = a.log.read_text()
    assert log.count("Traceback") == 0, "no traceback storm"
    assert "is unreachable" in log


# --- the browser client ------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
# A page the test hands the browser itself (route.fulfill) counts as coming from no address, so Chromium's
# local network access checks would keep it from loopback; a page a node serves is not affected.
CHROMIUM_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--allow-loopback-in-peer-connection", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-features=LocalNetworkAccessChecks"]
INDEX_HTML = PROJECT / "signalling" / "static" / "index.html"


async def test_the_browser_follows_the_page_and_the_join_to_the_owner(
    cluster: tuple[RedisServer, Node, Node],
) -> None:
    if not HAVE_CHROMIUM:
        if in_ci():
            pytest.fail("Chromium is required in CI: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed here")
    from playwright.async_api import async_playwright

    _, a, b = cluster
    placed = [(await a.create("Hemsjukvård Pajala"))[1] for _ in range(2)]  # one on each node
    room = next(c["id"] for c in placed if c.get("node") == "node-b")
    doctor, relative = await a.token(room, "Dr Berg", "doctor"), await a.token(room, "Anna", "anna")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # The page asked of A answers 307 to B, and the token in the fragment comes along.
            first = await (await browser.new_context()).new_page()
            await first.goto(f"{a.url}/c/{room}#token={doctor['token']}")
            assert first.url.startswith(f"{b.url}/c/{room}")
            # A page that A served itself (as when the registry could not be asked): the link check
            # is answered by B, and the call's join is redirected there.
            second = await (await browser.new_context()).new_page()
            await second.route(f"{a.url}/c/{room}", lambda route: route.fulfill(
                path=INDEX_HTML, content_type="text/html"))
            await second.goto(f"{a.url}/c/{room}#token={relative['token']}")
            assert second.url.startswith(f"{a.url}/c/{room}")
            for page in (first, second):
                await page.click("#join-button")
                await page.wait_for_function("() => naraDebug.call?.state === 'connected'", timeout=20000)
            assert await second.evaluate("() => naraDebug.call.server") == b.url
            for page, other in ((first, "anna"), (second, "doctor")):
                await page.wait_for_function(
                    "(id) => (naraDebug.stats.participants.get(id)?.framesDecoded ?? 0) > 20", arg=other,
                    timeout=20000)
        finally:
            await browser.close()


# --- home kits: placement follows the kit ---------------------------------------------------


async def test_a_consultation_for_a_kit_is_placed_on_the_kits_node_and_a_mismatch_is_refused(
    cluster: tuple[RedisServer, Node, Node],
) -> None:
    redis, a, b = cluster
    registry = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        async def both_registered() -> bool:
            return bool(await registry.exists("nara:node:node-a", "nara:node:node-b") == 2)
        await eventually(both_registered, 10, "both nodes registered")

        # Two kits are created on B; the registry says where they live.
        kits = []
        for name in ("Kit 7", "Kit 8"):
            status, data = await b.request("POST", "/api/devices", {"name": name})
            assert status == 201, data
            kits.append(data["device_id"])
        kit, other_kit = kits
        assert await registry.get(f"nara:device:{kit}") == "node-b"

        # Created through A with the kit: placed on B, the kit assigned there (a kit joins only its own node).
        for _ in range(3):  # whatever the load says
            status, data = await a.request("POST", "/api/consultations", {"title": "Hembesök", "device_id": kit})
            assert status == 201, data
            assert data["node"] == "node-b" and data["kit"]["device_id"] == kit, data
        room_b = data["id"]
        assert room_b in await b.held()
        status, data = await b.request("GET", f"/api/consultations/{room_b}/kit")
        assert (status, data["kit"]["device_id"]) == (200, kit)

        # A consultation on A cannot take B's kit, through either node: a clear code naming the nodes.
        room_a = None
        for _ in range(6):
            status, data = await a.create("Utan kit")
            if data["node"] == "node-a":
                room_a = data["id"]
                break
        assert room_a is not None, "A took none of six consultations"
        for via in (a, b):
            status, data = await via.request("PUT", f"/api/consultations/{room_a}/kit", {"device_id": kit})
            assert (status, data["error"]["code"]) == (409, "kit_on_other_node"), data
            assert "node-b" in data["error"]["message"] and "node-a" in data["error"]["message"]
        status, data = await a.request("GET", f"/api/consultations/{room_a}/kit")
        assert (status, data["kit"]) == (200, None), "nothing was assigned"

        # Kit and consultation both on B, asked through A: sent on to B and done there.
        status, data = await a.request("PUT", f"/api/consultations/{room_b}/kit", {"device_id": other_kit})
        assert (status, data["kit"]["device_id"]) == (200, other_kit), data

        # Redis restarted empty: B registers its kits again within a load interval or two.
        await registry.flushall()

        async def kit_registered_again() -> bool:
            return bool(await registry.get(f"nara:device:{kit}") == "node-b")
        await eventually(kit_registered_again, 10, "the kit registered again")

        # A revoked kit leaves the registry: a consultation for it is refused, nothing created.
        status, _ = await b.request("POST", f"/api/devices/{other_kit}/revoke")
        assert status == 200
        assert await registry.get(f"nara:device:{other_kit}") is None
        held = await a.held() | await b.held()
        status, data = await a.request("POST", "/api/consultations", {"device_id": other_kit})
        assert (status, data["error"]["code"]) == (404, "device_unknown"), data
        assert await a.held() | await b.held() == held

        # The kit's node drains (a call there keeps it up): a consultation for the kit is refused with which
        # node and why; once it has left, the same with kit_node_unavailable.
        client, _ = await join(b, room_b, 1)
        status, _ = await b.request("POST", "/admin/drain")
        assert status == 200
        for via in (a, b):
            status, data = await via.request("POST", "/api/consultations", {"device_id": kit})
            assert (status, data["error"]["code"]) == (503, "kit_node_draining"), data
            assert "node-b" in data["error"]["message"]
        await client.close()
        b.stop()
        status, data = await a.request("POST", "/api/consultations", {"device_id": kit})
        assert (status, data["error"]["code"]) == (503, "kit_node_unavailable"), data
        assert "node-b" in data["error"]["message"]
    finally:
        await registry.aclose()
