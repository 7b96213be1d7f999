"""``nara doctor``: can calls reach this server from here, by which path, and how fast?

Run by IT staff before a kit is placed in a home (docs/doctor.md). Each check
has its own time limit and its own result:

1. HTTP(S): the server's ``/healthz`` answers.
2. WebSocket: ``/ws`` answers a ping (the signalling every call needs).
3. UDP direct: a WebRTC connection to the SFU's own addresses with host
   candidates only.
4. TURN/UDP, TURN/TCP, TURN/TLS: the same through each TURN URL the server
   names (``GET /doctor/config``), with relay candidates only.
5. Bandwidth down and up over the best path that worked (the one a call
   would take: direct before relayed, UDP before TCP).

Deciding what the results mean (``verdict``) is a plain function of them.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import statistics
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aioice import stun
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)

from mediaserver.doctor_peer import Receipt, send_for

PINGS = 5
NO_RELAY = "no relay address from the TURN server"
PATH_ORDER = ("udp-direct", "turn-udp", "turn-tcp", "turn-tls")  # the order ICE would prefer them in
LABELS = {
    "http": "HTTP(S)", "websocket": "WebSocket", "udp-direct": "UDP direct", "turn-udp": "TURN/UDP",
    "turn-tcp": "TURN/TCP", "turn-tls": "TURN/TLS", "bandwidth-down": "Bandwidth down", "bandwidth-up": "Bandwidth up",
}


class CheckFailed(Exception):
    """A check did not succeed; the message says why, for IT staff."""


@dataclass
class Check:
    kind: str  # http, websocket, udp-direct, turn-udp, turn-tcp, turn-tls, bandwidth-down, bandwidth-up
    ok: bool
    rtt_ms: float | None = None
    kbps: float | None = None
    detail: str = ""
    url: str | None = None

    @property
    def label(self) -> str:
        return LABELS.get(self.kind, self.kind)


@dataclass
class Report:
    server: str
    checks: list[Check] = field(default_factory=list)
    on_check: Callable[[Check], None] | None = field(default=None, repr=False)  # each result as it comes
    relay_only: str | None = None  # why calls from here never go straight to the server, if they do not

    def add(self, check: Check) -> None:
        self.checks.append(check)
        if self.on_check is not None:
            self.on_check(check)

    def get(self, kind: str) -> Check | None:
        return next((c for c in self.checks if c.kind == kind), None)

    def as_json(self) -> dict[str, Any]:
        possible, words = verdict(self.checks, self.relay_only)
        return {"server": self.server, "call_possible": possible, "verdict": words, "relay_only": self.relay_only,
                "checks": [{k: v for k, v in asdict(c).items() if v is not None} for c in self.checks]}


# --- what the results mean ---------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def media_path(checks: list[Check]) -> Check | None:
    """The path a call would take: the first that worked in ICE's order of preference."""
    working = {c.kind: c for c in checks if c.ok and c.kind in PATH_ORDER}
    return next((working[k] for k in PATH_ORDER if k in working), None)


def bandwidth_words(down: float | None, up: float | None) -> str:
    """What the slower direction allows, in the words of a call."""
    known = [v for v in (down, up) if v is not None]
    if not known:
        return ""
    slowest = min(known)
    if slowest >= 1000:
        return "Bandwidth is enough for good video both ways."
    if slowest >= 300:
        return "Bandwidth is enough for video at reduced resolution."
    if slowest >= 100:
        return "Bandwidth allows audio and small, low-rate video only."
    return "Bandwidth is below 100 kbit/s: expect audio only, with gaps."


def verdict(checks: list[Check], relay_only: str | None = None) -> tuple[bool, str]:
    """Is a call possible from here, and what should IT staff know? In plain words.

    ``relay_only`` says why calls from here never go straight to the server, if they do not:
    the server's transport policy, or the kit's own relay.
    """
    by_kind = {c.kind: c for c in checks}
    http, ws = by_kind.get("http"), by_kind.get("websocket")
    if http is None or not http.ok:
        reason = http.detail if http else "not checked"
        return False, (f"The server cannot be reached ({reason}). Check the address, the name lookup (DNS) and "
                       "that outgoing HTTPS (TCP 443) is allowed.")
    if ws is None or not ws.ok:
        reason = ws.detail if ws else "not checked"
        return False, (f"The server answers HTTP but its WebSocket does not ({reason}): a proxy or firewall "
                       "blocks WebSocket upgrades, and no call can be set up. Allow WebSocket to the server.")
    turn = [c for c in checks if c.kind.startswith("turn-")]
    failed_turn = [c for c in turn if not c.ok]
    down, up = by_kind.get("bandwidth-down"), by_kind.get("bandwidth-up")
    speed = bandwidth_words(down.kbps if down else None, up.kbps if up else None)
    if relay_only is not None:
        return _relayed_verdict(turn, ws, relay_only, speed)
    path = media_path(checks)
    if path is None:
        if not turn:
            return False, ("No media path: direct UDP to the media server is blocked and the server names no TURN "
                           "relay. Allow outgoing UDP to the server, or configure TURN over TLS on port 443.")
        return False, ("No media path: direct UDP is blocked and no TURN relay could be used ("
                       + "; ".join(f"{c.label}: {c.detail}" for c in failed_turn)
                       + "). Allow outgoing UDP, or TCP 443 to the TURN server.")
    words: list[str] = []
    if path.kind == "udp-direct":
        words.append(f"Calls go directly over UDP (round trip {_ms(path.rtt_ms)}).")
        if failed_turn:
            words.append("If UDP is ever blocked here there is no fallback: "
                         + "; ".join(f"{c.label} failed ({c.detail})" for c in failed_turn) + ".")
    else:
        extra = ""
        if path.rtt_ms is not None and ws is not None and ws.rtt_ms is not None:
            extra = f"; expect +{max(0.0, path.rtt_ms - ws.rtt_ms):.0f} ms over the server's own round trip"
        port = _port(path.url)
        if path.kind == "turn-udp":
            words.append(f"Direct UDP to the media server is blocked: calls will go through TURN over UDP "
                         f"(round trip {_ms(path.rtt_ms)}{extra}).")
        else:
            how = "TLS" if path.kind == "turn-tls" else "TCP"
            words.append(f"UDP is blocked: calls will go through TURN over {how} on port {port} "
                         f"(round trip {_ms(path.rtt_ms)}{extra}). Over TCP a lost packet holds up the ones "
                         "behind it, so sound and picture stall more on a lossy link than over UDP.")
    if speed:
        words.append(speed)
    return True, " ".join(words)


def _relayed_verdict(turn: list[Check], ws: Check, why: str, speed: str) -> tuple[bool, str]:
    path = media_path(turn)
    if path is None:
        failures = "; ".join(f"{c.label}: {c.detail}" for c in turn) or "none is configured"
        return False, (f"Every call from here goes through TURN ({why}), and no TURN relay could be used "
                       f"({failures}).")
    extra = ""
    if path.rtt_ms is not None and ws.rtt_ms is not None:
        extra = f"; +{max(0.0, path.rtt_ms - ws.rtt_ms):.0f} ms over the server's own round trip"
    how = {"turn-udp": "UDP", "turn-tcp": "TCP", "turn-tls": "TLS"}[path.kind]
    words = [f"Every call from here goes through TURN ({why}): over {how} on port {_port(path.url)} "
             f"(round trip {_ms(path.rtt_ms)}{extra})."]
    if path.kind != "turn-udp":
        words.append("Over TCP a lost packet holds up the ones behind it, so sound and picture stall more on a "
                     "lossy link than over UDP.")
    if speed:
        words.append(speed)
    return True, " ".join(words)


def _port(url: str | None) -> str:
    if not url:
        return "?"
    hostport = url.partition(":")[2].partition("?")[0]
    return hostport.rpartition(":")[2] if ":" in hostport else ("5349" if url.startswith("turns:") else "3478")


TABLE_HEADER = f"  {'check':<16}{'result':<8}{'measured':>14}  detail"


def render_row(c: Check) -> str:
    measured = f"{c.kbps:.0f} kbit/s" if c.kbps is not None else _ms(c.rtt_ms) if c.rtt_ms is not None else "-"
    detail = ": ".join(x for x in (c.url or "", c.detail) if x)
    return f"  {c.label:<16}{'ok' if c.ok else 'FAILED':<8}{measured:>14}  {detail}".rstrip()


def render_verdict(checks: list[Check], relay_only: str | None = None) -> str:
    possible, words = verdict(checks, relay_only)
    return ("A call is possible. " if possible else "No call is possible from here. ") + words


def render(report: Report) -> str:
    """The table and the verdict, for a terminal."""
    lines = [f"Nära network check of {report.server}", "", TABLE_HEADER]
    lines += [render_row(c) for c in report.checks]
    return "\n".join([*lines, "", render_verdict(report.checks, report.relay_only)])


# --- the checks ----------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CheckFailed):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"the server's certificate is not trusted ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__


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


CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ", re.MULTILINE | re.IGNORECASE)


def media_addresses(sdp: str) -> list[str]:
    """The UDP addresses the server's answer offers for media, as host:port."""
    return list(dict.fromkeys(f"{host}:{port}" for host, port in CANDIDATE.findall(sdp)))


class ProbeConnection:
    """The client's end of one doctor peer: a data channel for pings and the bandwidth test."""

    def __init__(self, ice_servers: list[RTCIceServer], relay_only: bool) -> None:
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers, iceTransportPolicy=policy))
        self.channel: RTCDataChannel = self.pc.createDataChannel("doctor")
        self.control: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.receipt: Receipt | None = None
        self._open = asyncio.Event()
        self._failed = asyncio.Event()
        self.channel.on("open", self._open.set)
        self.channel.on("message", self._message)
        self.pc.on("connectionstatechange", self._state)

    def _state(self) -> None:
        if self.pc.connectionState == "failed":
            self._failed.set()

    def _message(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            if self.receipt is not None:
                self.receipt.add(len(data))
            return
        try:
            message = json.loads(data)
        except ValueError:
            return
        if isinstance(message, dict):
            self.control.put_nowait(message)

    async def connect(self, http: aiohttp.ClientSession, server: str, headers: dict[str, str], relay: bool,
                      timeout: float) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        if relay and " typ relay" not in offer:
            raise CheckFailed(NO_RELAY)
        async with http.post(f"{server}/doctor/offer", json={"sdp": offer}, headers=headers) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                error = body.get("error", {}) if isinstance(body, dict) else {}
                raise CheckFailed(f"the server refused the test connection: {error.get('code', response.status)}")
        await self.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
        opened = asyncio.ensure_future(self._open.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({opened, failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            failed.cancel()
        if not self._open.is_set():
            addresses = ", ".join(media_addresses(body["sdp"])) or "none announced"
            how = "through the relay" if relay else "over UDP"
            raise CheckFailed(f"no connection {how} to the media server ({addresses}) within {timeout:g} s")

    async def reply(self, kind: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.control.get()
                if message.get("type") == kind:
                    return message
                if message.get("type") == "error":
                    raise CheckFailed(f"the server refused the test: {message.get('code')}")

    async def round_trip(self, count: int = PINGS, timeout: float = 5.0) -> float:
        """The median of ``count`` ping round trips, in milliseconds."""
        times = []
        for seq in range(count):
            sent = time.monotonic()
            self.channel.send(json.dumps({"type": "ping", "seq": seq}))
            while (await self.reply("pong", timeout)).get("seq") != seq:
                pass
            times.append((time.monotonic() - sent) * 1000)
        return statistics.median(times)

    async def download(self, seconds: float, size: int) -> float:
        """kbit/s that arrived in the ``seconds`` after the first byte, the server sending at most ``size`` bytes."""
        window_end = asyncio.Event()
        self.receipt = receipt = Receipt(seconds, on_window_end=window_end.set)
        self.channel.send(json.dumps({"type": "down", "seconds": seconds, "bytes": size}))
        done = asyncio.ensure_future(self.reply("down-done", seconds + 15))
        ended = asyncio.ensure_future(window_end.wait())
        try:
            await asyncio.wait({done, ended}, timeout=seconds + 15, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not done.done():
                done.cancel()  # what is still queued drains by itself; its result is not needed
        self.receipt = None
        rate = receipt.kbps()
        answered = done.done() and not done.cancelled() and done.exception() is None
        if rate is None and answered:
            answer = done.result()  # everything came at once: as fast as the server could send it
            rate = float(answer["bytes"]) * 8 / max(float(answer["seconds"]), 0.001) / 1000
        if rate is None:
            raise CheckFailed("nothing arrived from the server in time")
        return rate

    async def upload(self, seconds: float, size: int) -> float:
        """kbit/s that reached the server while this end sent for ``seconds`` (at most ``size`` bytes)."""
        self.channel.send(json.dumps({"type": "up", "seconds": seconds, "bytes": size}))
        await send_for(self.channel, seconds, size)
        self.channel.send(json.dumps({"type": "up-end"}))
        done = await self.reply("up-done", seconds + 15)
        return float(done["bytes"]) * 8 / max(float(done["seconds"]), 0.001) / 1000

    async def close(self) -> None:
        await self.pc.close()


@dataclass
class DoctorOptions:
    server: str
    authorization: str  # the Authorization header's value
    timeout: float = 12.0  # each check
    seconds: float = 3.0  # each direction of the bandwidth test
    max_bytes: int = 4 * 1024 * 1024
    # A kit's own relay from its configuration ({"kind", "url", "username", "credential"}): the kit sends
    # every call through it instead of the server's TURN servers, so it is checked instead of them.
    kit_turn: list[dict[str, Any]] | None = None


async def _check_http(http: aiohttp.ClientSession, options: DoctorOptions) -> Check:
    started = time.monotonic()
    async with asyncio.timeout(options.timeout):
        async with http.get(f"{options.server}/healthz") as response:
            response.raise_for_status()
            await response.read()
    return Check("http", True, rtt_ms=(time.monotonic() - started) * 1000)


async def _check_websocket(http: aiohttp.ClientSession, options: DoctorOptions) -> Check:
    url = "ws" + options.server.removeprefix("http") + "/ws"
    async with asyncio.timeout(options.timeout):
        async with http.ws_connect(url, heartbeat=None) as ws:
            times = []
            for seq in range(3):
                sent = time.monotonic()
                await ws.send_json({"type": "ping", "id": seq})
                while (reply := await ws.receive_json()).get("type") != "pong" or reply.get("id") != seq:
                    pass
                times.append((time.monotonic() - sent) * 1000)
    return Check("websocket", True, rtt_ms=statistics.median(times))


async def _fetch_config(http: aiohttp.ClientSession, options: DoctorOptions, headers: dict[str, str]) -> Any:
    async with asyncio.timeout(options.timeout):
        async with http.get(f"{options.server}/doctor/config", headers=headers) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                error = body.get("error", {}) if isinstance(body, dict) else {}
                raise CheckFailed(f"the server refused the credential ({error.get('code', response.status)}: "
                                  f"{error.get('message', '')})")
            return body


async def run_doctor(options: DoctorOptions, on_check: Callable[[Check], None] | None = None) -> Report:
    """Every check, one after the other, each with its own time limit; ``on_check`` hears each result."""
    report = Report(options.server, on_check=on_check)
    headers = {"Authorization": options.authorization}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=options.timeout)) as http:
        for kind, step in (("http", _check_http), ("websocket", _check_websocket)):
            try:
                report.add(await step(http, options))
            except Exception as exc:  # noqa: BLE001 - every failure is a result to report
                report.add(Check(kind, False, detail=_reason(exc)))
        if not all(c.ok for c in report.checks):
            return report
        try:
            config = await _fetch_config(http, options, headers)
        except Exception as exc:  # noqa: BLE001
            report.add(Check("udp-direct", False, detail=_reason(exc)))
            return report
        if options.kit_turn is not None:
            report.relay_only = "the kit's configuration names its own TURN relay"
        elif config.get("transport_policy") == "relay":
            report.relay_only = "the server's transport policy is relay"
        paths: list[tuple[str, str | None, list[RTCIceServer]]] = [("udp-direct", None, [])]
        for turn in config.get("turn", []) if options.kit_turn is None else options.kit_turn:
            server = RTCIceServer(urls=turn["url"], username=turn.get("username"), credential=turn.get("credential"))
            paths.append((turn["kind"], turn["url"], [server]))
        best: ProbeConnection | None = None
        best_check: Check | None = None
        for kind, url, servers in sorted(paths, key=lambda p: PATH_ORDER.index(p[0])):
            probe = ProbeConnection(servers, relay_only=kind != "udp-direct")
            try:
                async with asyncio.timeout(options.timeout + 5):
                    await probe.connect(http, options.server, headers, kind != "udp-direct", options.timeout)
                    check = Check(kind, True, rtt_ms=await probe.round_trip(), url=url)
            except Exception as exc:  # noqa: BLE001
                check = Check(kind, False, detail=_reason(exc), url=url)
            if not check.ok and url is not None and check.detail.startswith(NO_RELAY):
                problem = await turn_server_problem(url, min(options.timeout, 6.0))
                check.detail = problem or (f"{NO_RELAY}: the TURN server answers but refused the credentials "
                                           "(check that the server's [turn] secret is coturn's) or has no relay ports")
            report.add(check)
            if check.ok and best is None and (kind != "udp-direct" or report.relay_only is None):
                best, best_check = probe, check  # the path a call would take
            else:
                await probe.close()
        if best is not None and best_check is not None:
            try:
                for kind, measure in (("bandwidth-down", best.download), ("bandwidth-up", best.upload)):
                    try:
                        kbps = await measure(options.seconds, options.max_bytes)
                        report.add(Check(kind, True, kbps=kbps, detail=f"over {best_check.label}"))
                    except Exception as exc:  # noqa: BLE001
                        report.add(Check(kind, False, detail=_reason(exc)))
            finally:
                await best.close()
    return report
