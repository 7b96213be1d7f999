"""The client's own address behind a TLS proxy the server trusts (``[server] trusted_proxies``).

Behind nginx every request reaches the server from the proxy's address. The access log of
images, the enrolment and doctor rate limits and the server's log lines want the client's: the
proxy sends it in ``X-Forwarded-For``. The header is believed only from a peer inside one of the
trusted networks, and read from the right: each trusted hop is passed over, and the first address
that is not a trusted proxy is the client. A hop that is not an address at all ends the walk at
the last trusted one, so a client cannot put words in the proxy's mouth.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def parse_networks(values: Iterable[str]) -> list[Network]:
    """``["127.0.0.1/32", "::1"]`` as networks; ValueError names the first entry that is not one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network (e.g. 127.0.0.1/32)") from None
    return networks


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: ``peer`` itself unless it is a trusted proxy, else taken from the
    ``X-Forwarded-For`` header values (each a comma-separated list, the nearest hop last)."""
    current = _address(peer or "")
    if current is None or not _trusted(current, trusted):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        current = address
        if not _trusted(address, trusted):
            break
    return str(current)


def forwarded_client(trusted: Sequence[Network]) -> Middleware:
    """Middleware giving each request from a trusted proxy the client's address as ``request.remote``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), trusted)
        if remote is not None and remote != request.remote:
            request = request.clone(remote=remote)
        return await handler(request)

    return middleware
