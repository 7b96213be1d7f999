"""Running the server for real: liveness, readiness and graceful drain.

* ``GET /health/live``: 200 while the event loop answers.
* ``GET /health/ready``: 200 when every readiness check passes (the database
  answers; others append their own to ``app[READINESS_CHECKS]``, e.g. Redis),
  503 with the reasons when one does not, and 503 ``draining`` while draining.
  Neither needs credentials and neither tells anything secret.
* Drain (``SIGTERM``, or ``POST /admin/drain`` with the admin key): no new
  consultations here (``draining``, 503) and no joins to consultations not
  already live on this node, while those that are go on; the process exits when
  the last participant has left, or after ``server.drain_timeout`` once the
  participants still there have been told. A second ``SIGTERM`` exits at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from .protocol import error_message
from .rest import ADMIN_KEY, api_error
from .ws import HUB

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0  # seconds one readiness check may take before it counts as failed
CLOSING_NOTICE = "This server is restarting. Join again to continue the consultation."

# A readiness check: None when ready, else a short reason without secrets ("database: locked").
ReadinessCheck = Callable[[], Awaitable[str | None]]


@dataclass
class DrainState:
    """Whether this node is draining; ``listeners`` are told when it starts (e.g. to publish it)."""

    draining: bool = False
    since: float | None = None  # time.time() when draining began
    reason: str = ""
    listeners: list[Callable[[DrainState], None]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, reason: str, now: float) -> bool:
        """Begin draining; False when already draining."""
        if self.draining:
            return False
        self.draining, self.since, self.reason = True, now, reason
        self.started.set()
        for listener in list(self.listeners):
            listener(self)
        return True


DRAIN_STATE: web.AppKey[DrainState] = web.AppKey("drain_state", DrainState)
READINESS_CHECKS: web.AppKey[list[ReadinessCheck]] = web.AppKey("readiness_checks")


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _run_check(check: ReadinessCheck) -> str | None:
    try:
        return await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except TimeoutError:
        return f"{getattr(check, '__name__', 'check')}: no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:  # noqa: BLE001 - a failing check means not ready, whatever it raised
        return f"{getattr(check, '__name__', 'check')}: {type(exc).__name__}"


async def ready(request: web.Request) -> web.Response:
    drain = request.app[DRAIN_STATE]
    if drain.draining:
        return web.json_response({"status": "draining", "reasons": ["draining: no new consultations here"]},
                                 status=503)
    checks: list[ReadinessCheck] = request.app[READINESS_CHECKS]
    reasons = [r for r in await asyncio.gather(*map(_run_check, checks)) if r]
    if reasons:
        return web.json_response({"status": "not_ready", "reasons": reasons}, status=503)
    return web.json_response({"status": "ready"})


def _require_admin_key(request: web.Request) -> None:
    """The same rule and codes as /api (rest.require_admin), for an endpoint outside /api."""
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        raise api_error(401, "admin_key_missing", "Send the admin key as 'Authorization: Bearer <key>'.")
    if not hmac.compare_digest(supplied.encode(), request.app[ADMIN_KEY].encode()):
        raise api_error(403, "admin_key_invalid", "The admin key is not valid.")


async def drain(request: web.Request) -> web.Response:
    _require_admin_key(request)
    state = request.app[DRAIN_STATE]
    if state.start("admin", time.time()):
        logger.info("draining on request of an administrator")
    media = request.app[HUB].media
    return web.json_response({"status": "draining", "since": state.since, **media.counts()})


@web.middleware
async def refuse_new_consultations(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # A node of a cluster places new consultations on the nodes that are not draining (cluster.py).
    if request.app[DRAIN_STATE].draining and request.method == "POST" and request.path == "/api/consultations" \
            and request.app[HUB].cluster is None:
        raise api_error(503, "draining",
                        "This server is draining before a restart and takes no new consultations; "
                        "create it on another server, or after the restart.")
    return await handler(request)


def database_check(app: web.Application) -> ReadinessCheck:
    async def database() -> str | None:
        try:
            app[HUB].store.db.execute("SELECT 1").fetchone()
        except Exception as exc:  # noqa: BLE001 - closed, locked, corrupt: not ready, whatever the cause
            return f"database: {type(exc).__name__}"
        return None

    return database


def add_routes(app: web.Application) -> None:
    """Health endpoints, the drain endpoint, the drain state and its guard on new consultations."""
    app[DRAIN_STATE] = DrainState()
    hub = app[HUB]

    def refuse_new_calls(state: DrainState) -> None:
        hub.draining = True  # ws.py: joins only to consultations live here

    app[DRAIN_STATE].listeners.append(refuse_new_calls)
    app[READINESS_CHECKS] = [database_check(app)]
    app.middlewares.append(refuse_new_consultations)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_post("/admin/drain", drain)


def live_participants(app: web.Application) -> int:
    return app[HUB].media.counts()["participants"]


async def tell_participants(app: web.Application) -> int:
    """Tell everyone still in a call here that the server is going away; how many were told."""
    told = 0
    for session in list(app[HUB].sessions.values()):
        try:
            await session.send(error_message("server_restarting", CLOSING_NOTICE))
            told += 1
        except (ConnectionError, RuntimeError):
            pass  # already leaving
    return told


async def exit_when_drained(app: web.Application, drain_timeout: float, stop: asyncio.Event) -> None:
    """Once draining starts, set ``stop`` when the last participant has left or after ``drain_timeout``."""
    state = app[DRAIN_STATE]
    await state.started.wait()
    media = app[HUB].media
    logger.info("draining (%s): %d participant(s) in %d consultation(s) here; leaving when they have left",
                state.reason, live_participants(app), media.counts()["rooms"])
    try:
        await media.wait_until(lambda: live_participants(app) == 0, drain_timeout)
        logger.info("drained: the last consultation here has ended")
    except TimeoutError:
        told = await tell_participants(app)
        logger.warning("drain timeout (%g s) reached; %d participant(s) told and disconnected", drain_timeout, told)
    stop.set()


def handle_signals(app: web.Application, drain_timeout: float, stop: asyncio.Event) -> asyncio.Task[None]:
    """SIGTERM drains (a second one, or SIGINT, sets ``stop`` at once); ``stop`` is also set once drained."""
    loop = asyncio.get_running_loop()
    state = app[DRAIN_STATE]

    def on_sigterm() -> None:
        if not state.start("SIGTERM", time.time()):
            logger.warning("SIGTERM while draining: stopping now")
            stop.set()

    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    return asyncio.ensure_future(exit_when_drained(app, drain_timeout, stop))
