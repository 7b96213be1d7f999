"""The SFU's worker processes in the server: started with it, checked by readiness, shown to IT staff.

``[media] workers`` (``NARA_MEDIA_WORKERS``, ``nara serve --workers N``; default
one per core) runs the SFU in that many processes (``mediaserver/pool.py``);
``0`` runs it inside the server's own process, as one event loop (the embedded
mode: for debugging, and for tests that look inside the rooms).

``GET /api/workers`` (the admin key) lists each worker: its index and pid,
whether it is up, the consultations on it (each with its participants), its participants, CPU seconds,
resident memory, restarts and UDP port slice.
"""

from __future__ import annotations

from aiohttp import web
from aiortc import RTCIceServer

from mediaserver.aiortc_adapter import restrict_host_addresses, restrict_port_range
from mediaserver.pool import WorkerPool, WorkerSettings
from mediaserver.room import MediaServer
from mediaserver.service import MediaService

from .config import ServerConfig
from .ops import READINESS_CHECKS
from .settings import worker_count
from .ws import HUB


def ice_servers(config: ServerConfig) -> list[RTCIceServer]:
    """The ICE servers the SFU itself uses (``ServerConfig.ice_servers``)."""
    return [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in config.ice_servers]


def media_service(config: ServerConfig) -> MediaService:
    """The SFU this server uses: a pool of worker processes, or (``workers = 0``) a MediaServer in this process."""
    low, high = config.media_port_min, config.media_port_max
    port_range = None if low is None or high is None else (low, high)
    count = worker_count(config)  # settings.py: the configured number, else one per core; 0: in this process
    if count == 0:
        return MediaServer(ice_servers(config), config.media_addresses, adaptation=config.adaptation,
                           port_range=port_range)
    # The network doctor's test peer (doctor.py) runs in this process: it answers on the same addresses and
    # port range as the calls (a port a worker's slice holds is skipped; a worker skips one the doctor holds).
    restrict_host_addresses(config.media_addresses)
    restrict_port_range(low, high)
    return WorkerPool(count, WorkerSettings(
        ice_servers=[dict(s) for s in config.ice_servers], addresses=config.media_addresses,
        adaptation=config.adaptation, port_range=port_range, log_format=config.log_format,
        log_level=config.log_level))


async def workers(request: web.Request) -> web.Response:
    media = request.app[HUB].media
    listed = media.describe() if isinstance(media, WorkerPool) else []
    return web.json_response({"mode": "workers" if listed else "embedded", "workers": listed},
                             headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    """Start and check the worker processes with the server (needs ops.add_routes first), and /api/workers."""
    media = app[HUB].media
    app.router.add_get("/api/workers", workers)
    if not isinstance(media, WorkerPool):
        return
    pool = media

    async def start(app: web.Application) -> None:
        await pool.start()

    async def media_workers() -> str | None:
        return pool.ready()

    app.on_startup.append(start)
    app[READINESS_CHECKS].append(media_workers)

