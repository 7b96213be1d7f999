"""Does a TURN server answer from here, and if not, why not?

When a check through a TURN server finds no relay address, WebRTC says no
more than that. This asks the server itself: an Allocate request without
credentials, over the URL's own transport (UDP, TCP or TLS). A TURN server
answers it (with 401, asking for credentials), so any answer shows that the
way there is open and points at the credentials; no answer, a refusal, a
closed connection or an untrusted certificate each say something else.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from typing import Any

from aioice import stun

UDP_TRANSPORT = 0x11000000  # REQUESTED-TRANSPORT: UDP (RFC 5766 14.7)


def _turn_address(url: str) -> tuple[str, str, int, str]:
    """Scheme, host, port and transport of a turn: or turns: URL (RFC 7065)."""
    scheme, _, rest = url.partition(":")
    hostport, _, query = rest.partition("?")
    transport = urllib.parse.parse_qs(query).get("transport", ["udp" if scheme == "turn" else "tcp"])[0]
    host, _, port = hostport.rpartition(":") if hostport.rfind(":") > hostport.rfind("]") else (hostport, "", "")
    default = 5349 if scheme == "turns" else 3478
    return scheme, host.strip("[]"), int(port) if port.isdigit() else default, transport


class _FirstDatagram(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _stun_exchange(scheme: str, host: str, port: int, transport: str, request: bytes, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    if transport == "udp":
        udp, protocol = await loop.create_datagram_endpoint(_FirstDatagram, remote_addr=(host, port))
        try:
            for attempt in range(3):  # STUN over UDP retransmits (RFC 5389 7.2.1)
                udp.sendto(request)
                try:
                    return await asyncio.wait_for(asyncio.shield(protocol.answer), timeout / 3)
                except TimeoutError:
                    if attempt == 2:
                        raise
            raise TimeoutError
        finally:
            udp.close()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=True if scheme == "turns" else None)
        try:
            writer.write(request)
            header = await reader.readexactly(20)
            return header + await reader.readexactly(int.from_bytes(header[2:4], "big"))
        finally:
            writer.close()


async def turn_server_problem(url: str, timeout: float) -> str | None:
    """Why the TURN server at ``url`` cannot be used from here, or None if it answers TURN at all.

    An Allocate request without credentials: a TURN server answers it (with 401,
    asking for them), so any answer shows the way there is open.
    """
    scheme, host, port, transport = _turn_address(url)
    request = stun.Message(message_method=stun.Method.ALLOCATE, message_class=stun.Class.REQUEST)
    request.attributes["REQUESTED-TRANSPORT"] = UDP_TRANSPORT
    over = "TLS" if scheme == "turns" else transport.upper()
    try:
        answer = stun.parse_message(await _stun_exchange(scheme, host, port, transport, bytes(request), timeout))
    except ssl.SSLCertVerificationError as exc:
        return f"its certificate is not trusted here ({exc.verify_message})"
    except ssl.SSLError as exc:
        return f"the TLS handshake with {host}:{port} failed ({exc.reason})"
    except ConnectionRefusedError:
        return f"{host}:{port} refused {over} (nothing listens there, or a firewall rejects it)"
    except TimeoutError:
        return f"no answer from {host}:{port} over {over} (blocked on the way, or the server is down)"
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return f"{host}:{port} closed the {over} connection without answering"
    except OSError as exc:
        return f"cannot reach {host}:{port} over {over}: {getattr(exc, 'strerror', None) or exc}"
    except ValueError:
        return f"{host}:{port} answered, but not as a TURN server"
    if answer.message_method != stun.Method.ALLOCATE:
        return f"{host}:{port} answered, but not as a TURN server"
    return None
