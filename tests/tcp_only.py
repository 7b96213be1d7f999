"""A place that reaches the server by TCP only: a firewall that blocks every UDP packet.

``run_behind_tcp_only(ports, command)`` starts ``command`` in a network
namespace of its own (``unshare --net``, loopback only). Inside, each of
``ports`` listens on 127.0.0.1 and carries its connections, through a Unix
socket in a shared folder, to the same port on this namespace's loopback. No
UDP gets in or out, exactly like a hospital network that lets HTTPS and TCP 443
through and nothing else.

Run as ``python -m tests.tcp_only SOCKET_DIR PORT[,PORT...] COMMAND...`` inside
the namespace: the inner half, which exits with the command's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bench.process import PROJECT


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _join(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                far_reader: asyncio.StreamReader, far_writer: asyncio.StreamWriter) -> None:
    await asyncio.gather(_pipe(reader, far_writer), _pipe(far_reader, writer))


def namespaces_available() -> bool:
    import os

    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("unshare", "ip"))


@contextlib.asynccontextmanager
async def outer_half(socket_dir: Path, ports: list[int]) -> AsyncIterator[None]:
    """Unix sockets in ``socket_dir``, each carried on to its TCP port on this namespace's loopback."""
    servers = []

    def carry(port: int):  # type: ignore[no-untyped-def]
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                far_reader, far_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            await _join(reader, writer, far_reader, far_writer)
        return accept

    for port in ports:
        servers.append(await asyncio.start_unix_server(carry(port), str(socket_dir / f"{port}.sock")))
    try:
        yield
    finally:
        for server in servers:
            server.close()


async def run_behind_tcp_only(socket_dir: Path, ports: list[int], command: list[str], timeout: float,
                              env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``command``'s exit status, standard output and error, run where only TCP to ``ports`` gets through."""
    async with outer_half(socket_dir, ports):
        process = await asyncio.create_subprocess_exec(
            "unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            sys.executable, "-m", "tests.tcp_only", str(socket_dir), ",".join(map(str, ports)), *command,
            cwd=PROJECT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


async def _inner(socket_dir: Path, ports: list[int], command: list[str]) -> int:
    def carry(port: int):  # type: ignore[no-untyped-def]
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                far_reader, far_writer = await asyncio.open_unix_connection(str(socket_dir / f"{port}.sock"))
            except OSError:
                writer.close()
                return
            await _join(reader, writer, far_reader, far_writer)
        return accept

    servers = [await asyncio.start_server(carry(port), "127.0.0.1", port) for port in ports]
    process = await asyncio.create_subprocess_exec(*command)
    status = await process.wait()
    for server in servers:
        server.close()
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(_inner(Path(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")], sys.argv[3:])))
