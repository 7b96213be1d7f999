"""The upload's TCP connection as the kernel describes it, read from real loopback connections."""

from __future__ import annotations

import contextlib
import fcntl
import platform
import socket
import struct
from collections.abc import Iterator

import pytest

from edge import tcpinfo

SIOCOUTQNSD = 0x894B


@contextlib.contextmanager
def connection(receive_buffer: int | None = None) -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if receive_buffer is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
        try:
            yield sender, receiver
        finally:
            sender.close()
            receiver.close()


def test_a_connection_that_delivered_bytes_says_how_many_and_its_round_trip() -> None:
    with connection() as (sender, receiver):
        sender.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(receiver.recv(65536))
        info = tcpinfo.read(sender)
    assert info.state == tcpinfo.TCP_ESTABLISHED
    assert info.bytes_acked is not None and info.bytes_acked >= 100_000  # the SYN counts one more
    assert info.bytes_sent is not None and info.bytes_sent >= 100_000
    assert info.retransmitted_share == 0.0  # loopback loses nothing
    assert info.min_rtt is not None and 0 < info.min_rtt <= info.rtt < 0.5
    assert info.mss > 0 and info.cwnd > 0
    assert info.delivery_rate is not None and info.delivery_rate > 0
    assert info.notsent == 0


def test_bytes_waiting_unsent_are_counted_as_the_socket_counts_them() -> None:
    with connection(receive_buffer=4096) as (sender, _receiver):
        sender.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):  # the receiver reads nothing: its window closes, the rest waits
                sender.send(b"y" * 65536)
        info = tcpinfo.read(sender)
        unsent = struct.unpack("i", fcntl.ioctl(sender.fileno(), SIOCOUTQNSD, b"\0\0\0\0"))[0]
    assert info.notsent is not None and info.notsent > 0
    assert abs(info.notsent - unsent) <= info.mss * 4  # read a moment apart; the window may still open a little


def test_an_older_kernels_shorter_struct_reads_as_far_as_it_goes() -> None:
    with connection() as (sender, _receiver):
        raw = sender.getsockopt(socket.IPPROTO_TCP, tcpinfo.TCP_INFO, 232)
    older = tcpinfo.parse(raw[:168])
    assert older.bytes_acked is not None and older.bytes_sent is None
    oldest = tcpinfo.parse(raw[:104])
    assert oldest.state == tcpinfo.TCP_ESTABLISHED and oldest.bytes_acked is None and oldest.min_rtt is None
    with pytest.raises(ValueError, match="too short"):
        tcpinfo.parse(raw[:40])


def test_a_socket_that_is_not_tcp_has_no_tcp_info() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError):
        tcpinfo.read(udp)


def test_bbrs_state_is_read_and_its_restart_keeps_the_connection_and_bbr() -> None:
    with connection() as (sender, receiver):
        try:
            sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
        except OSError:
            pytest.skip("this kernel offers no BBR to this process")  # (the kit then keeps the system's default)
        sender.sendall(b"x" * 200_000)
        got = 0
        while got < 200_000:
            got += len(receiver.recv(65536))
        bbr = tcpinfo.read_bbr(sender)
        assert bbr is not None and bbr.bandwidth > 0 and bbr.min_rtt > 0
        assert bbr.pacing_gain in (2.885, 0.75, 1.0, 1.25) or bbr.pacing_gain == pytest.approx(739 / 256)
        tcpinfo.restart_congestion_control(sender)
        assert sender.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == b"bbr"
        sender.sendall(b"y" * 100_000)  # the connection carries on ...
        got = 0
        while got < 100_000:
            got += len(receiver.recv(65536))
        afresh = tcpinfo.read_bbr(sender)
        assert afresh is not None and afresh.pacing_gain == pytest.approx(739 / 256)  # ... in BBR's start-up again
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
        assert tcpinfo.read_bbr(sender) is None  # not BBR: nothing to read


def test_bbrs_state_parses_from_its_struct() -> None:
    raw = struct.pack("=5I", 25_000, 0, 120_000, 256, 512)
    assert tcpinfo.parse_bbr(raw) == tcpinfo.BbrInfo(25_000, 0.120, 1.0)
    with pytest.raises(ValueError):
        tcpinfo.parse_bbr(raw[:12])


def test_a_connections_retransmission_timeout_is_capped_where_the_kernel_allows() -> None:
    """Linux 6.15 and later take a cap (at least a second) and a patience beside it; older ones refuse it."""
    release = tuple(int(part) for part in platform.release().split(".")[:2] if part.isdigit())
    with socket.socket() as sock:
        capped = tcpinfo.cap_retransmission_timeout(sock, 0.2, 60.0)
        assert capped == (release >= (6, 15))
        if capped:
            assert sock.getsockopt(socket.IPPROTO_TCP, tcpinfo.TCP_RTO_MAX_MS) == 1000, "a second at least"
            assert sock.getsockopt(socket.IPPROTO_TCP, tcpinfo.TCP_USER_TIMEOUT) == 60_000, "no giving up at 16 s"
            assert tcpinfo.cap_retransmission_timeout(sock, 2.5, 30.0)
            assert sock.getsockopt(socket.IPPROTO_TCP, tcpinfo.TCP_RTO_MAX_MS) == 2500
    with socket.socket(type=socket.SOCK_DGRAM) as udp:
        assert not tcpinfo.cap_retransmission_timeout(udp, 1.0, 60.0)
