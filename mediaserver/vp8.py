"""What the SFU needs to know about a VP8 RTP payload (RFC 7741), without decoding."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class PayloadDescriptor:
    """The VP8 payload descriptor at the start of every VP8 RTP payload (RFC 7741 §4.2)."""

    size: int  # bytes the descriptor takes; the VP8 data follows
    non_reference: bool  # N: no other frame refers to this one, so losing it breaks nothing
    start_of_partition: bool  # S
    partition_id: int  # PID
    picture_id: int | None = None  # 7 or 15 bits
    tl0_pic_idx: int | None = None
    temporal_layer: int | None = None  # TID
    layer_sync: bool | None = None  # Y
    key_index: int | None = None  # KEYIDX

    @property
    def starts_frame(self) -> bool:
        """The first packet of a frame: start of partition 0."""
        return self.start_of_partition and self.partition_id == 0


def parse_descriptor(payload: bytes) -> PayloadDescriptor:
    """Read the payload descriptor; raises ValueError when the payload is too short for it."""
    if not payload:
        raise ValueError("empty VP8 payload")
    first = payload[0]
    size = 1
    picture_id = tl0_pic_idx = temporal_layer = key_index = None
    layer_sync = None
    if first & 0x80:  # X
        if len(payload) < 2:
            raise ValueError("VP8 payload descriptor cut short")
        ext = payload[1]
        size = 2
        if ext & 0x80:  # I
            if len(payload) <= size:
                raise ValueError("VP8 picture id cut short")
            if payload[size] & 0x80:  # M: 15 bits
                if len(payload) <= size + 1:
                    raise ValueError("VP8 picture id cut short")
                picture_id = ((payload[size] & 0x7F) << 8) | payload[size + 1]
                size += 2
            else:
                picture_id = payload[size] & 0x7F
                size += 1
        if ext & 0x40:  # L
            if len(payload) <= size:
                raise ValueError("VP8 TL0PICIDX cut short")
            tl0_pic_idx = payload[size]
            size += 1
        if ext & 0x30:  # T or K share one byte
            if len(payload) <= size:
                raise ValueError("VP8 TID/KEYIDX cut short")
            byte = payload[size]
            if ext & 0x20:
                temporal_layer = byte >> 6
                layer_sync = bool(byte & 0x20)
            if ext & 0x10:
                key_index = byte & 0x1F
            size += 1
    return PayloadDescriptor(
        size=size,
        non_reference=bool(first & 0x20),
        start_of_partition=bool(first & 0x10),
        partition_id=first & 0x07,
        picture_id=picture_id,
        tl0_pic_idx=tl0_pic_idx,
        temporal_layer=temporal_layer,
        layer_sync=layer_sync,
        key_index=key_index,
    )


def is_keyframe_data(frame: bytes) -> bool:
    """True when VP8 frame data (descriptor stripped) is a keyframe: P=0 in its frame tag."""
    return bool(frame) and (frame[0] & 0x01) == 0


def keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from the first packet of a VP8 keyframe (RFC 6386 §9.1), else None."""
    if not is_keyframe_start(payload):
        return None
    try:
        data = payload[parse_descriptor(payload).size:]
    except ValueError:
        return None
    if len(data) < 10 or data[3:6] != b"\x9d\x01\x2a":  # frame tag, then the keyframe start code
        return None
    width = int.from_bytes(data[6:8], "little") & 0x3FFF
    height = int.from_bytes(data[8:10], "little") & 0x3FFF
    return (width, height) if width and height else None
