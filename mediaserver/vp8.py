"""What the SFU needs to know about a VP8 RTP payload (RFC 7741), without decoding."""

from __future__ import annotations


def is_keyframe_start(payload: bytes) -> bool:
    """True when this packet starts a VP8 keyframe.

    A keyframe begins in the packet whose payload descriptor has S=1 and
    PID=0, and whose VP8 payload header has the inverse key frame flag P=0
    (RFC 7741 §4.2 and §4.3).
    """
    if not payload:
        return False
    first = payload[0]
    start_of_partition = first & 0x10
    partition_id = first & 0x07
    if not start_of_partition or partition_id != 0:
        return False
    offset = 1
    if first & 0x80:  # X: extension byte follows
        if len(payload) < 2:
            return False
        ext = payload[1]
        offset = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if len(payload) <= offset:
                return False
            offset += 2 if payload[offset] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            offset += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX
            offset += 1
    if len(payload) <= offset:
        return False
    return (payload[offset] & 0x01) == 0
