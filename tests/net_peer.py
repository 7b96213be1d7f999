"""A peer for network tests, run inside a namespace of its own: TCP bulk sender and UDP echo.

TCP (port ``TCP_PORT``): a client sends ``SEND <bytes> <seed> [<rto_max>]\\n`` and gets
that many pseudo-random bytes (``payload(bytes, seed)``), then the connection
closes; with ``rto_max`` (seconds) the sending socket's retransmission timeout
is capped there (``edge.tcpinfo.cap_retransmission_timeout``).
UDP (port ``UDP_PORT``): every datagram is sent back to where it came from.
It binds to every address, so it may start before its namespace has a network.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from edge.tcpinfo import cap_retransmission_timeout

TCP_PORT = 9000
UDP_PORT = 9001


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


async def send_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _, size, seed, *rto_max = (await reader.readline()).split()
    if rto_max and not cap_retransmission_timeout(writer.get_extra_info("socket"), float(rto_max[0]), 60.0):
        writer.close()  # the test learns it from a connection closed with nothing sent
        return
    writer.write(payload(int(size), int(seed)))
    await writer.drain()
    writer.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Echo, local_addr=("0.0.0.0", UDP_PORT))
    server = await asyncio.start_server(send_bulk, "0.0.0.0", TCP_PORT)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
