"""The NACK caches keep packets as plain values: a resend gets the packet back unchanged, and storing packets
leaves the garbage collector nothing new to walk (issue 9: its passes held a busy worker's loop)."""

from __future__ import annotations

import gc

from aiortc.rtp import RtpPacket

from mediaserver.packet_cache import RtpPacketCache

from .gc_helpers import young_objects_after


def packet(seq: int, audio_level: tuple[bool, int] | None = None) -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=seq % 2, sequence_number=seq, timestamp=seq * 3000, ssrc=1234,
                  payload=bytes([seq % 256]) * 900)
    p.padding_size = 4 if seq % 3 == 0 else 0
    p.extensions.audio_level = audio_level
    return p


def test_a_cached_packet_comes_back_as_it_was_sent_and_only_while_held() -> None:
    cache = RtpPacketCache(8)
    for seq in range(65530, 65540):  # (across the wrap of the sequence numbers)
        assert cache.store(seq % 65536, packet(seq % 65536, (True, seq % 127)))
    assert not cache.store(65539 % 65536, packet(3))  # a duplicate
    for seq in (65534, 65535, 0, 3):
        back, sent = cache.get(seq), packet(seq, (True, (seq if seq > 100 else seq + 65536) % 127))
        assert back is not None
        fields = ("payload_type", "marker", "sequence_number", "timestamp", "ssrc", "payload", "padding_size")
        assert [getattr(back, f) for f in fields] == [getattr(sent, f) for f in fields]
        assert back.extensions.audio_level == sent.extensions.audio_level
    assert cache.get(65531) is None  # overwritten by a newer packet
    cache.clear()
    assert cache.get(3) is None


def test_storing_packets_makes_no_object_the_collector_tracks() -> None:
    cache = RtpPacketCache(1024)
    packets = [packet(seq) for seq in range(3000)]
    gc.collect()
    before = len(gc.get_objects())
    for seq, p in enumerate(packets):
        cache.store(seq, p)
    del packets, p
    gc.collect()
    assert len(gc.get_objects()) <= before - 2000  # the packets went; nothing was kept in their place


def test_storing_audio_packets_leaves_the_collectors_young_pass_nothing_to_walk() -> None:
    cache = RtpPacketCache(1024)

    def store_audio() -> None:  # each packet parsed as it arrives, with its sound level, and stored
        for seq in range(3000):
            cache.store(seq, packet(seq, (seq % 2 == 0, seq % 128)))

    young = young_objects_after(store_audio)
    assert young < 10  # not a level kept per packet
    back = cache.get(2999)
    assert back is not None and back.extensions.audio_level == (False, 2999 % 128)
