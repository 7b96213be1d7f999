"""Scale-out: several ``nara serve`` nodes that share a registry in Redis (docs/scale-out.md).

A consultation lives on one node, in that node's SQLite. Redis holds only an
index that the nodes can rebuild: which node owns which consultation, and one
record per node (its URL, its load, whether it is draining) that expires unless
the node renews it every ``load_interval`` seconds. A new consultation goes to
the least-loaded live node that is not draining; a join that reaches another
node is sent to the owner. Media never waits on Redis: a node that loses it
keeps its calls going and only refuses what needs the registry.

Nothing here runs unless a Redis URL is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import ServerConfig
from .ops import DRAIN_STATE, READINESS_CHECKS
from .rest import ApiError, consultation_json, json_body, requested_device, validated_consultation
from .store import Consultation, ConsultationStore, new_id
from .ws import HUB, SignallingHub

logger = logging.getLogger(__name__)

KEY_PREFIX = "nara:"
NODE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
CONSULTATION_ID = re.compile(r"^[a-z0-9]{1,64}$")
FORWARD_TIMEOUT = 10.0  # seconds a placement waits for the chosen node
REDIS_TIMEOUT = 1.0  # seconds for one Redis call: a lost Redis must not hold a request long
STOP_TIMEOUT = 3.0  # seconds leaving the cluster may take at shutdown
STILL_DOWN_LOG_EVERY = 60.0  # seconds between log lines while Redis stays unreachable


class ClusterError(ApiError):
    """A refusal that comes from the cluster: the registry or another node."""


def cluster_unavailable() -> ClusterError:
    return ClusterError(503, "cluster_unavailable",
                        "The cluster's registry (Redis) cannot be reached; try again shortly.")


# --- settings -----------------------------------------------------------------


class ClusterSettingsError(ValueError):
    """A cluster setting is missing or malformed; the message says which and how to fix it."""


@dataclass(frozen=True)
class ClusterSettings:
    redis_url: str
    node_id: str
    node_url: str  # how participants and the other nodes reach this node
    load_interval: float = 2.0  # seconds between load reports

    @property
    def node_ttl(self) -> float:
        """Seconds a node's record lives without renewal: three missed reports and it drops out."""
        return max(3 * self.load_interval, 2.0)

    @property
    def redis_display(self) -> str:
        """Where Redis is, for log lines: never its password."""
        parts = urlsplit(self.redis_url)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"

    def check(self) -> ClusterSettings:
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ClusterSettingsError("cluster redis_url must start with redis://, rediss:// or unix://.")
        if not NODE_ID.match(self.node_id):
            raise ClusterSettingsError("cluster node_id must be 1 to 64 letters, digits, '.', ':', '-' or '_'.")
        url = urlsplit(self.node_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ClusterSettingsError("cluster node_url must be this node's http:// or https:// address.")
        if not 0.1 <= self.load_interval <= 60:
            raise ClusterSettingsError("cluster load_interval must be from 0.1 to 60 seconds.")
        return self


def settings_from_config(config: ServerConfig) -> ClusterSettings | None:
    """The ``[cluster]`` settings; None (one process, no Redis: the default) without a Redis URL."""
    if not config.cluster_redis_url:
        return None
    return ClusterSettings(
        redis_url=config.cluster_redis_url,
        node_id=config.cluster_node_id,
        node_url=(config.cluster_node_url or config.base_url).rstrip("/"),
        load_interval=config.cluster_load_interval,
    ).check()


# --- decisions ----------------------------------------------------------------


@dataclass(frozen=True)
class NodeRecord:
    """What a node publishes about itself."""

    id: str
    url: str
    load: int
    draining: bool

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "url": self.url, "load": self.load, "draining": self.draining})

    @classmethod
    def from_json(cls, raw: str | bytes) -> NodeRecord | None:
        """A record as stored, or None when it is not one (written by something else)."""
        try:
            data = json.loads(raw)
            record = cls(str(data["id"]), str(data["url"]), int(data["load"]), bool(data["draining"]))
        except (ValueError, KeyError, TypeError):
            return None
        return record


def placement_order(nodes: list[NodeRecord]) -> list[NodeRecord]:
    """The nodes a new consultation may go to, best first: not draining, least load, then by id."""
    return sorted((n for n in nodes if not n.draining), key=lambda n: (n.load, n.id))


def node_load(open_consultations: int, participants: int) -> int:
    """A node's load: the consultations it holds open plus the participants connected to it now."""
    return open_consultations + participants


@dataclass
class RedisHealth:
    """Whether Redis answered last time, and when to say so in the log (one line, not a storm)."""

    reachable: bool | None = None  # None: not tried yet
    down_since: float | None = None
    last_logged: float = 0.0

    def failed(self, now: float) -> str | None:
        """Note a failure; the log line to write now, if any."""
        was = self.reachable
        self.reachable = False
        if was is not False:
            self.down_since = self.last_logged = now
            return "unreachable"
        if now - self.last_logged >= STILL_DOWN_LOG_EVERY:
            self.last_logged = now
            return f"still unreachable after {now - (self.down_since or now):.0f} s"
        return None

    def succeeded(self) -> bool:
        """Note a success; True when Redis has come back after a failure."""
        came_back = self.reachable is False
        self.reachable = True
        self.down_since = None
        return came_back


# --- the registry in Redis ------------------------------------------------------


class Registry:
    """The keys in Redis: ``nara:node:<id>`` (expiring), ``nara:nodes``, ``nara:consultation:<id>`` and
    ``nara:device:<id>`` (the node a home kit is enrolled on)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    @staticmethod
    def node_key(node_id: str) -> str:
        return f"{KEY_PREFIX}node:{node_id}"

    @staticmethod
    def consultation_key(consultation_id: str) -> str:
        return f"{KEY_PREFIX}consultation:{consultation_id}"

    @staticmethod
    def device_key(device_id: str) -> str:
        return f"{KEY_PREFIX}device:{device_id}"

    async def publish(self, record: NodeRecord, ttl: float) -> NodeRecord | None:
        """Renew this node's record; the one it replaced, None when that had expired or was lost
        (first start, Redis restarted or emptied)."""
        previous = await self.redis.set(self.node_key(record.id), record.to_json(), px=int(ttl * 1000), get=True)
        await self.redis.sadd(f"{KEY_PREFIX}nodes", record.id)
        return NodeRecord.from_json(previous) if isinstance(previous, (str, bytes)) else None

    async def withdraw(self, node_id: str) -> None:
        await self.redis.delete(self.node_key(node_id))
        await self.redis.srem(f"{KEY_PREFIX}nodes", node_id)

    async def nodes(self) -> list[NodeRecord]:
        """Every live node (whose record has not expired)."""
        ids = sorted(_text(i) for i in await self.redis.smembers(f"{KEY_PREFIX}nodes"))
        if not ids:
            return []
        raws = await self.redis.mget([self.node_key(i) for i in ids])
        return [r for r in (NodeRecord.from_json(raw) for raw in raws if raw is not None) if r is not None]

    async def node(self, node_id: str) -> NodeRecord | None:
        raw = await self.redis.get(self.node_key(node_id))
        return NodeRecord.from_json(raw) if raw is not None else None

    async def claim(self, consultation_id: str, node_id: str) -> bool:
        """Record the owner of a new consultation; False when another node already owns that id."""
        if await self.redis.set(self.consultation_key(consultation_id), node_id, nx=True):
            return True
        return await self.owner(consultation_id) == node_id

    async def release(self, consultation_id: str) -> None:
        await self.redis.delete(self.consultation_key(consultation_id))

    async def restore(self, consultation_ids: list[str], node_id: str, device_ids: Sequence[str] = ()) -> None:
        """Register again the consultations and home kits this node holds (after Redis lost them)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for consultation_id in consultation_ids:
                pipe.set(self.consultation_key(consultation_id), node_id)
            for device_id in device_ids:
                pipe.set(self.device_key(device_id), node_id)
            await pipe.execute()

    async def register_device(self, device_id: str, node_id: str) -> None:
        await self.redis.set(self.device_key(device_id), node_id)

    async def forget_device(self, device_id: str) -> None:
        await self.redis.delete(self.device_key(device_id))

    async def device_node(self, device_id: str) -> str | None:
        """The node a home kit is enrolled on; None when no node holds it."""
        raw = await self.redis.get(self.device_key(device_id))
        return None if raw is None else _text(raw)

    async def owner(self, consultation_id: str) -> str | None:
        raw = await self.redis.get(self.consultation_key(consultation_id))
        return None if raw is None else _text(raw)


def _text(raw: str | bytes) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


# --- this node in the cluster -----------------------------------------------------


class ClusterNode:
    """This node's part: report its load, place new consultations, find the owner of others."""

    def __init__(self, settings: ClusterSettings, store: ConsultationStore,
                 participants: Callable[[], int], draining: Callable[[], bool] | None = None,
                 devices: Callable[[], list[str]] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.participants = participants
        self._draining = draining
        self._devices = devices or list  # the home kits this node holds (not revoked)
        # Set by devices.py where home kits are served: refuse a kit this node cannot assign, assign one.
        self.check_kit: Callable[[str], object] | None = None
        self.assign_kit: Callable[[str, str], None] | None = None
        self._devices_unregistered = False  # a kit's registration failed: register them all at the next report
        # One try per call, bounded: the next report tries again, and a request must not wait on retries.
        self.registry = Registry(aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0), health_check_interval=0))
        self.health = RedisHealth()
        self._http: aiohttp.ClientSession | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._twin_reported = False

    @property
    def id(self) -> str:
        return self.settings.node_id

    @property
    def draining(self) -> bool:
        return self._draining is not None and self._draining()

    def readiness(self) -> str | None:
        """Why this node is not ready for new work, or None when it is."""
        return None if self.health.reachable else "redis_unreachable"

    def record(self) -> NodeRecord:
        load = node_load(self.store.count_open(), self.participants())
        return NodeRecord(self.id, self.settings.node_url, load, self.draining)

    # --- life cycle ---

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT))
        await self.report()
        self._reporter = asyncio.ensure_future(self._report_every_interval())

    async def stop(self) -> None:
        # The reporter is asked to finish rather than cancelled: cancelled, it was seen to go on now and
        # then (the cancellation lost in a Redis call or the timeout around it), holding the exit for good.
        self._stopping = True
        self._wake.set()
        if self._reporter is not None:
            _, pending = await asyncio.wait([self._reporter], timeout=STOP_TIMEOUT)
            for task in pending:
                task.cancel()
        if self.health.reachable:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.registry.withdraw(self.id)
        await self.registry.redis.aclose()
        if self._http is not None:
            await self._http.close()

    def report_soon(self) -> None:
        """Publish the load now rather than at the next interval (after a change others should see)."""
        self._wake.set()

    async def _report_every_interval(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(self.settings.load_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if not self._stopping:
                await self.report()

    async def report(self) -> None:
        """Renew this node's record; after Redis lost it, register this node's consultations again."""
        try:
            previous = await self.registry.publish(self.record(), self.settings.node_ttl)
            lost = previous is None
            if lost:
                await self.registry.restore(self.store.open_ids(), self.id, self._devices())
            elif self._devices_unregistered:
                await self.registry.restore([], self.id, self._devices())
            self._devices_unregistered = False
        except (RedisError, OSError) as exc:
            self._lost_redis(exc)
            return
        if previous is not None and previous.url != self.settings.node_url and not self._twin_reported:
            self._twin_reported = True  # once: both nodes would say it every interval
            logger.error("cluster: another node at %s also calls itself %s; give each node its own node_id",
                         previous.url, self.id)
        if self.health.succeeded():
            logger.info("cluster: Redis at %s is reachable again; node %s and its consultations registered",
                        self.settings.redis_display, self.id)
        elif lost:
            logger.info("cluster: node %s registered at %s with its open consultations",
                        self.id, self.settings.redis_display)

    async def _redis(self, call: Awaitable[Any]) -> Any:
        """Await a Redis call for a request; a lost Redis is the request's ClusterError."""
        try:
            return await call
        except (RedisError, OSError) as exc:
            self._lost_redis(exc)
            raise cluster_unavailable() from None

    def _lost_redis(self, exc: Exception) -> None:
        if (line := self.health.failed(time.monotonic())) is not None:
            logger.warning("cluster: Redis at %s is %s (%s: %s); running calls go on, new consultations are "
                           "refused", self.settings.redis_display, line, type(exc).__name__, exc)

    # --- home kits ---

    async def register_device(self, device_id: str) -> None:
        """Record that a home kit lives on this node; without Redis now, at the next report that reaches it."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.registry.register_device(device_id, self.id)
        except (RedisError, OSError, TimeoutError) as exc:
            self._devices_unregistered = True
            self._lost_redis(exc)

    async def forget_device(self, device_id: str) -> None:
        """A revoked kit leaves the registry (a stale entry only leads to this node, which refuses it)."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.registry.forget_device(device_id)

    async def device_node(self, device_id: str) -> str | None:
        """The node a home kit lives on; None when no node holds it."""
        node_id: str | None = await self._redis(self.registry.device_node(device_id))
        return node_id

    async def kit_node(self, device_id: str) -> NodeRecord | None:
        """The node a new consultation for this kit must go to; None for this node."""
        node_id = await self.device_node(device_id)
        if node_id is None:
            raise ClusterError(404, "device_unknown", "There is no home kit with this device_id in the cluster.")
        if node_id == self.id:
            if self.draining:
                raise kit_node_draining(node_id)
            return None
        node: NodeRecord | None = await self._redis(self.registry.node(node_id))
        if node is None:
            raise kit_node_unavailable(node_id)
        if node.draining:
            raise kit_node_draining(node_id)
        return node

    # --- placement ---

    async def place(self, fields: dict[str, Any], authorization: str,
                    describe: Callable[[Consultation], dict[str, Any]], device_id: str | None = None) -> dict[str, Any]:
        """Create a consultation on the least-loaded node that will take it, or with a home kit on the kit's
        node, the kit assigned; its description."""
        if self.health.reachable is False:
            # Say so at once rather than wait for Redis on every request; the reporter notices its return.
            raise cluster_unavailable()
        if device_id is not None:
            return await self._place_with_kit(fields, authorization, describe, device_id)
        candidates = placement_order(await self._redis(self.registry.nodes()))
        if not candidates:
            raise ClusterError(503, "no_node_available",
                               "No server in the cluster takes new consultations now (all draining or down).")
        consultation_id = new_id()  # chosen here, so a retried request to one node cannot make two
        for node in candidates:
            if node.id == self.id:
                if self.draining:
                    continue
                return describe(await self.create_here(consultation_id, fields))
            answer = await self._forward(node, consultation_id, fields, authorization)
            if isinstance(answer, dict):
                return answer
        raise ClusterError(503, "no_node_available", "No server in the cluster took the new consultation.")

    async def _place_with_kit(self, fields: dict[str, Any], authorization: str,
                              describe: Callable[[Consultation], dict[str, Any]], device_id: str) -> dict[str, Any]:
        node = await self.kit_node(device_id)
        consultation_id = new_id()
        if node is None:
            return describe(await self.create_here(consultation_id, fields, device_id))
        answer = await self._forward(node, consultation_id, fields, authorization, device_id)
        if answer == "node_draining":  # it began draining since its last report
            raise kit_node_draining(node.id)
        if not isinstance(answer, dict):
            raise kit_node_unavailable(node.id)
        return answer

    async def _forward(self, node: NodeRecord, consultation_id: str, fields: dict[str, Any],
                       authorization: str, device_id: str | None = None) -> dict[str, Any] | str:
        """Create the consultation on ``node``; its description, or why not when another node may take it:
        ``node_draining`` (it declined) or ``node_unreachable`` (nothing reached it)."""
        assert self._http is not None
        url = f"{node.url}/api/cluster/consultations/{consultation_id}"
        body = fields if device_id is None else {**fields, "device_id": device_id}
        try:
            async with self._http.put(url, json=body, headers={"Authorization": authorization}) as response:
                body = await response.json(content_type=None)
                if response.status == 201 and isinstance(body, dict):
                    return dict(body)
                code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        except aiohttp.ClientConnectorError as exc:
            # Nothing reached the node: another may take the consultation.
            logger.warning("cluster: node %s at %s cannot be reached (%s); trying the next", node.id, node.url, exc)
            return "node_unreachable"
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # The node may have stored it before its answer was lost: never place the same request twice.
            logger.warning("cluster: node %s did not answer the placement of %s: %s", node.id, consultation_id,
                           type(exc).__name__)
            raise ClusterError(502, "node_unreachable",
                               f"The server chosen for the consultation ({node.id}) did not answer; it may "
                               f"or may not have created consultation {consultation_id}.") from None
        if code == "node_draining":
            return str(code)
        if code in ("admin_key_invalid", "admin_key_missing"):
            raise ClusterError(502, "cluster_misconfigured",
                               f"Node {node.id} refused this server's admin key: every node needs the same admin key.")
        logger.warning("cluster: node %s refused the placement (%s, %s)", node.id, response.status, code)
        raise ClusterError(502, "node_refused", f"The server chosen for the consultation ({node.id}) refused "
                                                f"it ({code or response.status}).")

    async def create_here(self, consultation_id: str, fields: dict[str, Any],
                          device_id: str | None = None) -> Consultation:
        """Store a consultation placed on this node and record it in Redis, both or neither; with
        ``device_id``, that home kit (held here) assigned to it."""
        if self.draining:
            raise ClusterError(503, "node_draining", "This server is draining and takes no new consultations.")
        if device_id is not None:
            if self.check_kit is None:
                raise ClusterError(404, "device_unknown", "This server serves no home kits.")
            self.check_kit(device_id)  # before anything is stored
        existing = self.store.get(consultation_id)
        if existing is not None:  # the same placement again (its answer was lost): the same consultation
            await self._redis(self.registry.claim(consultation_id, self.id))
            self._assign(consultation_id, device_id)
            return existing
        consultation = self.store.create(consultation_id=consultation_id, **fields)
        try:
            claimed = await self._redis(self.registry.claim(consultation_id, self.id))
        except ClusterError:
            self.store.delete(consultation_id)  # nobody was told about it: as if never made
            raise
        if not claimed:
            self.store.delete(consultation_id)
            raise ClusterError(409, "consultation_exists", "Another server already holds a consultation with this id.")
        self._assign(consultation_id, device_id)
        await self.report()  # before answering, so the next placement sees this node's new load
        return consultation

    def _assign(self, consultation_id: str, device_id: str | None) -> None:
        if device_id is not None and self.assign_kit is not None:
            self.assign_kit(consultation_id, device_id)

    # --- finding the owner ---

    async def ask_owner(self, owner: NodeRecord, path: str, body: dict[str, Any], authorization: str | None = None,
                        method: str = "POST") -> tuple[int, Any]:
        """Send ``body`` to ``path`` on the owning node (for a question or a change only it can answer), with
        the caller's credential when given; its answer."""
        assert self._http is not None
        headers = {"Authorization": authorization} if authorization else None
        try:
            async with self._http.request(method, f"{owner.url}{path}", json=body, headers=headers) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise ClusterError(503, "node_unavailable", "The server that holds this consultation is not "
                                                        "reachable now; try again shortly.") from None

    async def owner(self, consultation_id: str) -> NodeRecord | None:
        """The live node that holds a consultation this node does not; None when no node holds it."""
        node_id = await self._redis(self.registry.owner(consultation_id))
        if node_id is None or node_id == self.id:
            return None
        node: NodeRecord | None = await self._redis(self.registry.node(node_id))
        if node is None:
            raise ClusterError(503, "node_unavailable",
                               "The server that holds this consultation is not reachable now; try again shortly.")
        return node


def kit_node_unavailable(node_id: str) -> ClusterError:
    return ClusterError(503, "kit_node_unavailable", f"The server that holds this home kit ({node_id}) is not "
                                                     "reachable now; try again shortly.")


def kit_node_draining(node_id: str) -> ClusterError:
    return ClusterError(503, "kit_node_draining", f"The server that holds this home kit ({node_id}) is draining "
                                                  "and takes no new consultations; move the kit to another server.")


async def place_here(request: web.Request) -> web.Response:
    """Internal: another node placed a consultation on this one (PUT is idempotent for one id)."""
    hub = request.app[HUB]
    assert hub.cluster is not None
    consultation_id = request.match_info["id"]
    if not CONSULTATION_ID.match(consultation_id):
        raise ApiError(400, "consultation_id_invalid", "A consultation id is 1 to 64 lowercase letters or digits.")
    data = await json_body(request)
    fields = validated_consultation(data)
    consultation = await hub.cluster.create_here(consultation_id, fields, requested_device(data))
    return web.json_response(consultation_json(hub, consultation), status=201)


def join_cluster(app: web.Application, hub: SignallingHub) -> None:
    """With a Redis URL configured, run this server as a node of a cluster: its route, its load reports,
    its readiness check, and leaving the registry at the end. Without one, nothing changes.

    Needs ops.add_routes first (the drain state and the readiness checks)."""
    settings = settings_from_config(hub.config)
    if settings is None:
        return
    media, drain = hub.media, app[DRAIN_STATE]
    kits = hub.devices
    node = hub.cluster = ClusterNode(
        settings, hub.store, lambda: media.counts()["participants"], draining=lambda: drain.draining,
        devices=lambda: [d.id for d in kits.store.devices() if not d.revoked] if kits is not None else [])
    drain.listeners.append(lambda state: node.report_soon())  # out of placement at once

    async def redis() -> str | None:
        return node.readiness()

    if kits is not None:
        node.check_kit, node.assign_kit = kits.assignable, kits.assign
    app[READINESS_CHECKS].append(redis)
    app.router.add_put("/api/cluster/consultations/{id}", place_here)

    async def start(app: web.Application) -> None:
        await node.start()

    async def stop(app: web.Application) -> None:
        await node.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
