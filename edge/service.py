"""``nara edge run``: the agent, its page and systemd's notifications in one event loop.

A configuration with mistakes does not crash-loop the service: the mistakes
are logged, and the kit's screen (at the configured page address, or the
default one when that is the mistake) says the kit is not set up, until
someone fixes the file and restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from .agent import KitAgent
from .config import EdgeConfig, read_config
from .page import start_page
from .reconnect import Transition
from .remote import Speaker
from .systemd import Notifier

logger = logging.getLogger("edge.service")

STATUS_TEXT = {
    "starting": "starting",
    "no_network": "no network",
    "waiting": "waiting for a call",
    "connecting": "connecting",
    "connected": "connected",
    "reconnecting": "reconnecting",
    "revoked": "revoked: the kit must be enrolled again",
    "config_error": "not set up: see the log",
}


async def serve(config_path: Path, notifier: Notifier | None = None) -> bool:
    """Run until SIGINT or SIGTERM; False if the agent itself failed (systemd then restarts it)."""
    notifier = notifier or Notifier()
    config, errors = read_config(config_path)
    for error in errors:
        logger.error("configuration %s: %s: %s", config_path, error.field, error.message)
    broken = config is None
    if config is None:
        config = EdgeConfig(server="http://invalid", credential=Path("/nonexistent"))
    agent = KitAgent(config, speaker=Speaker())
    if broken:
        first = errors[0]
        agent.machine.config_error(asyncio.get_running_loop().time(), f"{first.field}: {first.message}")

    def on_change(transition: Transition) -> None:
        notifier.status(STATUS_TEXT.get(transition.new.value, transition.new.value))

    agent.listeners.append(on_change)
    runner, port = await start_page(agent, config.page_host, config.page_port)
    logger.info("the kit's page is at http://%s:%d/", config.page_host, port)
    notifier.ready(STATUS_TEXT[agent.state.value])
    watchdog = asyncio.ensure_future(notifier.keep_watchdog())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.ensure_future(agent.run() if not broken else stop.wait())
    stopping = asyncio.ensure_future(stop.wait())
    failed = False
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if running.done() and running.exception() is not None:
            failed = True
            logger.error("the agent failed", exc_info=running.exception())
    finally:
        notifier.notify("STOPPING=1")
        for task in (running, stopping, watchdog):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await runner.cleanup()
        notifier.close()
    return not failed


def main(config_path: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return 0 if asyncio.run(serve(config_path)) else 1
