"""A PATCH of checksummed blocks (Nära's own beside tus): one long PATCH counts block by block, keeps the
verified blocks before a cut or a damaged block, and the image arrives whole."""

from __future__ import annotations

import asyncio
import hashlib
import struct

import aiohttp

from signalling.tus import BLOCK_HEADER, BLOCKS_CONTENT_TYPE

from .conftest import RunningServer
from .image_helpers import TUS, TusClient, get, metadata, photo

BLOCK = 16 * 1024


def blocks(data: bytes, size: int = BLOCK) -> list[bytes]:
    """``data`` as a body of blocks, each with its length and SHA-256."""
    return [BLOCK_HEADER.pack(len(part), hashlib.sha256(part).digest()) + part
            for part in (data[at:at + size] for at in range(0, len(data), size))]


async def open_blocks_patch(server: RunningServer, location: str, token: str, offset: int,
                            declared: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A PATCH of blocks promising ``declared`` bytes of body, on a connection the test writes to."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
    lines = [f"PATCH {location} HTTP/1.1", "Host: 127.0.0.1", "Tus-Resumable: 1.0.0", f"Authorization: Bearer {token}",
             f"Content-Type: {BLOCKS_CONTENT_TYPE}", f"Upload-Offset: {offset}", f"Content-Length: {declared}"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


async def patch_blocks(http: aiohttp.ClientSession, server: RunningServer, location: str, token: str, offset: int,
                       body: bytes) -> tuple[int, dict[str, str], bytes]:
    headers = {**TUS, "Authorization": f"Bearer {token}", "Content-Type": BLOCKS_CONTENT_TYPE,
               "Upload-Offset": str(offset)}
    async with http.patch(f"{server.url}{location}", headers=headers, data=body) as response:
        return response.status, dict(response.headers), await response.read()


async def offset_reaches(client: TusClient, location: str, offset: int, timeout: float = 10.0) -> None:
    """Until the server's HEAD shows ``offset`` (each verified block counts at once, mid-PATCH)."""
    async with asyncio.timeout(timeout):
        while (await client.head(location)).offset != offset:
            await asyncio.sleep(0.02)  # polling the server's answer, bounded by the timeout


async def stored(http: aiohttp.ClientSession, server: RunningServer, room: str, image_id: str) -> bytes:
    reply = await get(http, f"{server.url}/api/images/{image_id}?consultation={room}", server.token(room))
    assert isinstance(reply.body, bytes)
    return reply.body


async def test_a_long_patch_counts_block_by_block_and_a_cut_keeps_the_blocks_before_it(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(800, 600, seed=21)
    token = server.token(room, role="kit")
    frames = blocks(data)
    assert len(frames) > 4
    async with aiohttp.ClientSession() as http:
        async with http.options(f"{server.url}/api/uploads") as r:
            assert r.headers["Nara-Blocks"] == "sha256"
        client = TusClient(http, server.url, token)
        location = (await client.create(metadata(room, data), len(data))).headers["Location"]

        # One PATCH for the whole image; two blocks and half of the third arrive, then the link dies.
        _, writer = await open_blocks_patch(server, location, token, 0, sum(map(len, frames)))
        writer.write(frames[0] + frames[1] + frames[2][:BLOCK // 2])
        await writer.drain()
        await offset_reaches(client, location, 2 * BLOCK)  # acknowledged while the PATCH is still open
        listing = await get(http, f"{server.url}/api/consultations/{room}/images", server.token(room))
        assert listing.body == {"images": []}, "nothing partial shows"
        writer.transport.abort()

        # Back on a new connection: from the server's offset, the rest in one PATCH of blocks.
        status, headers, _ = await patch_blocks(http, server, location, token, 2 * BLOCK, b"".join(frames[2:]))
        assert status == 204 and int(headers["Upload-Offset"]) == len(data)
        assert await stored(http, server, room, headers["Nara-Image-Id"]) == data


async def test_a_damaged_block_is_refused_and_the_blocks_before_it_count(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(800, 600, seed=22)
    token = server.token(room, role="kit")
    frames = blocks(data)
    damaged = bytearray(frames[1])
    damaged[BLOCK_HEADER.size + 100] ^= 0xFF
    async with aiohttp.ClientSession() as http:
        client = TusClient(http, server.url, token)
        location = (await client.create(metadata(room, data), len(data))).headers["Location"]
        status, headers, body = await patch_blocks(http, server, location, token, 0,
                                                   frames[0] + bytes(damaged) + frames[2])
        assert status == 460 and b"checksum_mismatch" in body
        assert int(headers["Upload-Offset"]) == BLOCK, "the block before the damaged one counts"

        # A block of no bytes, and blocks past the image's end: refused, the blocks before them kept.
        status, headers, body = await patch_blocks(http, server, location, token, BLOCK,
                                                   frames[1] + struct.pack(">I32s", 0, bytes(32)))
        assert status == 400 and b"block_invalid" in body and int(headers["Upload-Offset"]) == 2 * BLOCK
        rest = b"".join(frames[2:])
        status, headers, body = await patch_blocks(http, server, location, token, 2 * BLOCK, rest + blocks(b"x")[0])
        assert status == 413 and b"too_large" in body and int(headers["Upload-Offset"]) == len(data)
        reply = await client.patch(location, len(data), b"", checksum=None)  # the last block was kept: done
        assert reply.status == 204
        assert await stored(http, server, room, reply.headers["Nara-Image-Id"]) == data
