"""Live consultations for IT staff: each participant's link now and over the last ten minutes.

A sampler reads every participant's figures (``mediaserver/figures.py``) every
``SAMPLE_INTERVAL`` seconds into a ring per participant, ``HISTORY`` seconds
long, so a page opened now shows the last minutes at once. ``GET /api/live``
(the admin key, like all of /api) answers with them; ``?since=<t>`` only with
the samples after ``t``, which is what the page asks for every few seconds.
``/it/`` is the page that charts them (``static/it.js``).

What IT staff are shown of a person: the participant id and role, never the
display name, the consultation's title or its patient reference. Telling the
kit from the clinician needs no more, and IT staff need no patient data.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mediaserver.figures import ConsultationFigures, ParticipantFigures, uplink_loss
from mediaserver.pool import WorkerPool
from mediaserver.service import MediaService

from .rest import api_error
from .web import PAGE_HEADERS, STATIC

SAMPLE_INTERVAL = 2.0  # seconds
HISTORY = 600.0  # seconds of samples kept per participant
FIELDS = ("up", "down", "loss_up", "loss_down", "rtt", "estimate")


@dataclass
class ParticipantHistory:
    samples: deque[dict[str, Any]]
    joined_at: float
    uplink: dict[str, tuple[int, int]] = field(default_factory=dict)  # the last reading, for the next loss
    loss_up: float | None = None
    current: ParticipantFigures | None = None


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


class LiveHistory:
    """The last ``HISTORY`` seconds of every live participant's figures, sampled by ``record``."""

    def __init__(self, history: float = HISTORY, interval: float = SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self.length = max(int(history / interval), 1)
        self.participants: dict[tuple[str, str], ParticipantHistory] = {}
        self.consultations: dict[str, float] = {}  # id -> started at
        self.sampled_at: float | None = None

    def record(self, consultations: Iterable[ConsultationFigures], now: float) -> None:
        """One sample of everyone at ``now`` (Unix seconds); whoever has left is forgotten."""
        seen: set[tuple[str, str]] = set()
        self.consultations = {}
        for consultation in consultations:
            self.consultations[consultation.consultation] = consultation.started_at
            for figures in consultation.participants:
                key = (figures.consultation, figures.participant)
                seen.add(key)
                history = self.participants.get(key)
                if history is None:
                    history = self.participants[key] = ParticipantHistory(deque(maxlen=self.length),
                                                                         figures.joined_at)
                if history.joined_at != figures.joined_at:  # a new connection: its counts start again
                    history.joined_at, history.uplink = figures.joined_at, {}
                history.loss_up = uplink_loss(history.uplink, figures.uplink_packets) if history.uplink else None
                history.uplink = figures.uplink_packets
                history.current = figures
                history.samples.append(self._sample(figures, history.loss_up, now))
        for key in set(self.participants) - seen:
            del self.participants[key]
        self.sampled_at = now

    @staticmethod
    def _sample(figures: ParticipantFigures, loss_up: float | None, now: float) -> dict[str, Any]:
        return {
            "t": round(now, 3),
            "up": round(sum(figures.sent.values())),
            "down": round(sum(figures.received.values())),
            "loss_up": _rounded(loss_up),
            "loss_down": _rounded(figures.loss_down),
            "rtt": _rounded(figures.rtt),
            "estimate": None if figures.estimate is None else round(figures.estimate),
            "video": {v.publisher: v.height for v in figures.video},
        }

    def loss_up(self, consultation: str, participant: str) -> float | None:
        """The share of its packets a participant's uplink lost over the last sampling interval."""
        history = self.participants.get((consultation, participant))
        return None if history is None else history.loss_up

    def report(self, since: float | None = None) -> dict[str, Any]:
        """Every live consultation, its participants' figures now, and their samples after ``since``."""
        consultations: dict[str, list[dict[str, Any]]] = {room: [] for room in self.consultations}
        for (room, _), history in sorted(self.participants.items()):
            figures = history.current
            if figures is None or room not in consultations:
                continue
            samples = [s for s in history.samples if since is None or s["t"] > since]
            publishers = sorted({p for s in samples for p in s["video"]})
            consultations[room].append({
                "id": figures.participant,
                "role": figures.role,
                "joined_at": figures.joined_at,
                "connection": figures.connection,
                "route": figures.route,
                "now": {
                    **{key: value for key, value in (samples[-1] if samples else history.samples[-1]).items()
                       if key in FIELDS},
                    "nacked_down": _rounded(figures.nacked_down),
                    "rate_cap": figures.rate_cap,
                    "layers_active": figures.layers_active,
                    "video": [{"from": v.publisher, "layer": v.layer, "height": v.height, "paused": v.paused}
                              for v in figures.video],
                },
                # Column by column: one list per figure, one entry per sample.
                "samples": {
                    "t": [s["t"] for s in samples],
                    **{key: [s[key] for s in samples] for key in FIELDS},
                    "video": {p: [s["video"].get(p) for s in samples] for p in publishers},
                },
            })
        return {
            "now": self.sampled_at,
            "interval": self.interval,
            "history": self.length * self.interval,
            "consultations": [
                {"id": room, "started_at": self.consultations[room], "participants": participants}
                for room, participants in sorted(consultations.items(), key=lambda item: self.consultations[item[0]])
            ],
        }


class LiveSampler:
    """Samples every participant's figures into a ``LiveHistory`` while the server runs."""

    def __init__(self, media: MediaService, history: LiveHistory) -> None:
        self.media = media
        self.history = history
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> None:
        self.history.record(await self.media.figures(), time.time())

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.history.interval)  # the sampling period itself

    async def start(self, app: web.Application) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


LIVE: web.AppKey[LiveHistory] = web.AppKey("live", LiveHistory)
# Each media worker's load for the page (pool.WorkerPool.describe): index, up, participants, CPU share, saturated.
LIVE_WORKERS: web.AppKey[Callable[[], list[dict[str, Any]]]] = web.AppKey("live_workers")
WORKER_FIELDS = ("index", "up", "participants", "cpu_share", "saturated")


async def live(request: web.Request) -> web.Response:
    since_text = request.query.get("since")
    since = None
    if since_text is not None:
        try:
            since = float(since_text)
        except ValueError:
            raise api_error(400, "since_invalid", "since must be a Unix time in seconds.") from None
        if not math.isfinite(since):
            raise api_error(400, "since_invalid", "since must be a Unix time in seconds.")
    report = request.app[LIVE].report(since)
    report["workers"] = request.app[LIVE_WORKERS]()
    return web.json_response(report, headers={"Cache-Control": "no-store"})


async def it_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "it.html", headers=PAGE_HEADERS)


async def it_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/it/")


def add_routes(app: web.Application, media: MediaService) -> LiveHistory:
    history = LiveHistory()
    sampler = LiveSampler(media, history)
    app[LIVE] = history
    pool = media if isinstance(media, WorkerPool) else None
    app[LIVE_WORKERS] = lambda: ([{k: w[k] for k in WORKER_FIELDS} for w in pool.describe()]
                                 if pool is not None else [])
    app.on_startup.append(sampler.start)
    app.on_cleanup.append(sampler.stop)
    app.router.add_get("/api/live", live, name="live")
    app.router.add_get("/it/", it_page)
    app.router.add_get("/it", it_redirect)
    return history
