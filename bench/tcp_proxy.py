"""A loopback TCP proxy that can be cut and restored: the signalling half of a link outage.

Media outages come from the impairing TURN relay (``bench/turn.py``); a kit's
HTTP and WebSocket traffic goes through this proxy, so one outage can cut
both. While cut, the proxy behaves like a dead link: bytes on open
connections go nowhere, and new connections are either blackholed
(accepted, then never answered: the client waits for its own timeout) or
refused (closed at once: what a restarted server or a closed port looks
like). When the link comes back, every connection that lived through the cut
is dropped, as the far end will long have given up on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(eq=False)  # each connection is itself, kept in a set
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    cut: bool = False  # lived through an outage

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1", port: int = 0,
                 blackhole: bool = True) -> None:
        self.target = (target_host, target_port)
        self.host, self.port = host, port
        self.blackhole = blackhole  # during a cut: hold new connections (True) or refuse them (False)
        self.down = False
        self.connections_made = 0
        self._server: asyncio.Server | None = None
        self._open: set[_Connection] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def retarget(self, host: str, port: int) -> None:
        """Send new connections elsewhere (a server restarted on another port)."""
        self.target = (host, port)

    def cut(self) -> None:
        self.down = True
        for connection in self._open:
            connection.cut = True

    def restore(self) -> None:
        self.down = False
        for connection in [c for c in self._open if c.cut]:
            connection.abort()
            self._open.discard(connection)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._open):
            connection.abort()
        self._open.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_made += 1
        connection = _Connection(writer)
        if self.down:
            if not self.blackhole:
                writer.transport.abort()
                return
            connection.cut = True
            self._open.add(connection)
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass  # swallowed by the outage
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # the server is not there: refused, as it would be without the proxy
            return
        connection.upstream = up_writer
        self._open.add(connection)
        connection.tasks = [
            asyncio.ensure_future(self._pump(connection, reader, up_writer)),
            asyncio.ensure_future(self._pump(connection, up_reader, writer)),
        ]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*connection.tasks, return_exceptions=True)
        connection.abort()
        self._open.discard(connection)

    async def _pump(self, connection: _Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.down or connection.cut:
                    continue  # the link carries nothing
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not connection.cut:
                with contextlib.suppress(Exception):
                    writer.write_eof()
