"""nara bench forward's per-second readings: a socket's queue and drops, told apart by who holds it."""

from __future__ import annotations

import os
import socket
import time

from bench.seconds import SecondSampler, read_udp_sockets, socket_inodes


def test_a_socket_nobody_reads_shows_its_queue_and_then_its_drops_under_its_holder() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the kernel's smallest: a few datagrams)
        receiver.bind(("127.0.0.1", 0))
        inode = os.fstat(receiver.fileno()).st_ino
        assert inode in socket_inodes(os.getpid())
        sampler = SecondSampler(os.getpid(), [])
        sampler.sample(time.monotonic())
        for _ in range(50):  # far more than its buffer holds, and nothing reads it
            sender.sendto(bytes(1000), receiver.getsockname())
        seen = read_udp_sockets()[inode]
        assert seen.queued > 0 and seen.drops > 0
        sampler.sample(time.monotonic() + 1.0)
        (second,) = sampler.seconds
        assert second.worker_drops == seen.drops and second.worker_queued >= seen.queued
        assert second.generator_drops == 0
    finally:
        receiver.close()
        sender.close()


def test_the_table_is_read_as_the_kernel_writes_it() -> None:
    table = (
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref "
        "pointer drops\n"
        "  112: 0100007F:A1F2 00000000:0000 07 00000000:00000900 00:00000000 00000000     0        0 412345 2 "
        "0000000000000000 17\n"
    )
    (only,) = read_udp_sockets(table).values()
    assert (only.inode, only.queued, only.drops) == (412345, 0x900, 17)
