"""Free ports on loopback for tests that must name them before a server binds them."""

from __future__ import annotations

import socket


def free_udp_range(count: int, search_from: int = 45000, search_to: int = 50000) -> int:
    """The first of ``count`` consecutive free UDP ports on loopback (a narrow media port range)."""
    for low in range(search_from, search_to, count):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", low + i))
            return low
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free UDP ports")


def free_udp_pair(search_from: int = 47000) -> int:
    """The first of two consecutive free UDP ports on loopback."""
    return free_udp_range(2, search_from)
