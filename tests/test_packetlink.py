"""The packet-level link: a peer in a namespace of its own, reached only through two TUN devices and the link model.

What crosses it must behave like the link it models: a TCP transfer arrives
whole at the configured rate, a UDP round trip takes the configured delay,
and what the link loses (at random, or in an outage switched on while it
runs) shows in its counters and not at the far end.

This needs root in a private network namespace (``scripts/test`` runs the
suite in one); anywhere else it would add interfaces to the machine's own
namespace, so it does not run there — except under CI, where a missing
namespace is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bench.link import LinkProfile
from bench.packetlink import LinkReading, PacketLink
from bench.process import PROJECT

from .net_peer import TCP_PORT, UDP_PORT, payload


def _private_network_namespace() -> bool:
    try:
        return os.geteuid() == 0 and [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


if not (_private_network_namespace() and all(shutil.which(t) for t in ("ip", "unshare", "nsenter"))
        and os.path.exists("/dev/net/tun")):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the suite as root in a private network namespace (scripts/test does)")
    pytest.skip("needs root in a private network namespace with /dev/net/tun, ip, unshare and nsenter "
                "(run ./scripts/test)", allow_module_level=True)


@asynccontextmanager
async def peer_behind(uplink: LinkProfile, downlink: LinkProfile, seed: int = 1) -> AsyncIterator[PacketLink]:
    """A TCP sender and UDP echo in a namespace of its own, joined to this one by a packet link."""
    peer = await asyncio.create_subprocess_exec(
        "unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", "tests.net_peer",
        env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=asyncio.subprocess.PIPE)
    link: PacketLink | None = None
    try:
        assert peer.stdout is not None
        assert await asyncio.wait_for(peer.stdout.readline(), 10) == b"ready\n"
        link = await PacketLink.start(peer.pid, uplink, downlink, seed=seed)
        yield link
    finally:
        if link is not None:
            await link.close()
        peer.terminate()
        await peer.wait()


class EchoClient(asyncio.DatagramProtocol):
    """Numbered datagrams to the peer's echo; when each came back."""

    def __init__(self) -> None:
        self.back: dict[int, float] = {}
        self.sent = 0
        self.returned = 0
        self.changed = asyncio.Event()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.back[int.from_bytes(data[:4], "big")] = time.monotonic()
        self.returned += 1
        self.changed.set()

    def send(self, number: int, size: int = 200) -> None:
        self.transport.sendto(number.to_bytes(4, "big") + bytes(size - 4))
        self.sent += 1

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def returned_from(self, number: int) -> None:
        await self.until(lambda: number in self.back)

    async def all_through(self, marker: int) -> None:
        """Everything sent so far that survived has come back: a marker is sent until it returns (no reordering)."""
        async with asyncio.timeout(10):
            while marker not in self.back:
                self.send(marker)
                with_answer = asyncio.ensure_future(self.until(lambda: marker in self.back, 0.5))
                try:
                    await with_answer
                except TimeoutError:
                    pass  # the marker itself was lost: again


@asynccontextmanager
async def echo_client(link: PacketLink) -> AsyncIterator[EchoClient]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(EchoClient, remote_addr=(link.kit_address, UDP_PORT))
    try:
        yield client
    finally:
        transport.close()


async def reading_when(link: PacketLink, predicate: Callable[[LinkReading], bool]) -> LinkReading:
    """The link's counters, read until ``predicate`` holds (the link process reads packets in its own time)."""
    async with asyncio.timeout(10):
        while not predicate(reading := await link.read()):
            await asyncio.sleep(0.02)  # between two readings of another process's counters
    return reading


@pytest.mark.parametrize("rate", [256_000, 1_000_000])
async def test_a_tcp_transfer_arrives_intact_at_the_links_rate(rate: int) -> None:
    link_profile = LinkProfile(rate_bps=rate, queue_ms=200, delay_ms=20)
    size = int(rate / 8 * 5)  # five seconds' worth
    async with peer_behind(link_profile, link_profile) as link:
        reader, writer = await asyncio.open_connection(link.kit_address, TCP_PORT)
        writer.write(f"SEND {size} 7\n".encode())
        received = bytearray(await reader.read(65536))
        first = time.monotonic()
        first_size = len(received)
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            received += chunk
        elapsed = time.monotonic() - first
        # Closed at once (RST), so no FIN of this test is still retransmitted into the next test's link.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        reading = await link.read()

    assert hashlib.sha256(received).digest() == hashlib.sha256(payload(size, 7)).digest()
    goodput = (len(received) - first_size) * 8 / elapsed
    # Every full packet carries 1448 bytes of data in 1500 (IP and TCP headers with timestamps); a drop at
    # the full queue costs TCP a little more.
    assert 0.8 * rate < goodput < 1448 / 1500 * rate * 1.03, goodput
    assert reading.uplink.tcp.bytes > size, "the data went kit to server, through the uplink"


async def test_random_loss_and_a_run_time_outage_show_in_the_counters_and_not_at_the_far_end() -> None:
    async with peer_behind(LinkProfile(loss=0.2), LinkProfile()) as link, echo_client(link) as echo:
        for batch in range(10):  # in batches the echo's socket buffer holds
            for number in range(batch * 40, batch * 40 + 40):
                echo.send(number)
            await echo.all_through(marker=10_000 + batch)
        reading = await link.read()
        answered = sum(1 for n in echo.back if n < 400)
        assert 0.14 < 1 - answered / 400 < 0.26, answered
        assert reading.downlink.link.lost_random == 0 and reading.downlink.udp.packets == echo.sent
        assert reading.uplink.udp.packets == echo.returned
        assert reading.uplink.link.lost_random == echo.sent - echo.returned, "each echo missing was lost, and counted"

        await link.cut()
        for number in range(1000, 1050):
            echo.send(number)
        reading = await reading_when(link, lambda r: r.downlink.link.lost_outage >= 50)
        assert reading.down and reading.downlink.link.lost_outage == 50
        await link.restore()
        await echo.all_through(marker=20_000)
        assert not any(1000 <= n < 1050 for n in echo.back), "nothing crosses an outage"
        assert (await link.read()).downlink.link.lost_outage == 50, "after the outage, nothing more is lost to it"


async def test_a_udp_round_trip_takes_the_configured_delay() -> None:
    async with peer_behind(LinkProfile(delay_ms=40), LinkProfile(delay_ms=60)) as link, echo_client(link) as echo:
        sent: dict[int, float] = {}
        for number in range(20):
            sent[number] = time.monotonic()
            echo.send(number)
            await echo.returned_from(number)
        round_trips = [echo.back[n] - sent[n] for n in sent]
        reading = await link.read()

    assert min(round_trips) >= 0.100
    assert statistics.median(round_trips) < 0.110, round_trips
    assert reading.uplink.udp.delay_mean == pytest.approx(0.040, abs=0.002)
    assert reading.downlink.udp.delay_mean == pytest.approx(0.060, abs=0.002)


class Stream:
    """A bulk download from the peer, read as it comes: when each piece arrived."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.arrivals: list[tuple[float, int]] = []
        self.changed = asyncio.Event()
        self.closed = False  # the peer closed or reset the connection
        self._task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self.arrivals.append((time.monotonic(), len(chunk)))
                self.changed.set()
        except ConnectionError:
            pass
        self.closed = True
        self.changed.set()

    @property
    def received(self) -> int:
        return sum(size for _, size in self.arrivals)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def first_after(self, moment: float) -> float | None:
        return next((at for at, _ in self.arrivals if at > moment), None)

    def close(self) -> None:
        self._task.cancel()
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


async def bulk_from(link: PacketLink, size: int, rto_max: float | None = None) -> Stream:
    reader, writer = await asyncio.open_connection(link.kit_address, TCP_PORT)
    writer.write(f"SEND {size} 3{'' if rto_max is None else f' {rto_max}'}\n".encode())
    return Stream(reader, writer)


async def test_a_connection_whose_retransmission_timeout_is_capped_goes_on_first_after_an_outage() -> None:
    """The kit's photo upload caps its connection's retransmission timeout at a second (edge/uploader.py): across
    the bench's 20 s outage it tries again each second, where TCP's own timer doubles at each try lost, and it
    is still there at the end (the kernel's count of tries alone would have closed it after about 16 s), so it
    carries on as the link returns, before a connection left to the kernel's defaults does."""
    outage = 20.0  # seconds the link stays cut, as in ``nara bench upload``
    profile = LinkProfile(rate_bps=1_000_000, queue_ms=100, delay_ms=20)
    async with peer_behind(profile, profile) as link:
        capped = await bulk_from(link, 4_000_000, rto_max=1.0)
        plain = await bulk_from(link, 4_000_000)
        try:
            await capped.until(lambda: capped.received >= 64 * 1024)
            await plain.until(lambda: plain.received >= 64 * 1024)
            await link.cut()
            await asyncio.sleep(outage)  # the outage itself: how long the link is down, not a wait for an event
            await link.restore()
            back_at = time.monotonic()
            await capped.until(lambda: capped.first_after(back_at) is not None or capped.closed)
            plain_then = plain.first_after(back_at)
        finally:
            capped.close()
            plain.close()
    assert not capped.closed, "the capped connection lived through the outage"
    assert capped.received < 4_000_000, "it was still carrying at the outage"
    assert plain_then is None, "when the capped connection carried on, the other one still waited"
