"""Test helpers for images: photos to upload, and a small tus client that does exactly what it is told."""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import cv2
import numpy as np

TUS = {"Tus-Resumable": "1.0.0"}


def photo(width: int = 1600, height: int = 1200, seed: int = 1, kind: str = ".jpg") -> bytes:
    """A photo-like picture (gradient, a 'wound', noise), different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    picture = np.zeros((height, width, 3), np.uint8)
    picture[..., 0] = (x * 255 // width).astype(np.uint8)
    picture[..., 1] = (y * 255 // height).astype(np.uint8)
    picture[..., 2] = 120 + seed % 100
    cv2.circle(picture, (width // 2, height // 2), min(width, height) // 5, (40, 40, 180), -1)
    picture = cv2.add(picture, rng.integers(0, 40, picture.shape, dtype=np.uint8))
    ok, encoded = cv2.imencode(kind, picture, [cv2.IMWRITE_JPEG_QUALITY, 92] if kind == ".jpg" else [])
    assert ok
    return encoded.tobytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metadata(consultation: str, data: bytes, **overrides: str) -> dict[str, str]:
    meta = {
        "consultation": consultation,
        "image_id": str(uuid.uuid4()),
        "sha256": sha256_hex(data),
        "content_type": "image/jpeg",
        "body_site": "heel_left",
        "captured_at": "2025-03-04T10:15:00+01:00",
        "consent": "yes",
        "device": "Kit 7",
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def encode_metadata(meta: dict[str, str]) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in meta.items())


def chunk_checksum(chunk: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, chunk).digest()).decode()}"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and "error" in self.body:
            return str(self.body["error"]["code"])
        return None

    @property
    def offset(self) -> int:
        return int(self.headers["Upload-Offset"])


async def _reply(response: aiohttp.ClientResponse) -> Reply:
    raw = await response.read()
    body: Any = None
    if raw and response.content_type.endswith("json"):
        body = await response.json(content_type=None)
    elif raw:
        body = raw
    return Reply(response.status, dict(response.headers), body)


class TusClient:
    def __init__(self, http: aiohttp.ClientSession, base_url: str, token: str | None) -> None:
        self.http = http
        self.base_url = base_url
        self.token = token

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {**TUS, **extra}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def create(self, meta: dict[str, str], length: int, **extra: str) -> Reply:
        headers = self.headers(**{"Upload-Length": str(length), "Upload-Metadata": encode_metadata(meta)}, **extra)
        async with self.http.post(f"{self.base_url}/api/uploads", headers=headers) as response:
            return await _reply(response)

    async def head(self, location: str) -> Reply:
        async with self.http.head(f"{self.base_url}{location}", headers=self.headers()) as response:
            return await _reply(response)

    async def patch(self, location: str, offset: int, chunk: bytes, checksum: str | None = "auto") -> Reply:
        headers = self.headers(**{"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)})
        if checksum == "auto":
            checksum = chunk_checksum(chunk)
        if checksum is not None:
            headers["Upload-Checksum"] = checksum
        async with self.http.patch(f"{self.base_url}{location}", headers=headers, data=chunk) as response:
            return await _reply(response)

    async def upload(self, data: bytes, meta: dict[str, str], chunk: int = 256 * 1024) -> Reply:
        """Create and send every byte; the last PATCH's reply (or the creation's, if it was complete)."""
        created = await self.create(meta, len(data))
        assert created.status == 201, created
        location, offset = created.headers["Location"], created.offset
        reply = created
        while offset < len(data):
            reply = await self.patch(location, offset, data[offset : offset + chunk])
            if reply.status != 204:
                return reply
            offset = reply.offset
        return reply


async def get(http: aiohttp.ClientSession, url: str, token: str | None) -> Reply:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, headers=headers) as response:
        return await _reply(response)
