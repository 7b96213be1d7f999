"""Per-second readings of a benchmark window: where a busy media worker's load goes, second by second.

Near a worker's capacity the step's averages hide the moment it tips over (a loop that falls behind,
queues that fill, datagrams dropped). Once a second, from /proc only (nothing asked of the server, which
would load it): the media worker's CPU over that second; the bytes waiting in its UDP sockets' receive
queues and the datagrams those sockets dropped (a full queue); the datagrams the load generators'
sockets dropped (the subscribers' end falling behind, not the server).

A socket is told apart by its inode: ``/proc/net/udp`` lists every UDP socket with its receive queue and
drops, ``/proc/PID/fd`` which process holds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .process import cpu_seconds


@dataclass(frozen=True)
class UdpSocket:
    inode: int
    queued: int  # bytes in its receive queue
    drops: int  # datagrams dropped since it was opened


def read_udp_sockets(table: str | None = None) -> dict[int, UdpSocket]:
    """Every IPv4 and IPv6 UDP socket of this network namespace, by inode (``table``: a /proc/net/udp text)."""
    texts = [table] if table is not None else []
    if table is None:
        for name in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                texts.append(Path(name).read_text())
            except OSError:
                continue
    sockets = {}
    for text in texts:
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 13:
                continue
            try:
                queued = int(fields[4].partition(":")[2], 16)
                inode, drops = int(fields[9]), int(fields[12])
            except ValueError:
                continue
            sockets[inode] = UdpSocket(inode, queued, drops)
    return sockets


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets ``pid`` holds open (empty once it is gone)."""
    inodes: set[int] = set()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


@dataclass
class Second:
    worker_cores: float
    worker_queued: int  # bytes waiting in the worker's UDP sockets, all of them, at the end of the second
    worker_drops: int  # datagrams its sockets dropped in the second
    generator_drops: int

    def to_json(self) -> list[float]:
        return [round(self.worker_cores, 3), self.worker_queued, self.worker_drops, self.generator_drops]


@dataclass
class SecondSampler:
    """Readings of one worker and the generators, a second at a time (``sample`` once a second)."""

    worker: int
    generators: list[int]
    seconds: list[Second] = field(default_factory=list)
    _last: tuple[float, float, int, int] | None = None  # (time, worker CPU seconds, worker drops, generator drops)

    def _inodes(self) -> tuple[set[int], set[int]]:
        theirs: set[int] = set()
        for pid in self.generators:
            theirs |= socket_inodes(pid)
        return socket_inodes(self.worker), theirs

    def sample(self, now: float) -> None:
        mine, theirs = self._inodes()
        sockets = read_udp_sockets()
        worker_drops = sum(s.drops for i, s in sockets.items() if i in mine)
        generator_drops = sum(s.drops for i, s in sockets.items() if i in theirs)
        try:
            cpu = cpu_seconds(self.worker)
        except OSError:
            return  # (the worker is gone: the step reports that itself)
        if self._last is not None and now > self._last[0]:
            self.seconds.append(Second(
                worker_cores=(cpu - self._last[1]) / (now - self._last[0]),
                worker_queued=sum(s.queued for i, s in sockets.items() if i in mine),
                worker_drops=max(worker_drops - self._last[2], 0),
                generator_drops=max(generator_drops - self._last[3], 0),
            ))
        self._last = (now, cpu, worker_drops, generator_drops)
