"""The kit's photo uploader: delivers the outbox to the server, oldest first, one image at a time.

The protocol is tus 1.0.0 (core, creation, checksum) as docs/images.md
describes it, written here by hand over aiohttp: the Python tus clients are
synchronous (built on requests, so they would block the kit's event loop and
its call) or lack the checksum extension, and neither paces its bytes.

Per image:

1. an upload token for the image's consultation, asked for with the device
   credential (``POST /api/devices/{id}/upload-token``), kept until shortly
   before it expires;
2. with an upload address already recorded, ``HEAD`` it to learn how far the
   server got; otherwise ``POST`` (idempotent on ``image_id``: a lost answer,
   or a power cut before the address was recorded, finds the same upload) and
   record the address;
3. ``PATCH`` the rest: where the server takes Nära's blocks (``Nara-Blocks``,
   docs/images.md), in PATCHes of about a minute of bytes at the current
   rate, each a stream of blocks of about half a second with their own
   SHA-256, which the server verifies and keeps one by one; elsewhere in tus
   chunks of about 5 s of bytes, each with ``Upload-Checksum: sha256 …``.
   Each answered offset is recorded. A refused block or chunk (``460``) is
   sent again from the server's offset, ``409`` asks ``HEAD``; the last
   answer names the stored image, and the outbox marks it delivered.

A refusal (a 4xx other than those) is final for that image: it is marked
``refused`` with the server's code, shown on the kit's page, and never tried
again in a loop. Network errors, timeouts and 5xx answers back off
(exponentially with full jitter, capped) and try again — at once when the
agent says the network is back. A revoked or unknown kit stops uploading, and
its images wait.

The bytes are paced (``edge/pacing.py``): a token bucket under a ceiling
(``upload_kbps``) that, while a call is up, yields to the call's audio like
LEDBAT, and keeps near what the upload's connection delivers (its
``TCP_INFO``, ``edge/tcpinfo.py``). Between two PATCHes the link stands idle
for a round trip (the last bytes' way there, the server's answer back): a
twentieth of a 5 s chunk on a thin link, which is why a PATCH of blocks
lasts a minute; an outage costs the block under way (a quarter of a second
of bytes on average), where it cost the checksummed chunk under way (2.5 s).
The upload's socket is marked low priority (DSCP CS1) where the operating
system allows. The kernel paces the socket's packets at the same
rate (``SO_MAX_PACING_RATE``): the socket's send buffer holds seconds of bytes
on a thin link, and without it TCP sends them in window-sized bursts at
whatever rate its window allows, so a cut in the rate reached the link only
once that backlog had gone, while the audio queued behind it. Where the system
lets it (CAP_NET_ADMIN, or ``bbr`` in ``net.ipv4.tcp_allowed_congestion_control``)
the socket uses BBR: on a link that loses 10 % of its packets at random,
loss-based TCP (cubic, reno) halves its window at every loss and carried about
65 % of a 256 kbit/s link even alone, BBR about 90 % (``nara bench upload``).
BBR held in its long-term mode under the rate is started afresh
(``HeldEstimate``).
The kernel may pace up to a quarter above the rate so TCP makes up the time it
stalls repairing losses, and beside a call at most ``backlog_limit`` bytes
wait unsent in the socket, so what it makes up stays small. A request given up
resets its connection: closed gracefully, the kernel sent what it still held
after the outage, beside the new connection. Where Linux allows (6.15 and
later) the connection's retransmission timeout is capped at a second: across
an outage it tries each second and goes on by itself within about one of the
link's return, with its congestion control's model of the link, where a
request given up paid a new connection's handshake and a HEAD first. A request
counts as stalled there only after a minute without progress (bytes written
or acknowledged), or when it stays silent for ``back_grace`` after the agent
reached the server again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import random
import socket
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from . import tcpinfo
from .device_api import DeviceCredential
from .outbox import Outbox, OutboxItem, sha256_of
from .pacing import (
    KIB,
    MAX_CHUNK,
    MIN_CHUNK,
    NO_CALL,
    CallSignal,
    HeldEstimate,
    ScavengerRate,
    ScavengerSettings,
    SocketSignal,
    TokenBucket,
    chunk_size,
)
from .reconnect import Backoff

logger = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
TOS_CS1 = 0x20  # DSCP CS1 (8) in the upper six bits: "lower effort" than best effort
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux; bytes per second
SIOCOUTQNSD = 0x894B  # Linux: bytes in a TCP socket's send queue not sent yet
BBR_READ_INTERVAL = 0.25  # seconds between readings of the upload connection's BBR state
WIRE_OVERHEAD = 1500 / 1448  # IP and TCP headers (with timestamps) on a full packet
UPLOAD_CONGESTION_CONTROL = b"bbr"
MAX_CHECKSUM_RETRIES = 5
BACKLOG_WAIT = 0.02  # seconds between looks at a socket holding too much unsent
BLOCKS_CONTENT_TYPE = "application/vnd.nara.blocks"  # signalling/tus.py: a PATCH body of checksummed blocks
BLOCK_HEADER = struct.Struct(">I32s")  # a block's length and SHA-256, then its bytes
MIN_BLOCK = 4 * 1024
MAX_BLOCK = 256 * 1024
# A request whose connection brings no progress for this long is given up (``UploadSettings.stall_timeout``):
# 20 s where TCP backs off as it likes; where its retransmission timeout is capped (``rto_max``) the connection
# tries again each second and goes on by itself after an outage, so only a long silence says it is dead, or
# the agent reaching the server while it stays silent (``back_grace``). Given up after a 20 s outage, as the
# link came back, the next request paid a new connection's handshake and a HEAD: 1.5-4 s over a lossy link.
STALL_TIMEOUT = 20.0
CAPPED_STALL_TIMEOUT = 60.0
MAX_RESTARTS = 3  # an image whose upload vanished or was reset this often in a row waits for the back-off
DEVICE_CODES = frozenset({"device_revoked", "device_unknown", "device_credential_invalid",
                          "device_credential_missing"})


@dataclass(frozen=True)
class UploadSettings:
    ceiling_kbps: int = 2000
    chunk_seconds: float = 5.0  # a chunk's round trip leaves the link idle: a small share of a long chunk
    # Where the server takes blocks (``signalling/tus.py``, ``BLOCKS_CONTENT_TYPE``), one PATCH carries about
    # ``stream_seconds`` of bytes at the rate as it starts (at most ``max_stream``), in blocks of about
    # ``block_seconds`` that count one by one: the link no longer idles for a round trip every chunk, and an
    # outage costs half a block instead of half a chunk.
    stream_seconds: float = 60.0
    block_seconds: float = 0.5
    max_stream: int = 4 * 1024 * KIB
    min_chunk: int = MIN_CHUNK
    max_chunk: int = MAX_CHUNK
    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=60.0))
    # Nothing sent, acknowledged or answered for this long: the connection is dead. None: ``STALL_TIMEOUT``,
    # or ``CAPPED_STALL_TIMEOUT`` where the connection's retransmission timeout is capped at ``rto_max``.
    stall_timeout: float | None = None
    rto_max: float = 1.0  # seconds: the longest the upload connection's retransmission timeout may grow
    # The agent reached the server again while the upload made no progress: a connection whose retransmission
    # timeout is capped has this long to show it is alive (a try a second, one or two lost), else none.
    back_grace: float = 3.0
    connect_timeout: float = 10.0
    idle_check: float = 1.0  # how often an idle uploader looks for photos another process added
    token_margin: float = 60.0  # a token is asked for again this long before it expires
    scavenger: ScavengerSettings | None = None  # None: the defaults under the ceiling

    @property
    def ceiling(self) -> float:
        return self.ceiling_kbps * 1000 / 8


class Verdict(StrEnum):
    """What an error answer means for the image."""

    RETRY = "retry"  # the server or the network: back off and try again
    NEW_TOKEN = "new_token"  # the token expired or was refused: ask for another, then try again
    HALT = "halt"  # the kit's credential no longer works: stop uploading until it is enrolled again
    REFUSE = "refuse"  # final for this image


def judge(status: int, code: str) -> Verdict:
    """The meaning of a refusal with HTTP ``status`` and Nära error ``code``."""
    if status >= 500 or status in (408, 412, 425, 429):
        return Verdict.RETRY  # 412: this server speaks another tus version; it may be upgraded
    if code in DEVICE_CODES:
        return Verdict.HALT
    if status == 401:
        return Verdict.NEW_TOKEN
    return Verdict.REFUSE


class UploadsStopped(Exception):
    """Uploading stopped: the kit's credential no longer works (revoked, or unknown to the server)."""


class _Transient(Exception):
    """Back off and try again."""


class _Final(Exception):
    """This image is done with: refused or damaged, and so recorded in the outbox."""


class _Again(Exception):
    """Start this image again at once (its upload vanished, or the token was renewed)."""


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    code: str = ""
    message: str = ""


def _low_priority_socket(send_buffer: int, opened: Callable[[socket.socket], None] | None = None,
                         ) -> Callable[[Any], socket.socket]:
    """Sockets for uploads: DSCP CS1, a send buffer of about a second's bytes so an outage strands little,
    BBR where allowed; ``opened`` is told of each, so its pacing can follow the rate."""

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(family=family, type=type_, proto=proto)
        with contextlib.suppress(OSError):
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, TOS_CS1)
            elif family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, TOS_CS1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        with contextlib.suppress(OSError, AttributeError):  # not allowed here: the system's default stays
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, UPLOAD_CONGESTION_CONTROL)
        if opened is not None:
            opened(sock)
        return sock

    return make


def encode_metadata(pairs: dict[str, str]) -> str:
    """tus ``Upload-Metadata``: comma-separated ``key base64(value)``."""
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items())


def upload_metadata(item: OutboxItem) -> dict[str, str]:
    """The docs/images.md metadata of an image; optional keys only when they say something."""
    m = item.metadata
    pairs = {
        "consultation": m.consultation, "image_id": item.id, "sha256": item.sha256, "content_type": m.content_type,
        "body_site": m.body_site, "captured_at": m.captured_at.isoformat(), "consent": "yes" if m.consent else "no",
    }
    optional = {
        "device": m.device, "patient_ref": m.patient_ref, "note": m.note, "filename": m.filename,
        "mm_per_pixel": repr(m.mm_per_pixel) if m.mm_per_pixel is not None else "",
        "quality": json.dumps(m.quality, separators=(",", ":")) if m.quality else "",
    }
    return pairs | {key: value for key, value in optional.items() if value}


class Uploader:
    """Delivers ``outbox`` to ``server`` with the kit's ``credential``; run it as a task."""

    def __init__(self, outbox: Outbox, server: str, credential: DeviceCredential, *,
                 settings: UploadSettings | None = None, call: Callable[[], CallSignal] | None = None,
                 rng: random.Random | None = None) -> None:
        self.outbox = outbox
        self.server = server.rstrip("/")
        self.credential = credential
        self.settings = settings or UploadSettings()
        self.call = call or (lambda: NO_CALL)  # the call beside which the upload goes, if any
        self.on_change: Callable[[], None] | None = None
        self.on_thin_uplink: Callable[[bool], None] | None = None  # told when the judgement changes
        self.thin_uplink = False  # a queue showed in front of the call while the upload carried little
        self.rng = rng or random.Random()
        self._loop = asyncio.get_running_loop()
        s = self.settings
        self.scavenger = ScavengerRate(s.scavenger or ScavengerSettings(ceiling=s.ceiling))
        self._bucket = TokenBucket(self.scavenger.rate, self._piece(self.scavenger.rate) * 2, self._loop.time())
        self._more = asyncio.Event()  # a photo was added
        self._network = asyncio.Event()  # the agent says the network is back
        self._tokens: dict[str, tuple[str, float]] = {}  # consultation -> (token, when it expires on our clock)
        self._http: aiohttp.ClientSession | None = None
        # The upload's sockets, paced by the kernel, each with a number that tells its connection apart.
        self._sockets: weakref.WeakKeyDictionary[socket.socket, int] = weakref.WeakKeyDictionary()
        self._opened_count = 0
        self._wire_rate = 0
        self._retransmitted = 0.0  # the share of the current connection's bytes sent again
        self._held = HeldEstimate()  # BBR holding its estimate under the rate (its long-term mode)
        self._bbr_read_at = float("-inf")
        self._deadline: asyncio.Timeout | None = None
        self._progress_at = self._loop.time()
        self._rto_capped = False  # the latest connection's retransmission timeout is capped at ``rto_max``
        self._ack_mark = (0, 0)  # (connection, bytes it had acknowledged) at the latest reading
        self._said_uncapped = False
        self._failures = 0
        self._acked = 0  # the current image's acknowledged offset
        self._max_chunk = s.max_chunk  # halved if the server says a chunk is too large
        self._max_stream = s.max_stream  # ... and this for a PATCH of blocks
        self._blocks = True  # the server takes PATCHes of blocks (until it refuses one's content type)
        self._told_at = float("-inf")
        self._logged_at = float("-inf")
        self._began: tuple[str, float, int] | None = None  # the image being sent: id, since, from offset
        # What status() shows.
        self.state = "idle"  # idle, sending, waiting (backing off), stopped
        self.detail: str | None = None
        self.image: str | None = None
        self.sent = 0  # of the current image, including bytes on their way
        self.size = 0
        self.retry_at: float | None = None
        self.bytes_acknowledged = 0  # since start, all images
        self.bytes_sent = 0  # image bytes handed to the network since start (resent ones too)
        self.delivered = 0  # images since start

    # --- what others call ---------------------------------------------------------------------

    def wake(self) -> None:
        """A photo was added: an idle uploader starts at once. Thread-safe."""
        self._loop.call_soon_threadsafe(self._more.set)

    def network_back(self) -> None:
        """The agent reached the server again: end a back-off now, and drop a request stuck on the old link."""
        self._network.set()
        now = self._loop.time()
        if now - self._progress_at > 1.0:
            self._move_deadline(now + (self.settings.back_grace if self._rto_capped else 0.0), sooner=True)

    def _move_deadline(self, when: float, sooner: bool = False) -> None:
        """Move the running request's deadline (only ever nearer if ``sooner``), unless it has already passed
        (it cannot be moved then)."""
        deadline = self._deadline
        if deadline is None or deadline.expired():
            return
        current = deadline.when()
        if not sooner or current is None or when < current:
            deadline.reschedule(when)

    @property
    def stall_timeout(self) -> float:
        """Seconds without progress after which a request is given up (see ``STALL_TIMEOUT``)."""
        if self.settings.stall_timeout is not None:
            return self.settings.stall_timeout
        return CAPPED_STALL_TIMEOUT if self._rto_capped else STALL_TIMEOUT

    def status(self) -> dict[str, Any]:
        """For the kit's page and the log: what the uploader is doing, how fast, and how far it got."""
        now = self._loop.time()
        return {
            "state": self.state, "detail": self.detail, "image": self.image, "sent": self.sent, "size": self.size,
            "rate_kbps": round(self.scavenger.rate * 8 / 1000, 1), "ceiling_kbps": self.settings.ceiling_kbps,
            "in_call": self.scavenger.in_call,
            "queueing_ms": round(self.scavenger.queueing * 1000) if self.scavenger.queueing is not None else None,
            "socket_queueing_ms": (round(self.scavenger.socket_queueing * 1000)
                                   if self.scavenger.socket_queueing is not None else None),
            "delivered_kbps": (round(self.scavenger.delivered * 8 / 1000, 1)
                               if self.scavenger.delivered is not None else None),
            "retry_in": round(max(0.0, self.retry_at - now), 1) if self.retry_at is not None else None,
            "delivered": self.delivered, "bytes_sent": self.bytes_sent, "thin_uplink": self.thin_uplink,
        }

    # --- running --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until cancelled; a kit whose credential stops working stays stopped, saying why."""
        try:
            while True:
                await self._step()
        except UploadsStopped as exc:
            self._show("stopped", str(exc))
            logger.error("photo uploads stopped: %s", exc)
            await self._close_http()
            await asyncio.Event().wait()  # until the kit is enrolled again and restarted
        finally:
            await self._close_http()

    async def run_until_empty(self) -> None:
        """Deliver everything pending and return (``nara edge upload``); raises ``UploadsStopped``."""
        try:
            while self.outbox.pending():
                await self._step()
            self._show("idle", None)
        finally:
            await self._close_http()

    async def _step(self) -> None:
        self._more.clear()
        self.outbox.refresh()
        pending = self.outbox.pending()
        if not pending:
            self._judge_link(self._loop.time())
            self._show("idle", None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._more.wait(), self.settings.idle_check)
            return
        item = pending[0]
        try:
            await self._deliver(item)
            self._failures = 0
        except _Final:
            self._failures = 0
        except _Transient as exc:
            await self._back_off(item, str(exc))

    async def _back_off(self, item: OutboxItem, detail: str) -> None:
        self._abort_connections()
        await self._close_http()  # pooled connections over a broken link are the likeliest to be dead
        delay = self.settings.backoff.delay(self._failures, self.rng)
        self._failures += 1
        self.retry_at = self._loop.time() + delay
        self._show("waiting", detail)
        logger.warning("upload of %s: %s; trying again in %.1f s", item.id, detail, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._network.wait(), delay)
        self._network.clear()
        self.retry_at = None

    async def _deliver(self, item: OutboxItem) -> None:
        self.image, self.size, self.sent, self._acked = item.id, item.size, item.sent, item.sent
        if self._began is None or self._began[0] != item.id:
            self._began = (item.id, self._loop.time(), item.sent)
        self._show("sending", None)
        for _ in range(MAX_RESTARTS):
            try:
                await self._attempt(item)
                return
            except _Again as exc:
                logger.info("upload of %s: %s; starting it again", item.id, exc)
                refreshed = self.outbox.get(item.id)
                if refreshed is None or not refreshed.pending:
                    return
                item = refreshed
        raise _Transient("the upload had to be started again too often")

    async def _attempt(self, item: OutboxItem) -> None:
        token = await self._token(item)
        offset: int | None = None
        location = item.location
        if location is not None:
            asked_at = self._loop.time()
            offset = await self._head(item, location, token)
            logger.info("upload of %s: the server has %s bytes (asked in %.1f s)", item.id, offset,
                        self._loop.time() - asked_at)
            if offset is None:
                self.outbox.forget_location(item.id)
                location = None
        image_ref: str | None = None
        if location is None or offset == item.size:  # complete but its stored id unknown: creation says it
            location, offset, image_ref = await self._create(item, token)
            self.outbox.record_location(item.id, location, offset)
        assert offset is not None
        if offset >= item.size and image_ref is not None:
            self._delivered(item, image_ref)
            return
        path = self.outbox.path_of(item)
        try:
            with path.open("rb") as image:
                await self._send(item, image, location, offset, token)
        except FileNotFoundError:
            self.outbox.damaged(item.id, "file_missing", "the image's file is missing from the outbox")
            raise _Final() from None

    async def _send(self, item: OutboxItem, image: Any, location: str, offset: int, token: str) -> None:
        checksum_failures = 0
        while True:
            call = self.call()
            now = self._loop.time()  # a chunk at today's rate
            rate = self.scavenger.update(now, call.rtt, call.in_call, sock=self._socket_signal(now), queue=call.queue)
            self._judge_link(now)
            blocks = self._blocks
            if blocks:
                size = chunk_size(rate, self.settings.stream_seconds, self.settings.min_chunk, self._max_stream)
            else:
                size = chunk_size(rate, self.settings.chunk_seconds, self.settings.min_chunk, self._max_chunk)
            image.seek(offset)
            data = image.read(min(size, item.size - offset))
            if not data:
                raise _Again("the image's file is shorter than recorded")
            if blocks:
                answer = await self._patch_blocks(location, token, offset, data, rate)
            else:
                answer = await self._patch(location, token, offset, data)
            if blocks and answer.status >= 400 and "Upload-Offset" in answer.headers:
                offset = _offset(answer, offset)  # the blocks before a refused or cut one count
                self._acknowledged(item, offset)
            if blocks and answer.status == 415 and answer.code == "content_type_invalid":
                self._blocks = False  # a server without Nära's blocks: plain tus chunks
                logger.info("upload of %s: the server takes no blocks; sending chunks", item.id)
            elif blocks and answer.status == 413 and self._max_stream > self.settings.min_chunk:
                self._max_stream = max(self.settings.min_chunk, self._max_stream // 2)
            elif answer.status == 204:
                offset = _offset(answer, offset + len(data))
                self._acknowledged(item, offset)
                if offset >= item.size:
                    image_ref = answer.headers.get("Nara-Image-Id")
                    if image_ref is None:
                        raise _Again("the server did not name the stored image")
                    self._delivered(item, image_ref)
                    return
                checksum_failures = 0
            elif answer.status == 460 and answer.code != "image_checksum_mismatch":
                checksum_failures += 1  # a chunk damaged on the way: send it again
                if checksum_failures > MAX_CHECKSUM_RETRIES:
                    raise _Transient("chunks keep arriving damaged")
            elif answer.status == 460:
                if sha256_of(self.outbox.path_of(item)) != item.sha256:
                    self.outbox.damaged(item.id, "checksum_mismatch",
                                        "the image's file no longer matches what was captured")
                    raise _Final()
                raise _Again("the server's copy did not match the image's checksum and was reset")
            elif answer.status == 409:
                head = await self._head(item, location, token)
                if head is None:
                    self.outbox.forget_location(item.id)
                    raise _Again("the upload is gone from the server")
                offset = head
                self._acknowledged(item, offset)
            elif answer.status in (404, 410):
                self.outbox.forget_location(item.id)
                raise _Again(f"the upload is gone from the server ({answer.code or answer.status})")
            elif answer.code == "upload_interrupted":  # the server saw the chunk break off; it says what it kept
                offset = _offset(answer, offset)
                self._acknowledged(item, offset)
            elif answer.code == "chunk_too_large" and self._max_chunk > self.settings.min_chunk:
                self._max_chunk = max(self.settings.min_chunk, self._max_chunk // 2)
            else:
                self._refusal(item, answer)

    # --- requests --------------------------------------------------------------------------------

    async def _token(self, item: OutboxItem) -> str:
        consultation = item.metadata.consultation
        cached = self._tokens.get(consultation)
        if cached is not None and cached[1] - self.settings.token_margin > self._loop.time():
            return cached[0]
        url = f"{self.server}/api/devices/{self.credential.device_id}/upload-token"
        headers = {"Authorization": f"Device {self.credential.secret}"}
        answer, body = await self._request("POST", url, headers, json_body={"consultation": consultation})
        if answer.status not in (200, 201):
            self._refusal(item, answer)
        try:
            token, expires_at = str(body["token"]), float(body["expires_at"])
        except (KeyError, TypeError, ValueError):
            raise _Transient("the server's upload token answer was not understood") from None
        # expires_at is the server's wall clock; keep the lifetime on our own clock.
        lifetime = max(0.0, expires_at - time.time())
        self._tokens[consultation] = (token, self._loop.time() + lifetime)
        return token

    async def _head(self, item: OutboxItem, location: str, token: str) -> int | None:
        answer, _ = await self._request("HEAD", self._url(location), self._tus(token))
        if answer.status == 200:
            return _offset(answer, 0)
        if answer.status in (404, 410):
            return None
        self._refusal(item, answer)
        return None  # not reached: a refusal raises

    async def _create(self, item: OutboxItem, token: str) -> tuple[str, int, str | None]:
        headers = self._tus(token) | {"Upload-Length": str(item.size),
                                      "Upload-Metadata": encode_metadata(upload_metadata(item))}
        answer, _ = await self._request("POST", f"{self.server}/api/uploads", headers)
        if answer.status not in (200, 201):
            self._refusal(item, answer)
        location = answer.headers.get("Location")
        if not location:
            raise _Transient("the server created the upload but did not say where")
        return _path_of(location), _offset(answer, 0), answer.headers.get("Nara-Image-Id")

    async def _patch(self, location: str, token: str, offset: int, data: bytes) -> _Answer:
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        headers = self._tus(token) | {
            "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset),
            "Upload-Checksum": f"sha256 {digest}", "Content-Length": str(len(data)),
        }
        self.sent = offset
        answer, _ = await self._request("PATCH", self._url(location), headers, data=self._paced(data, offset))
        return answer

    async def _patch_blocks(self, location: str, token: str, offset: int, data: bytes, rate: float) -> _Answer:
        """One PATCH of ``data`` in blocks of about ``block_seconds`` at ``rate``, each with its SHA-256."""
        size = int(min(MAX_BLOCK, max(MIN_BLOCK, rate * self.settings.block_seconds)))
        body = b"".join(BLOCK_HEADER.pack(len(block), hashlib.sha256(block).digest()) + block
                        for block in (data[at:at + size] for at in range(0, len(data), size)))
        headers = self._tus(token) | {
            "Content-Type": BLOCKS_CONTENT_TYPE, "Upload-Offset": str(offset), "Content-Length": str(len(body)),
        }
        self.sent = offset
        answer, _ = await self._request("PATCH", self._url(location), headers,
                                        data=self._paced(body, offset, len(data)))
        return answer

    async def _paced(self, data: bytes, base: int, image_bytes: int | None = None) -> AsyncIterator[bytes]:
        """``data`` paced at the rate; ``image_bytes`` of it are the image's (the rest, blocks' headers)."""
        image_bytes = len(data) if image_bytes is None else image_bytes
        view = memoryview(data)
        start = 0
        while start < len(view):
            now = self._loop.time()
            call = self.call()
            unsent = self._unsent()
            rate = self.scavenger.update(now, call.rtt, call.in_call, unsent, self._socket_signal(now), call.queue)
            self._judge_link(now)
            self._bucket.set_rate(rate, now)
            self._bucket.burst = 2 * self._piece(rate)  # sized at the ceiling, it let 10 kB go at once as a call began
            self._pace_wire(self.scavenger.pacing_rate(now))
            if unsent > self.scavenger.backlog_limit():
                await asyncio.sleep(BACKLOG_WAIT)  # TCP is behind: what it catches up stays small
                continue
            piece = view[start:start + self._piece(rate)]
            wait = self._bucket.take(len(piece), now)
            if wait > 0:
                await asyncio.sleep(wait)  # pacing the bytes, not waiting for an event
            self._progress()
            yield bytes(piece)
            sent_before = start * image_bytes // len(view)
            start += len(piece)
            self.bytes_sent += start * image_bytes // len(view) - sent_before
            self.sent = base + start * image_bytes // len(view)
            self._tell()

    async def _request(self, method: str, url: str, headers: dict[str, str], *, data: Any = None,
                       json_body: Any = None) -> tuple[_Answer, Any]:
        """One request, abandoned when it stalls; network errors and 5xx answers are ``_Transient``."""
        http = self._session()
        try:
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                self._progress()
                async with http.request(method, url, headers=headers, data=data, json=json_body) as response:
                    raw = await response.read()
                    self._progress()
        except TimeoutError:
            raise _Transient(f"{method} stalled: no progress for {self.stall_timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Transient(f"{method} failed: {type(exc).__name__} {exc}".strip()) from None
        finally:
            self._deadline = None
        answer = _Answer(response.status, dict(response.headers))
        body: Any = None
        if raw and "json" in response.headers.get("Content-Type", ""):
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        if response.status >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):
                answer.code, answer.message = str(error.get("code", "")), str(error.get("message", ""))
            if not answer.code:
                answer.code = f"http_{response.status}"
            if judge(response.status, answer.code) is Verdict.RETRY:
                raise _Transient(f"{method} answered {response.status} {answer.code}")
        self._network.clear()  # the server answered: any earlier "network back" is spent
        return answer, body

    # --- outcomes -----------------------------------------------------------------------------------

    def _refusal(self, item: OutboxItem, answer: _Answer) -> None:
        """Act on an error answer: always raises."""
        verdict = judge(answer.status, answer.code)
        if verdict is Verdict.RETRY:
            raise _Transient(f"the server answered {answer.status} {answer.code}")
        if verdict is Verdict.HALT:
            raise UploadsStopped(f"{answer.code}: the kit must be enrolled again before its photos can be sent")
        if verdict is Verdict.NEW_TOKEN:
            self._tokens.pop(item.metadata.consultation, None)
            raise _Again(f"the upload token was refused ({answer.code})")
        message = answer.message or f"the server answered {answer.status}"
        self.outbox.refused(item.id, answer.code, message)
        raise _Final()

    def _acknowledged(self, item: OutboxItem, offset: int) -> None:
        self.bytes_acknowledged += max(0, offset - self._acked)
        self._acked = self.sent = offset
        self.outbox.record_offset(item.id, offset)

    def _delivered(self, item: OutboxItem, image_ref: str) -> None:
        self.outbox.delivered(item.id, image_ref)
        self.delivered += 1
        if self._began is not None and self._began[0] == item.id:
            took = max(1e-3, self._loop.time() - self._began[1])
            logger.info("upload of %s done: stored as %s; %d bytes in %.1f s (%.0f kbit/s)", item.id, image_ref,
                        item.size - self._began[2], took, (item.size - self._began[2]) * 8 / 1000 / took)
        else:
            logger.info("upload of %s done: stored as %s", item.id, image_ref)
        self.sent = item.size
        self._tell(force=True)

    # --- small helpers -------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            s = self.settings
            connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=15.0,
                                             socket_factory=_low_priority_socket(max(64 * KIB, int(s.ceiling)),
                                                                                 self._opened))
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout)
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._http

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _tus(self, token: str) -> dict[str, str]:
        return {"Tus-Resumable": TUS_VERSION, "Authorization": f"Bearer {token}"}

    def _url(self, location: str) -> str:
        return f"{self.server}{_path_of(location)}"

    def _opened(self, sock: socket.socket) -> None:
        self._opened_count += 1
        self._sockets[sock] = self._opened_count
        self._wire_rate = 0  # a new socket: set its pacing with the next piece
        self._retransmitted = 0.0
        self._rto_capped = tcpinfo.cap_retransmission_timeout(sock, self.settings.rto_max, CAPPED_STALL_TIMEOUT)
        if not self._rto_capped and not self._said_uncapped:
            self._said_uncapped = True
            logger.info("this system cannot cap the upload's retransmission timeout (Linux 6.15 and later can): "
                        "after an outage, a stalled request is given up after %g s", self.stall_timeout)

    def _judge_link(self, now: float) -> None:
        thin = self.scavenger.thin_uplink(now)
        if thin != self.thin_uplink:
            self.thin_uplink = thin
            why = ("presumed so as a photo goes beside the call, until it shows otherwise"
                   if self.scavenger.thin_presumed(now) else "a queue showed in front of the call")
            logger.info("the uplink is %s", f"thin: {why}" if thin else "no longer thin")
            if self.on_thin_uplink is not None:
                self.on_thin_uplink(thin)

    def _socket_signal(self, now: float) -> SocketSignal | None:
        """The latest upload connection's own account of itself (None where the system gives none)."""
        for sock, number in sorted(self._sockets.items(), key=lambda pair: -pair[1]):
            if sock.fileno() < 0:
                continue
            try:
                info = tcpinfo.read(sock)
            except (OSError, ValueError):
                return None
            if info.state != tcpinfo.TCP_ESTABLISHED or info.bytes_acked is None or info.min_rtt is None:
                return None
            self._retransmitted = min(0.3, info.retransmitted_share)
            if number == self._ack_mark[0] and info.bytes_acked > self._ack_mark[1]:
                self._progress()  # the server acknowledged more: the connection is alive, written to or not
            self._ack_mark = (number, info.bytes_acked)
            self._watch_bbr(now, sock)
            return SocketSignal(now, number, info.bytes_acked, info.rtt, info.min_rtt, info.notsent or 0)
        return None

    def _watch_bbr(self, now: float, sock: socket.socket) -> None:
        """Start the connection's BBR afresh when it holds its estimate under the rate (``HeldEstimate``);
        read every quarter of a second at most."""
        if now - self._bbr_read_at < BBR_READ_INTERVAL:
            return
        self._bbr_read_at = now
        try:
            bbr = tcpinfo.read_bbr(sock)
            if bbr is None or not self._held.held(now, bbr.bandwidth, bbr.pacing_gain, bbr.min_rtt,
                                                  self.scavenger.rate):
                return
            tcpinfo.restart_congestion_control(sock)
        except (OSError, ValueError):
            return
        self.scavenger.restarted(now)
        logger.info("the upload's BBR held its estimate at %.0f kbit/s under the rate (%.0f kbit/s): restarted",
                    bbr.bandwidth * 8 / 1000, self.scavenger.rate * 8 / 1000)

    def _pace_wire(self, rate: float) -> None:
        """The kernel paces the upload's packets at ``rate`` (payload bytes per second, with headers and with
        room for the share of them the connection has had to send again: else TCP falls behind the rate on a
        lossy link, and what it delivers says less of what the link would carry)."""
        wire = int(rate * WIRE_OVERHEAD / (1.0 - self._retransmitted))
        if abs(wire - self._wire_rate) <= self._wire_rate // 50:
            return  # within 2 %: not worth a system call per piece
        self._wire_rate = wire
        for sock in list(self._sockets.keys()):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, wire)

    def _abort_connections(self) -> None:
        """Closing the upload's connections drops what they still hold (a reset, not a goodbye). A stalled
        PATCH's connection closed gracefully kept its unsent tens of kB, and the kernel sent them after the
        outage beside the new connection: useless bytes that queued in front of the call's audio."""
        for sock in list(self._sockets.keys()):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _unsent(self) -> int:
        """Bytes written to the upload's socket that TCP has not sent yet (0 where the system cannot say)."""
        waiting = 0
        for sock in list(self._sockets.keys()):
            with contextlib.suppress(OSError, ValueError):
                waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0"))[0]
        return waiting

    def _piece(self, rate: float) -> int:
        return int(min(16 * KIB, max(1 * KIB, rate * 0.02)))

    def _progress(self) -> None:
        now = self._loop.time()
        self._progress_at = now
        self._move_deadline(now + self.stall_timeout)

    def _show(self, state: str, detail: str | None) -> None:
        changed = (state, detail) != (self.state, self.detail)
        self.state, self.detail = state, detail
        if state == "idle":
            self.image, self.sent, self.size = None, 0, 0
        if changed:
            self._tell(force=True)

    def _tell(self, force: bool = False) -> None:
        """Call ``on_change``: at every change of state, and at most four times a second for progress."""
        now = self._loop.time()
        if self.on_change is not None and (force or now - self._told_at >= 0.25):
            self._told_at = now
            self.on_change()
        if self.state == "sending" and now - self._logged_at >= 10.0:
            self._logged_at = now
            status = self.status()
            logger.info("upload of %s: %d of %d bytes; rate %.0f kbit/s (ceiling %d%s)", self.image, self.sent,
                        self.size, status["rate_kbps"], self.settings.ceiling_kbps,
                        f", beside a call, queueing {status['queueing_ms']} ms (call), "
                        f"{status['socket_queueing_ms']} ms (upload), delivered {status['delivered_kbps']} kbit/s"
                        if status["in_call"] else "")


def _offset(answer: _Answer, default: int) -> int:
    try:
        return int(answer.headers.get("Upload-Offset", default))
    except ValueError:
        return default


def _path_of(location: str) -> str:
    """The path of an upload's address: requests go to the server the kit knows (it may be behind a proxy)."""
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")

