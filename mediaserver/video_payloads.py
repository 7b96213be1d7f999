"""Encoded video frames and how they are cut into RTP payloads.

VP8 per RFC 7741 with a 15-bit PictureID; H.264 per RFC 6184 in
packetization mode 1 (single NAL unit packets and FU-A fragments). The
caller writes the RTP header: the marker bit goes on the last payload of a
frame, and every payload of one frame shares the frame's timestamp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_PAYLOAD = 1100  # bytes; leaves room for RTP, SRTP, extensions, TURN and IPv6 on a 1280-byte path


@dataclass(frozen=True)
class EncodedFrame:
    """One encoded picture."""

    data: bytes
    keyframe: bool
    timestamp: int  # 90 kHz RTP clock


_VP8_DESCRIPTOR_SIZE = 4  # X|S|PID, I, M|PictureID (15 bits)


def vp8_payloads(frame: EncodedFrame, picture_id: int, max_size: int = DEFAULT_MAX_PAYLOAD) -> list[bytes]:
    """RTP payloads for one VP8 frame, each at most ``max_size`` bytes.

    Each starts with the RFC 7741 payload descriptor: X=1, then I=1 with a
    15-bit PictureID (M=1). The first has S=1 and PID=0, so a receiver can
    tell where a frame (and a keyframe) begins. The frame is spread evenly
    over as few payloads as fit.
    """
    if max_size <= _VP8_DESCRIPTOR_SIZE:
        raise ValueError("max_size leaves no room for VP8 data")
    data = frame.data
    room = max_size - _VP8_DESCRIPTOR_SIZE
    count = max(1, -(-len(data) // room))
    base, extra = divmod(len(data), count)
    picture = 0x8000 | (picture_id & 0x7FFF)
    payloads = []
    offset = 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        first = 0x90 if i == 0 else 0x80  # X=1, S=1 on the first, PID=0
        descriptor = bytes((first, 0x80, picture >> 8, picture & 0xFF))
        payloads.append(descriptor + data[offset:offset + size])
        offset += size
    return payloads


_START_CODE = re.compile(b"\x00\x00\x01")
_FU_A = 28


def h264_nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (start codes and trailing zeros removed)."""
    starts = [m.end() for m in _START_CODE.finditer(data)]
    units = []
    for i, start in enumerate(starts):
        end = starts[i + 1] - 3 if i + 1 < len(starts) else len(data)
        unit = data[start:end].rstrip(b"\x00")  # the zero of a 4-byte start code, trailing_zero bytes
        if unit:
            units.append(unit)
    return units


def h264_payloads(frame: EncodedFrame, max_size: int = DEFAULT_MAX_PAYLOAD) -> list[bytes]:
    """RTP payloads for one H.264 access unit (Annex B), each at most ``max_size`` bytes.

    A NAL unit that fits goes alone in a payload; a larger one is cut into
    FU-A fragments of nearly equal size.
    """
    if max_size <= 2:
        raise ValueError("max_size leaves no room for H.264 data")
    payloads = []
    for unit in h264_nal_units(frame.data):
        if len(unit) <= max_size:
            payloads.append(unit)
            continue
        indicator = (unit[0] & 0xE0) | _FU_A
        nal_type = unit[0] & 0x1F
        body = unit[1:]
        room = max_size - 2
        count = -(-len(body) // room)
        base, extra = divmod(len(body), count)
        offset = 0
        for i in range(count):
            size = base + (1 if i < extra else 0)
            header = nal_type | (0x80 if i == 0 else 0) | (0x40 if i == count - 1 else 0)
            payloads.append(bytes((indicator, header)) + body[offset:offset + size])
            offset += size
    return payloads
