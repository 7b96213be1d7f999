"""What Linux says of one TCP connection (``getsockopt(TCP_INFO)``), read in one place.

The photo uploader paces itself by what its connection actually delivers and
by the connection's own round trip, which the kernel updates with every
acknowledgement: a queue building in front of the call's audio shows there
within a round trip, a second or more before the call's receiver reports say
so. The fields are those of ``struct tcp_info`` in ``linux/tcp.h``, in its
order, as far as the running kernel fills them; a field the kernel is too old
for reads as ``None``.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

TCP_INFO = getattr(socket, "TCP_INFO", 11)
# struct tcp_info up to tcpi_bytes_retrans (Linux 4.19 and later); no padding anywhere in it.
_LAYOUT = struct.Struct("=8B24I4Q6IQ3Q2I2Q")
_PREFIXES = {  # shorter kernels: the fields each one has, by the struct's length
    _LAYOUT.size: _LAYOUT,
    168: struct.Struct("=8B24I4Q6IQ"),  # up to tcpi_delivery_rate (4.9)
    104: struct.Struct("=8B24I"),  # up to tcpi_total_retrans
}
TCP_ESTABLISHED = 1
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
TCP_RTO_MAX_MS = 44  # Linux 6.15 and later: the longest a retransmission timeout may grow, in ms (1000 at least)


@dataclass(frozen=True)
class TcpInfo:
    """One reading; times in seconds, rates in bytes per second."""

    state: int
    rtt: float  # smoothed round trip
    rtt_var: float
    rto: float
    mss: int  # sender's segment size
    cwnd: int  # congestion window, in segments
    unacked: int  # segments in flight
    lost: int
    total_retrans: int  # segments retransmitted over the connection's life
    app_limited: bool  # the last delivery rate sample was limited by the application, not the network
    pacing_rate: int | None = None
    bytes_acked: int | None = None  # payload bytes acknowledged
    notsent: int | None = None  # payload bytes written and not yet sent
    min_rtt: float | None = None
    delivery_rate: int | None = None  # the kernel's latest delivery rate sample
    bytes_sent: int | None = None  # payload bytes sent, retransmissions included
    bytes_retrans: int | None = None

    @property
    def retransmitted_share(self) -> float:
        """The share of the bytes sent that were retransmissions (0 before anything was sent)."""
        if not self.bytes_sent or self.bytes_retrans is None:
            return 0.0
        return self.bytes_retrans / self.bytes_sent


def parse(raw: bytes) -> TcpInfo:
    """A ``TcpInfo`` from the bytes ``getsockopt(IPPROTO_TCP, TCP_INFO, n)`` returned."""
    layout = next((s for size, s in sorted(_PREFIXES.items(), reverse=True) if len(raw) >= size), None)
    if layout is None:
        raise ValueError(f"TCP_INFO of {len(raw)} bytes is too short")
    v = layout.unpack_from(raw)
    (state, _ca_state, _retransmits, _probes, _backoff, _options, _wscale, flags,
     rto, _ato, snd_mss, _rcv_mss, unacked, _sacked, lost, _retrans, _fackets,
     _last_data_sent, _last_ack_sent, _last_data_recv, _last_ack_recv,
     _pmtu, _rcv_ssthresh, rtt, rtt_var, _snd_ssthresh, cwnd, _advmss, _reordering,
     _rcv_rtt, _rcv_space, total_retrans) = v[:32]
    common = {"state": state, "rtt": rtt / 1e6, "rtt_var": rtt_var / 1e6, "rto": rto / 1e6, "mss": snd_mss,
              "cwnd": cwnd, "unacked": unacked, "lost": lost, "total_retrans": total_retrans}
    if len(v) <= 32:
        return TcpInfo(**common, app_limited=bool(flags & 1))
    pacing_rate, _max_pacing, bytes_acked, _bytes_received = v[32:36]
    _segs_out, _segs_in, notsent, min_rtt, _data_in, _data_out, delivery_rate = v[36:43]
    sent, retrans = (v[48], v[49]) if len(v) > 43 else (None, None)
    return TcpInfo(**common, app_limited=bool(flags & 1), pacing_rate=pacing_rate, bytes_acked=bytes_acked,
                   notsent=notsent, min_rtt=min_rtt / 1e6 if min_rtt != 0xFFFFFFFF else None,
                   delivery_rate=delivery_rate, bytes_sent=sent, bytes_retrans=retrans)


def read(sock: socket.socket) -> TcpInfo:
    """The kernel's ``tcp_info`` of ``sock``; raises ``OSError`` where there is none (not Linux, not TCP)."""
    return parse(sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _LAYOUT.size))


# --- BBR's own state (``getsockopt(TCP_CC_INFO)``: ``struct tcp_bbr_info``) ---------------------

TCP_CC_INFO = getattr(socket, "TCP_CC_INFO", 26)
_BBR_LAYOUT = struct.Struct("=5I")  # bw_lo, bw_hi, min_rtt (µs), pacing_gain and cwnd_gain (<< 8)


@dataclass(frozen=True)
class BbrInfo:
    """BBR's model of the path: its bandwidth estimate (bytes per second) and the gain it paces with."""

    bandwidth: int
    min_rtt: float  # seconds
    pacing_gain: float  # 1.25 while probing for more, 0.75 draining, 1.0 cruising (and in its long-term mode)


def parse_bbr(raw: bytes) -> BbrInfo:
    """A ``BbrInfo`` from the bytes ``getsockopt(IPPROTO_TCP, TCP_CC_INFO, 20)`` returned for a BBR socket."""
    if len(raw) < _BBR_LAYOUT.size:
        raise ValueError(f"TCP_CC_INFO of {len(raw)} bytes is too short for BBR's")
    bw_lo, bw_hi, min_rtt, pacing_gain, _cwnd_gain = _BBR_LAYOUT.unpack_from(raw)
    return BbrInfo((bw_hi << 32) | bw_lo, min_rtt / 1e6, pacing_gain / 256)


def read_bbr(sock: socket.socket) -> BbrInfo | None:
    """BBR's state of ``sock``, or None when the socket does not use BBR; raises ``OSError`` where the
    system says nothing (not Linux, not TCP)."""
    name = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")
    if name != b"bbr":
        return None
    return parse_bbr(sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, _BBR_LAYOUT.size))


def restart_congestion_control(sock: socket.socket) -> None:
    """Start ``sock``'s congestion control afresh, keeping the connection: Linux initialises an algorithm
    only when a socket switches to it, so switch to reno (always allowed) and back. Raises ``OSError``
    if the switch back is refused (the socket then stays on reno)."""
    name = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name)


def cap_retransmission_timeout(sock: socket.socket, seconds: float, patience: float) -> bool:
    """Keep ``sock``'s retransmission timeout at most ``seconds`` (one at least), however often it backs off,
    and let it give up only after ``patience`` seconds without an acknowledgement; whether the kernel took
    it (Linux 6.15 and later). Across an outage TCP doubles the timeout at each retransmission lost, to two
    minutes by default: after a 20 s outage its next try came up to 20 s after the link was back. Capped at
    a second, it tries every second, and goes on within one of the link's return. (Capped, the kernel's
    count of tries, ``tcp_retries2``, runs out after about 16 s: hence ``TCP_USER_TIMEOUT``.)"""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, max(1000, round(seconds * 1000)))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, round(patience * 1000))
    except OSError:
        return False
    return True
