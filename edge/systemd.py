"""systemd's notify protocol, spoken directly: READY=1, STATUS=…, WATCHDOG=1.

A datagram to the unix socket named in ``$NOTIFY_SOCKET`` (a leading ``@``
means Linux's abstract namespace). Without that variable, as outside
systemd, every call does nothing. The watchdog is pinged from a task on the
agent's own event loop: if the loop stops turning, the pings stop and
systemd restarts the agent (``WatchdogSec=`` in deploy/nara-edge.service).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000 / 2  # ping twice per period, as systemd advises
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (e.g. "READY=1", "STATUS=Ansluten") as one message; False when not under systemd."""
        if not self.address:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            logger.warning("could not notify systemd: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    async def keep_watchdog(self) -> None:
        """Ping the watchdog from this event loop for as long as the task runs."""
        if self.watchdog_interval is None or not self.address:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
