"""A packet-level emulated link between the kit's network namespace and the server's, on two TUN devices.

Everything the kit sends or receives over IP — its WebRTC media (UDP), its
uploads and signalling (TCP) — crosses one emulated bottleneck, as it would
cross one mobile modem. The link model is ``bench/link.py``'s, one ``Link``
per direction, seeded; this module only moves packets through it.

Layout (inside a private network namespace, e.g. the one ``scripts/test``
runs the tests in)::

    server side (this namespace)             kit's namespace (a process started with `unshare --net`)
    nara-s0  10.78.0.1 ── link process ── nara-k0  10.78.0.2
               uplink:   kit → server  (reads nara-k0, writes nara-s0)
               downlink: server → kit  (reads nara-s0, writes nara-k0)

The link runs in a process of its own (``python -m bench.packetlink``), so
its CPU is counted apart from what it carries. It creates both TUN devices
(``IFF_TUN | IFF_NO_PI``), moves the kit's into the kit's namespace by PID,
addresses both ends point to point, and then forwards IPv4 packets until its
standard input closes; the devices go away with it. The controlling side
(``PacketLink``) asks it over that pipe for its counters and switches
outages at run time.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import json
import os
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .link import DeliveryTrace, GilbertElliott, Link, LinkCounters, LinkProfile
from .process import PROJECT

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
READ_SIZE = 65536
START_TIMEOUT = 20.0
TCP, UDP = 6, 17  # IPv4 protocol numbers


class PacketLinkError(RuntimeError):
    """The link could not be set up (no root, no /dev/net/tun, no such process ...)."""


@dataclass(frozen=True)
class Addressing:
    """The two ends' device names and addresses (point to point, only inside the namespaces we make)."""

    server_device: str = "nara-s0"
    kit_device: str = "nara-k0"
    server_address: str = "10.78.0.1"
    kit_address: str = "10.78.0.2"


@dataclass
class Traffic:
    """What one IP protocol had delivered through one direction."""

    packets: int = 0
    bytes: int = 0
    delay_sum: float = 0.0  # seconds each packet spent in the link (queue, transmission, propagation), summed
    delay_max: float = 0.0  # the longest since the previous reading

    @property
    def delay_mean(self) -> float | None:
        return self.delay_sum / self.packets if self.packets else None


@dataclass
class DirectionCounters:
    """One direction: the model's counters (run-time outages count as outage losses) and delivered traffic."""

    link: LinkCounters = field(default_factory=LinkCounters)
    tcp: Traffic = field(default_factory=Traffic)
    udp: Traffic = field(default_factory=Traffic)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DirectionCounters:
        return cls(LinkCounters(**data["link"]), Traffic(**data["tcp"]), Traffic(**data["udp"]))


@dataclass(frozen=True)
class LinkReading:
    uplink: DirectionCounters  # kit to server
    downlink: DirectionCounters  # server to kit
    down: bool  # switched off at run time
    cpu_seconds: float  # the link process's own CPU time so far


# --- profiles across the process boundary ------------------------------------------------------


def profile_to_json(profile: LinkProfile) -> dict[str, Any]:
    return asdict(profile)


def profile_from_json(data: dict[str, Any]) -> LinkProfile:
    bursts = data.get("bursts")
    trace = data.get("trace")
    return LinkProfile(**{
        **data,
        "rate_steps": tuple((float(a), float(b)) for a, b in data.get("rate_steps", ())),
        "outages": tuple((float(a), float(b)) for a, b in data.get("outages", ())),
        "bursts": GilbertElliott(**bursts) if bursts else None,
        "trace": DeliveryTrace(tuple(trace["opportunities_ms"])) if trace else None,
    })


# --- the controlling side -----------------------------------------------------------------------


class PacketLink:
    """A running link process, controlled over its standard input and output."""

    def __init__(self, process: asyncio.subprocess.Process, addressing: Addressing) -> None:
        self.process = process
        self.addressing = addressing
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, kit_pid: int, uplink: LinkProfile, downlink: LinkProfile, *, seed: int = 0,
                    addressing: Addressing = Addressing()) -> PacketLink:
        """Join the namespace of process ``kit_pid`` to this one through ``uplink`` and ``downlink``.

        Needs root in a network namespace of its own. Returns once both ends are addressed and up.
        """
        config = {"kit_pid": kit_pid, "seed": seed, "addressing": asdict(addressing),
                  "uplink": profile_to_json(uplink), "downlink": profile_to_json(downlink)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.packetlink", json.dumps(config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(PROJECT)})
        link = cls(process, addressing)
        try:
            reply = await asyncio.wait_for(link._read_reply(), START_TIMEOUT)
        except (TimeoutError, PacketLinkError):
            await link.close()
            raise
        if not reply.get("ready"):
            await link.close()
            raise PacketLinkError(f"the link process answered {reply!r}")
        return link

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def server_address(self) -> str:
        return self.addressing.server_address

    @property
    def kit_address(self) -> str:
        return self.addressing.kit_address

    async def read(self) -> LinkReading:
        """The counters so far (the maximum delays are since the previous reading)."""
        data = await self._ask({"op": "read"})
        return LinkReading(DirectionCounters.from_json(data["uplink"]), DirectionCounters.from_json(data["downlink"]),
                           bool(data["down"]), float(data["cpu_seconds"]))

    async def cut(self) -> None:
        """An outage from now on, both ways: every packet offered is lost."""
        await self._ask({"op": "down", "value": True})

    async def restore(self) -> None:
        await self._ask({"op": "down", "value": False})

    async def close(self) -> None:
        """Stop the link process; its TUN devices, and so both ends' addresses, go with it."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        async with self._lock:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            await self.process.stdin.drain()
            return await self._read_reply()

    async def _read_reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise PacketLinkError(f"the link process ended (exit status {await self.process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise PacketLinkError(reply["error"])
        return reply


# --- the link process ------------------------------------------------------------------------


def open_tun(name: str) -> int:
    """A new TUN device ``name`` (IP packets, no packet information header); its non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def ip(*args: str, namespace_of: int | None = None) -> None:
    command = ["ip", *args]
    if namespace_of is not None:
        command = ["nsenter", "-t", str(namespace_of), "-n", *command]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PacketLinkError(f"{' '.join(command)}: {done.stderr.strip()}")


def address_both_ends(addressing: Addressing, kit_pid: int) -> None:
    a = addressing
    ip("link", "set", a.kit_device, "netns", str(kit_pid))
    for device, local, peer, pid in ((a.server_device, a.server_address, a.kit_address, None),
                                     (a.kit_device, a.kit_address, a.server_address, kit_pid)):
        ip("link", "set", "dev", device, "addrgenmode", "none", namespace_of=pid)  # no IPv6 chatter
        ip("addr", "add", local, "peer", peer, "dev", device, namespace_of=pid)
        ip("link", "set", device, "up", namespace_of=pid)
    ip("route", "add", "default", "dev", a.kit_device, namespace_of=kit_pid)  # the kit's only way out


class Direction:
    """One direction of the link: packets read from one TUN device pass the model and are written to the other."""

    def __init__(self, link: Link, out_fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.out_fd = out_fd
        self.loop = loop
        self.counters = DirectionCounters(link=link.counters)
        self._due: list[tuple[float, int, bytes]] = []  # (arrival, order, packet)
        self._order = 0
        self._timer: asyncio.TimerHandle | None = None

    def offer(self, packet: bytes, now: float, down: bool) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # IPv4 only
        if down:
            counters = self.link.counters
            counters.offered += 1
            counters.bytes_offered += len(packet)
            counters.lost_outage += 1
            return
        arrival = self.link.send(len(packet), now)
        if arrival is None:
            return
        traffic = self._traffic(packet)
        if traffic is not None:
            traffic.packets += 1
            traffic.bytes += len(packet)
            traffic.delay_sum += arrival - now
            traffic.delay_max = max(traffic.delay_max, arrival - now)
        self._order += 1
        heapq.heappush(self._due, (arrival, self._order, packet))
        if self._due[0][1] == self._order:  # the new packet is the next due
            self._arm()

    def _traffic(self, packet: bytes) -> Traffic | None:
        protocol = packet[9]
        if protocol == TCP:
            return self.counters.tcp
        return self.counters.udp if protocol == UDP else None

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(self._due[0][0], self._deliver)

    def _deliver(self) -> None:
        self._timer = None
        now = self.loop.time()
        while self._due and self._due[0][0] <= now:
            _, _, packet = heapq.heappop(self._due)
            try:
                os.write(self.out_fd, packet)
            except OSError:
                pass  # the far end's device is down: a real link would lose it too
        if self._due:
            self._arm()

    def reading(self) -> dict[str, Any]:
        data = asdict(self.counters)
        self.counters.tcp.delay_max = self.counters.udp.delay_max = 0.0
        return data


class Forwarder:
    """Reads both TUN devices and passes every packet through its direction's link."""

    def __init__(self, kit_fd: int, server_fd: int, uplink: Link, downlink: Link,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.down = False
        self.uplink = Direction(uplink, server_fd, loop)
        self.downlink = Direction(downlink, kit_fd, loop)
        loop.add_reader(kit_fd, self._drain, kit_fd, self.uplink)
        loop.add_reader(server_fd, self._drain, server_fd, self.downlink)

    def _drain(self, fd: int, direction: Direction) -> None:
        while True:
            try:
                packet = os.read(fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the device is going away
            direction.offer(packet, self.loop.time(), self.down)

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "down":
            self.down = bool(request["value"])
            return {"down": self.down}
        if op == "read":
            times = os.times()
            return {"uplink": self.uplink.reading(), "downlink": self.downlink.reading(), "down": self.down,
                    "cpu_seconds": times.user + times.system}
        return {"error": f"unknown request {request!r}"}


async def serve(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    addressing = Addressing(**config["addressing"])
    seed = int(config["seed"])
    kit_fd = open_tun(addressing.kit_device)
    server_fd = open_tun(addressing.server_device)
    address_both_ends(addressing, int(config["kit_pid"]))
    start = loop.time()
    uplink = Link(profile_from_json(config["uplink"]), seed=seed, start=start)
    downlink = Link(profile_from_json(config["downlink"]), seed=seed + 1, start=start)
    forwarder = Forwarder(kit_fd, server_fd, uplink, downlink, loop)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := await reader.readline():
        print(json.dumps(forwarder.answer(json.loads(line))), flush=True)


def main() -> int:
    try:
        asyncio.run(serve(json.loads(sys.argv[1])))
    except (OSError, PacketLinkError) as exc:
        print(json.dumps({"error": f"the packet link could not start: {exc}"}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
