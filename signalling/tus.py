"""Resumable uploads: tus 1.0.0 core with the creation and checksum extensions, over aiohttp.

Written here rather than taken from a library: the one aiohttp tus package
(aiohttp-tus 1.1.0) has no checksum extension, and its storage cannot promise
what Nära needs on a link that drops in the middle of a chunk and a server
that may lose power in the middle of a write:

- a chunk counts only once its bytes are fsynced, and its new offset is then
  recorded in SQLite (synchronous=FULL); a partial file longer than its
  recorded offset (a crash between the two) is cut back before anything else
  is written to it, and at start-up;
- with ``Upload-Checksum`` a chunk is kept whole or not at all: on a mismatch
  (``460``) or a broken connection nothing of it counts. Without a checksum,
  the bytes that did arrive count, as tus core asks;
- a PATCH body is streamed to disk in blocks, never held in memory, and at most
  ``MAX_CHUNK`` bytes are taken per PATCH;
- a PATCH may instead bring a stream of blocks, each with its own SHA-256
  (``BLOCKS_CONTENT_TYPE``, Nära's own beside tus: see ``receive_blocks``):
  each block counts once it is verified and fsynced, and its offset is then
  recorded, so one long PATCH can carry the rest of an image, ``HEAD`` shows
  its progress, and a PATCH cut by an outage keeps every verified block
  before the cut;
- PATCHes to the same upload are serialised: a second one *waits* for the
  first to finish (a retry after a dropped connection often arrives before the
  server notices the old one has gone; the old one ends at the latest after
  ``READ_IDLE_TIMEOUT`` seconds without bytes, or after ``SUPERSEDE_IDLE``
  seconds without bytes once a newer PATCH waits: a kit back after an outage
  retries on a new connection, and its old one, silent since the outage
  began, kept the retry waiting up to 30 s), then is judged against the
  offset the first left: ``409 offset_mismatch`` with the server's offset when
  it is stale.

What an upload *is* (who may make one, what its metadata must say, what
happens with the last byte) is an ``UploadPolicy``'s business: images.py.
See docs/images.md, "Upload".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
from aiohttp import web

from .imagestore import ImageStore, Upload
from .rest import ApiError

logger = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,checksum"
CHECKSUMS: dict[str, Callable[[], hashlib._Hash]] = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
BLOCKS_CONTENT_TYPE = "application/vnd.nara.blocks"  # a PATCH body of blocks, each with its SHA-256
BLOCK_HEADER = struct.Struct(">I32s")  # a block: its length in bytes, its SHA-256, then its bytes
MAX_BLOCK = 1024 * 1024
BLOCKS_HEADER = "Nara-Blocks"  # OPTIONS: the server takes BLOCKS_CONTENT_TYPE bodies (their checksum)
MAX_CHUNK = 8 * 1024 * 1024  # bytes taken per PATCH
READ_BLOCK = 64 * 1024
READ_IDLE_TIMEOUT = 30.0  # seconds without a byte before a PATCH is taken as broken off
SUPERSEDE_IDLE = 2.0  # ... or this many, once another PATCH waits for the same upload
IDLE_CHECK = 0.5  # how often a silent body is looked at
MAX_METADATA = 16 * 1024  # bytes of Upload-Metadata
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
IMAGE_ID_HEADER = "Nara-Image-Id"
MAX_CHUNK_HEADER = "Nara-Max-Chunk-Size"


class TusError(ApiError):
    """A refusal answered with the tus headers (and, for some, the server's ``Upload-Offset``)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, code, message)
        self.headers = headers or {}


def tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


def require_version(request: web.Request) -> None:
    if request.headers.get("Tus-Resumable") != TUS_VERSION:
        raise TusError(412, "tus_version", f"Send 'Tus-Resumable: {TUS_VERSION}'; this server speaks tus "
                       f"{TUS_VERSION} only.", {"Tus-Version": TUS_VERSION})


def parse_length(request: web.Request) -> int:
    raw = request.headers.get("Upload-Length", "")
    if not raw.isdigit() or len(raw) > 15 or int(raw) == 0:
        raise TusError(400, "upload_length_invalid", "Upload-Length must be the image's size in bytes (at least 1).")
    return int(raw)


def parse_offset(request: web.Request) -> int:
    raw = request.headers.get("Upload-Offset", "")
    if not raw.isdigit() or len(raw) > 15:
        raise TusError(400, "upload_offset_invalid", "Upload-Offset must be a whole number of bytes.")
    return int(raw)


def parse_metadata(header: str) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64(value)`` pairs (a key alone has the value '')."""
    if len(header) > MAX_METADATA:
        raise TusError(400, "metadata_invalid", f"Upload-Metadata may be at most {MAX_METADATA} bytes.")
    metadata: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, encoded = pair.partition(" ")
        if not METADATA_KEY.match(key) or key in metadata:
            raise TusError(400, "metadata_invalid", f"Upload-Metadata: {key[:64]!r} is not a key, or appears twice.")
        try:
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise TusError(400, "metadata_invalid", f"Upload-Metadata: the value of {key!r} is not base64 "
                           "of UTF-8 text.") from None
    return metadata


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: bytes


def parse_checksum(request: web.Request) -> Checksum | None:
    raw = request.headers.get("Upload-Checksum")
    if raw is None:
        return None
    algorithm, _, encoded = raw.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise TusError(400, "checksum_invalid", f"Upload-Checksum: the algorithm must be one of "
                       f"{', '.join(CHECKSUMS)}.")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != CHECKSUMS[algorithm]().digest_size:
        raise TusError(400, "checksum_invalid", f"Upload-Checksum: not a base64 {algorithm} digest.")
    return Checksum(algorithm, digest)


@dataclass
class UploadLocks:
    """One asyncio lock per upload, forgotten when nobody holds or waits for it."""

    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _users: dict[str, int] = field(default_factory=dict)
    _taken: asyncio.Condition = field(default_factory=asyncio.Condition)

    @contextlib.asynccontextmanager
    async def hold(self, upload_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(upload_id, asyncio.Lock())
        self._users[upload_id] = self._users.get(upload_id, 0) + 1
        try:
            async with lock:
                async with self._taken:
                    self._taken.notify_all()
                yield
        finally:
            self._users[upload_id] -= 1
            if not self._users[upload_id]:
                del self._users[upload_id], self._locks[upload_id]

    def held(self, upload_id: str) -> bool:
        lock = self._locks.get(upload_id)
        return lock is not None and lock.locked()

    def waited_for(self, upload_id: str) -> bool:
        """Whether a request waits for this upload while another holds it."""
        return self._users.get(upload_id, 0) > 1

    async def until_held(self, upload_id: str, timeout: float = 10.0) -> None:
        """Return once a request holds this upload (for monitoring and tests)."""
        async with self._taken:
            await asyncio.wait_for(self._taken.wait_for(lambda: self.held(upload_id)), timeout)


@dataclass(frozen=True)
class Chunk:
    kept: int  # bytes that now count (fsynced)
    broken: bool  # the body ended before it should have, or stalled


async def receive_chunk(
    content: aiohttp.StreamReader, path: Path, offset: int, room: int, declared: int | None, checksum: Checksum | None,
    idle_timeout: float = READ_IDLE_TIMEOUT, superseded: Callable[[], bool] | None = None,
    supersede_idle: float = SUPERSEDE_IDLE,
) -> Chunk:
    """Stream one PATCH body into ``path`` at ``offset``, fsync, and say how much of it counts.

    ``room`` is the most this PATCH may bring; ``declared`` its Content-Length, if it sent one; a body
    that brings nothing for ``idle_timeout`` seconds counts as broken off, and so does one silent for
    ``supersede_idle`` seconds while ``superseded()`` says a newer request waits for the upload.
    Raises TusError on a checksum mismatch or an over-long body; nothing of the chunk counts then.
    """
    digest = CHECKSUMS[checksum.algorithm]() if checksum else None
    received = 0
    broken = False
    loop = asyncio.get_running_loop()
    with await asyncio.to_thread(path.open, "r+b") as f:
        f.truncate(offset)  # anything past the recorded offset was never acknowledged
        f.seek(offset)
        try:
            heard_at = loop.time()
            while True:
                try:
                    block = await asyncio.wait_for(content.read(READ_BLOCK), min(idle_timeout, IDLE_CHECK))
                except TimeoutError:
                    silent = loop.time() - heard_at
                    if silent >= idle_timeout or (silent >= supersede_idle and superseded is not None
                                                  and superseded()):
                        broken = True
                        break
                    continue
                except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError):
                    broken = True
                    break
                heard_at = loop.time()
                if not block:
                    break
                received += len(block)
                if received > room:
                    raise TusError(413, "too_large", f"This PATCH brings more than the {room} bytes it may: "
                                   "the upload's length, or the server's largest chunk.")
                if digest is not None:
                    digest.update(block)
                f.write(block)
            broken = broken or (declared is not None and received < declared)
            if checksum is not None and digest is not None and not broken and digest.digest() != checksum.digest:
                raise TusError(460, "checksum_mismatch", "The chunk does not match its Upload-Checksum; nothing "
                               "of it was kept. Send it again.")
            # A checksummed chunk counts whole or not at all; without one, what arrived counts (tus core).
            kept = 0 if checksum is not None and broken else received
            f.truncate(offset + kept)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        except BaseException:
            f.truncate(offset)
            raise
    return Chunk(kept, broken)


class BlockRefused(TusError):
    """A block of a block stream was refused; the blocks before it count (``kept``)."""

    def __init__(self, status: int, code: str, message: str, kept: int) -> None:
        super().__init__(status, code, message)
        self.kept = kept


async def receive_blocks(
    content: aiohttp.StreamReader, path: Path, offset: int, room: int, on_block: Callable[[int], None],
    idle_timeout: float = READ_IDLE_TIMEOUT, superseded: Callable[[], bool] | None = None,
    supersede_idle: float = SUPERSEDE_IDLE,
) -> Chunk:
    """Stream a PATCH body of blocks into ``path`` at ``offset``; each block counts once it is verified.

    The body is a sequence of blocks, each ``BLOCK_HEADER`` (its length, 1 to ``MAX_BLOCK`` bytes, and its
    SHA-256) followed by its bytes. A block whose bytes match its SHA-256 is written, fsynced, and then
    ``on_block(new offset)`` records it: one long PATCH is acknowledged block by block (``HEAD`` shows it),
    and a body cut off (an outage, a stall as in ``receive_chunk``) keeps every block before the cut, none
    of the cut one. A block that does not match (``460 checksum_mismatch``), is malformed, or brings the
    upload past ``room`` ends the PATCH with ``BlockRefused``; the blocks before it still count.
    """
    kept = 0
    loop = asyncio.get_running_loop()
    heard_at = loop.time()

    async def read_exactly(size: int) -> bytes | None:
        """``size`` bytes of the body; b"" if it ended cleanly before any of them, None if it broke off, went
        silent or ended inside them."""
        nonlocal heard_at
        parts: list[bytes] = []
        need = size
        while need:
            try:
                part = await asyncio.wait_for(content.read(min(need, READ_BLOCK)), min(idle_timeout, IDLE_CHECK))
            except TimeoutError:
                silent = loop.time() - heard_at
                if silent >= idle_timeout or (silent >= supersede_idle and superseded is not None and superseded()):
                    return None
                continue
            except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError):
                return None
            if not part:
                return b"" if need == size else None
            heard_at = loop.time()
            parts.append(part)
            need -= len(part)
        return b"".join(parts)

    with await asyncio.to_thread(path.open, "r+b") as f:
        f.truncate(offset)  # anything past the recorded offset was never acknowledged
        f.seek(offset)
        try:
            while True:
                header = await read_exactly(BLOCK_HEADER.size)
                if not header:
                    return Chunk(kept, broken=header is None)  # b"": the body ended at a block's edge
                size, digest = BLOCK_HEADER.unpack(header)
                if not 0 < size <= MAX_BLOCK:
                    raise BlockRefused(400, "block_invalid", f"A block must bring 1 to {MAX_BLOCK} bytes; the blocks "
                                       "before it were kept.", kept)
                if kept + size > room:
                    raise BlockRefused(413, "too_large", f"These blocks bring more than the {room} bytes this PATCH "
                                       "may: the upload's length, or the server's largest chunk.", kept)
                block = await read_exactly(size)
                if not block:
                    return Chunk(kept, broken=True)  # cut off inside a block: none of it counts
                if hashlib.sha256(block).digest() != digest:
                    raise BlockRefused(460, "checksum_mismatch", "A block does not match its SHA-256; the blocks "
                                       "before it were kept. Send from the server's Upload-Offset again.", kept)
                f.write(block)
                f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())
                kept += size
                on_block(offset + kept)
        finally:
            f.truncate(offset + kept)


class UploadPolicy(Protocol):
    """What the uploads are for: images.py."""

    max_size: int

    async def begin(self, request: web.Request, length: int, metadata: dict[str, str]) -> Upload:
        """Authenticate and validate a creation, and make (or find) its upload; raises ApiError."""

    async def check_access(self, request: web.Request, upload: Upload) -> None:
        """May this request touch this upload? ApiError (404 for someone else's) when not."""

    async def finish(self, request: web.Request | None, upload: Upload) -> str:
        """Every byte is here: check, store and announce the image; its id. ApiError when it is refused."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _tus_answers(handler: Handler) -> Handler:
    """Refusals as JSON with the tus headers, so a tus client reads them."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            headers = tus_headers(**(exc.headers if isinstance(exc, TusError) else {}))
            return web.json_response({"error": {"code": exc.code, "message": exc.message}}, status=exc.status,
                                     headers=headers)

    return answer


class TusServer:
    """The upload endpoint: ``OPTIONS``/``POST`` on ``prefix``, ``HEAD``/``PATCH`` on ``prefix/<id>``."""

    def __init__(self, store: ImageStore, policy: UploadPolicy, prefix: str = "/api/uploads",
                 max_chunk: int = MAX_CHUNK, read_idle_timeout: float = READ_IDLE_TIMEOUT,
                 supersede_idle: float = SUPERSEDE_IDLE) -> None:
        self.store = store
        self.policy = policy
        self.prefix = prefix
        self.max_chunk = max_chunk
        self.read_idle_timeout = read_idle_timeout
        self.supersede_idle = supersede_idle
        self.locks = UploadLocks()

    def add_routes(self, app: web.Application, names: dict[str, str]) -> None:
        """Register the routes under the given names (``options``, ``create``, ``head``, ``patch``)."""
        app.router.add_route("OPTIONS", self.prefix, _tus_answers(self.options), name=names["options"])
        app.router.add_post(self.prefix, _tus_answers(self.create), name=names["create"])
        app.router.add_route("HEAD", self.prefix + "/{upload_id}", _tus_answers(self.head), name=names["head"])
        app.router.add_patch(self.prefix + "/{upload_id}", _tus_answers(self.patch), name=names["patch"])

    def _progress_headers(self, upload: Upload) -> dict[str, str]:
        headers = tus_headers(**{"Upload-Offset": str(upload.offset), "Upload-Length": str(upload.length)})
        if upload.complete and upload.image_id:
            headers[IMAGE_ID_HEADER] = upload.image_id
        return headers

    async def options(self, request: web.Request) -> web.Response:
        # tus: OPTIONS needs no Tus-Resumable header (a client asks before it knows the version).
        return web.Response(status=204, headers=tus_headers(**{
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
            "Tus-Max-Size": str(self.policy.max_size),
            MAX_CHUNK_HEADER: str(self.max_chunk),
            BLOCKS_HEADER: "sha256",
        }))

    async def create(self, request: web.Request) -> web.Response:
        require_version(request)
        length = parse_length(request)
        metadata = parse_metadata(request.headers.get("Upload-Metadata", ""))
        upload = await self.policy.begin(request, length, metadata)
        if upload.offset == upload.length and not upload.complete and not self.locks.held(upload.id):
            async with self.locks.hold(upload.id):  # every byte is here, but the image was never stored
                await self._finish(request, upload.id)
            upload = self._current(upload.id)
        headers = self._progress_headers(upload)
        headers["Location"] = f"{self.prefix}/{upload.id}"
        return web.Response(status=201, headers=headers)

    def _current(self, upload_id: str) -> Upload:
        upload = self.store.upload(upload_id)
        if upload is None:
            raise TusError(404, "upload_not_found", "There is no such upload (finished uploads are kept, unfinished "
                           "ones for 7 days); create it again.")
        if upload.discarded:
            raise TusError(410, "upload_discarded", "This upload was not an image and was discarded.")
        return upload

    async def _upload(self, request: web.Request) -> Upload:
        require_version(request)
        upload = self.store.upload(request.match_info["upload_id"])
        if upload is None:
            self._current(request.match_info["upload_id"])  # raises upload_not_found
        assert upload is not None
        await self.policy.check_access(request, upload)
        return self._current(upload.id)

    async def head(self, request: web.Request) -> web.Response:
        upload = await self._upload(request)
        return web.Response(status=200, headers=self._progress_headers(upload))

    async def patch(self, request: web.Request) -> web.Response:
        upload = await self._upload(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in (OFFSET_CONTENT_TYPE, BLOCKS_CONTENT_TYPE):
            raise TusError(415, "content_type_invalid", f"PATCH bodies must be sent as {OFFSET_CONTENT_TYPE} (or "
                           f"as {BLOCKS_CONTENT_TYPE}, Nära's blocks).")
        offset = parse_offset(request)
        if content_type == BLOCKS_CONTENT_TYPE:
            return await self._patch_blocks(request, upload, offset)
        checksum = parse_checksum(request)
        declared = request.content_length
        async with self.locks.hold(upload.id):
            upload = self._at_offset(upload.id, offset)
            if upload.complete:
                return web.Response(status=204, headers=self._progress_headers(upload))
            room = min(upload.length - offset, self.max_chunk)
            if declared is not None and declared > room:
                too_long = offset + declared > upload.length
                raise TusError(413, "too_large" if too_long else "chunk_too_large",
                               "More bytes than the upload's length." if too_long
                               else f"At most {self.max_chunk} bytes per PATCH.")
            chunk = await receive_chunk(request.content, self.store.partial_path(upload.id), offset, room,
                                        declared, checksum, self.read_idle_timeout,
                                        lambda: self.locks.waited_for(upload.id), self.supersede_idle)
            if chunk.kept:
                self.store.record_offset(upload.id, offset + chunk.kept)
            if chunk.broken:
                logger.info("upload %s: a PATCH broke off; %d bytes kept", upload.id, chunk.kept)
                raise TusError(400, "upload_interrupted", "The chunk broke off before its end; ask HEAD for the "
                               "offset and go on from there.", self._progress_headers(self._current(upload.id)))
            if offset + chunk.kept == upload.length:
                await self._finish(request, upload.id)
            return web.Response(status=204, headers=self._progress_headers(self._current(upload.id)))

    def _at_offset(self, upload_id: str, offset: int) -> Upload:
        """The upload as stored, once a PATCH's ``Upload-Offset`` is where it stands (a 409 otherwise)."""
        upload = self._current(upload_id)
        if offset != upload.offset:
            raise TusError(409, "offset_mismatch", f"The server has {upload.offset} bytes of this upload; "
                           "send from there.", self._progress_headers(upload))
        return upload

    async def _patch_blocks(self, request: web.Request, upload: Upload, offset: int) -> web.Response:
        """A PATCH of ``BLOCKS_CONTENT_TYPE``: each verified block counts at once (``receive_blocks``)."""
        async with self.locks.hold(upload.id):
            upload = self._at_offset(upload.id, offset)
            if upload.complete:
                return web.Response(status=204, headers=self._progress_headers(upload))
            room = min(upload.length - offset, self.max_chunk)
            try:
                chunk = await receive_blocks(request.content, self.store.partial_path(upload.id), offset, room,
                                             lambda reached: self.store.record_offset(upload.id, reached),
                                             self.read_idle_timeout, lambda: self.locks.waited_for(upload.id),
                                             self.supersede_idle)
            except BlockRefused as exc:
                logger.info("upload %s: a block was refused (%s); %d bytes of the PATCH kept", upload.id, exc.code,
                            exc.kept)
                raise TusError(exc.status, exc.code, exc.message,
                               self._progress_headers(self._current(upload.id))) from None
            if chunk.broken:
                logger.info("upload %s: a PATCH of blocks broke off; %d bytes kept", upload.id, chunk.kept)
                raise TusError(400, "upload_interrupted", "The PATCH broke off; its blocks before the break count. "
                               "Ask HEAD for the offset and go on from there.",
                               self._progress_headers(self._current(upload.id)))
            if offset + chunk.kept == upload.length:
                await self._finish(request, upload.id)
            return web.Response(status=204, headers=self._progress_headers(self._current(upload.id)))

    async def _finish(self, request: web.Request | None, upload_id: str) -> None:
        try:
            await self.policy.finish(request, self._current(upload_id))
        except TusError:
            raise
        except ApiError as exc:  # the server's offset after a refusal (0 after a whole-image checksum mismatch)
            upload = self.store.upload(upload_id)
            headers = self._progress_headers(upload) if upload is not None else {}
            raise TusError(exc.status, exc.code, exc.message, headers) from None

    async def finish_pending(self) -> int:
        """Complete the uploads a crash left with every byte but no image (at start-up); how many."""
        done = 0
        for upload in self.store.recover():
            async with self.locks.hold(upload.id):
                try:
                    await self.policy.finish(None, upload)
                    done += 1
                except ApiError as exc:
                    logger.info("upload %s could not be completed after a restart: %s", upload.id, exc.code)
        return done
