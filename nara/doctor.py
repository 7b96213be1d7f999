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

What the results mean is nara/doctor_verdict.py's; why a TURN server does not
answer, nara/turn_probe.py's.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)

from mediaserver.doctor_peer import Receipt, send_for

from .doctor_verdict import PATH_ORDER, Check, Report
from .turn_probe import turn_server_problem

PINGS = 5
NO_RELAY = "no relay address from the TURN server"


class CheckFailed(Exception):
    """A check did not succeed; the message says why, for IT staff."""



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
                raise CheckFailed(f"{error.get('code', response.status)}: {error.get('message', '')}".rstrip(": "))
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
            report.add(Check("credential", False, detail=_reason(exc)))
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
