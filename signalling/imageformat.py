"""Is it an image? Magic bytes, pixel size from the header, a full decode, and the thumbnail.

An upload is stored only when its bytes start as its ``content_type`` says,
its header names a size the server is willing to decode (a small PNG can
claim billions of pixels), and OpenCV decodes it. The thumbnail is a JPEG at
most ``THUMBNAIL_WIDTH`` pixels wide, upright (OpenCV applies the EXIF
orientation when it decodes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")
MAX_PIXELS = 100_000_000  # a 64-megapixel phone camera fits; a decompression bomb does not
THUMBNAIL_WIDTH = 320
THUMBNAIL_QUALITY = 80

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, 0xD8, *range(0xD0, 0xD8)}


class NotAnImage(Exception):
    """The bytes are not a decodable image of the type they claim to be."""


@dataclass(frozen=True)
class DecodedImage:
    width: int
    height: int
    thumbnail: bytes  # JPEG


def matches_type(content_type: str, head: bytes) -> bool:
    """Do the first bytes look like ``content_type``?"""
    if content_type == "image/jpeg":
        return head[:3] == b"\xff\xd8\xff"
    if content_type == "image/png":
        return head[:8] == b"\x89PNG\r\n\x1a\n"
    if content_type == "image/webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return False


def header_size(content_type: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) as the file's header states it, or None when the header cannot be read."""
    try:
        if content_type == "image/png":
            if data[12:16] != b"IHDR":
                return None
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if content_type == "image/webp":
            return _webp_size(data)
        if content_type == "image/jpeg":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            pos += 2
            continue
        if marker == 0xDA:  # image data before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def decode(content_type: str, data: bytes) -> DecodedImage:
    """Check ``data`` is an image of ``content_type`` and make its thumbnail; NotAnImage otherwise.

    CPU-bound (a 12-megapixel JPEG takes a few hundred milliseconds): run it in a thread.
    """
    if content_type not in CONTENT_TYPES:
        raise NotAnImage(f"{content_type!r} is not one of {', '.join(CONTENT_TYPES)}")
    if not matches_type(content_type, data[:16]):
        raise NotAnImage(f"the bytes do not begin as {content_type} does")
    size = header_size(content_type, data)
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise NotAnImage(f"the {content_type} header states no picture size")
    if size[0] * size[1] > MAX_PIXELS:
        raise NotAnImage(f"{size[0]}x{size[1]} pixels is more than the {MAX_PIXELS // 1_000_000} megapixels accepted")
    picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if picture is None or picture.size == 0:
        raise NotAnImage(f"the bytes could not be decoded as {content_type}")
    height, width = picture.shape[:2]
    return DecodedImage(width, height, thumbnail(picture))


def thumbnail(picture: np.ndarray) -> bytes:
    height, width = picture.shape[:2]
    if width > THUMBNAIL_WIDTH:
        size = (THUMBNAIL_WIDTH, max(1, round(height * THUMBNAIL_WIDTH / width)))
        picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    if not ok:
        raise NotAnImage("no thumbnail could be made")
    return encoded.tobytes()
