"""The Nära server: signalling (REST + WebSocket) here, the SFU in worker processes (or here: workers = 0)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from . import cluster, devices, doctor, images, live, logs, metrics, ops, rest, workers
from . import web as web_client
from .config import DATABASE_FILE, SECRET_FILE, ServerConfig, admin_key, prepare_data_dir, private_value, token_keys
from .devices import HomeKits
from .imagestore import ImageStore
from .proxies import forwarded_client, parse_networks
from .store import ConsultationStore
from .tokens import TokenAuthority
from .ws import HUB, SignallingHub, websocket_handler

logger = logging.getLogger(__name__)

DEMO_TITLE = "Demokonsultation"


def build_app(config: ServerConfig) -> web.Application:
    """An aiohttp application with its own store, token authority and media server."""
    prepare_data_dir(config)
    store = ConsultationStore(config.data_dir / DATABASE_FILE)
    authority = TokenAuthority(token_keys(config), config.issuer, config.audience)
    media = workers.media_service(config)
    kits = HomeKits(store, authority)
    hub = SignallingHub(config, authority, store, media, devices=kits)
    proxied = [forwarded_client(parse_networks(config.trusted_proxies))] if config.trusted_proxies else []
    app = web.Application(middlewares=[*proxied, rest.json_errors, rest.require_admin], client_max_size=1024**2)
    app[HUB] = hub
    ops.add_routes(app)  # health, drain; before others append readiness checks
    workers.add_routes(app)  # the SFU's worker processes start with the server
    cluster.join_cluster(app, hub)  # only with a Redis URL configured
    app[rest.ADMIN_KEY] = admin_key(config)
    logs.hide(app[rest.ADMIN_KEY], private_value(config.data_dir, SECRET_FILE), config.turn_credential,
              config.turn_static_auth_secret)
    rest.add_routes(app)
    devices.add_routes(app)
    doctor.add_routes(app)
    image_service = images.add_routes(app, ImageStore(store.db, config.data_dir))
    history = live.add_routes(app, media)
    metrics.add_routes(app, config, media, history, image_service.store)
    if metrics.METRICS_TOKEN in app:
        logs.hide(app[metrics.METRICS_TOKEN])
    web_client.add_routes(app)
    app.router.add_get("/ws", websocket_handler)

    async def shutdown(app: web.Application) -> None:
        kits.close()
        for session in list(hub.sessions.values()):
            await session.close(1001, "server shutting down")
        await media.close()

    async def close_store(app: web.Application) -> None:
        store.close()  # after the requests still running (a kit's waiting question) have been answered

    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(close_store)
    return app


def demo_links(app: web.Application) -> list[tuple[str, str]]:
    """Make sure a demo consultation exists and mint a join link per kind of participant."""
    hub = app[HUB]
    demo = next((c for c in hub.store.list() if c.title == DEMO_TITLE), None) or hub.store.create(DEMO_TITLE)
    links = []
    for label, name, role in (
        ("clinician", "Doktor Demo", "clinician"),
        ("relative", "Anhörig Demo", "relative"),
        ("home kit", "Hemkit Demo", "kit"),
    ):
        token, _ = hub.authority.mint(demo.id, name, role)
        if role == "kit":
            links.append((label, web_client.kit_url(hub.config.base_url, demo.id, token)))
        else:
            links.append((label, rest.join_url(hub, demo.id, token)))
    return links


async def serve(config: ServerConfig) -> None:
    app = build_app(config)
    runner = web.AppRunner(app, access_log_format='%a "%r" %s %b %Tfs')
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    print(f"Nära is listening on {config.base_url} (data in {config.data_dir.resolve()})", flush=True)
    print(f"Admin key for /api: in {(config.data_dir / 'admin-key').resolve()} (mode 0600)", flush=True)
    if metrics.METRICS_TOKEN in app:
        token_file = (config.data_dir / metrics.METRICS_TOKEN_FILE).resolve()
        print(f"Metrics token for /metrics: in {token_file} (mode 0600)", flush=True)
    if config.demo:
        print("Join links for the demo consultation (valid 2 hours):", flush=True)
        for label, url in demo_links(app):
            print(f"  {label:10} {url}", flush=True)
    stop = asyncio.Event()
    drained = ops.handle_signals(app, config.drain_timeout, stop)  # SIGTERM drains first
    await stop.wait()
    drained.cancel()
    await runner.cleanup()


def run(config: ServerConfig, **_: Any) -> None:
    logs.configure(config.log_format, config.log_level)
    asyncio.run(serve(config))
