"""The pure decisions of the forwarding path, driven with exact numbers and a fake clock."""

from __future__ import annotations

import pytest

from mediaserver.keyframes import KeyframeThrottle
from mediaserver.packet_cache import PacketCache
from mediaserver.rewriter import StreamRewriter, seq_newer
from mediaserver.vp8 import is_keyframe_start
from signalling.ratelimit import TokenBucket


@pytest.mark.parametrize(
    "payload, keyframe",
    [
        (bytes([0x10, 0x00]), True),  # S=1, PID=0, no extension; P=0
        (bytes([0x10, 0x01]), False),  # interframe (P=1)
        (bytes([0x00, 0x00]), False),  # not the start of a partition
        (bytes([0x11, 0x00]), False),  # partition 1
        (bytes([0x90, 0x80, 0x05, 0x00]), True),  # X, I with 7-bit picture id
        (bytes([0x90, 0x80, 0x85, 0x05, 0x00]), True),  # X, I with 15-bit picture id
        (bytes([0x90, 0xE0, 0x85, 0x05, 0x01, 0x20, 0x00]), True),  # I, L, T
        (bytes([0x90, 0xE0, 0x85, 0x05, 0x01, 0x20, 0x01]), False),
        (b"", False),
        (bytes([0x90]), False),  # truncated
    ],
)
def test_vp8_keyframe_detection(payload: bytes, keyframe: bool) -> None:
    assert is_keyframe_start(payload) is keyframe


def test_rewriter_keeps_gaps_and_continues_across_sources() -> None:
    r = StreamRewriter(90000)
    r.switch_source(ssrc=1, first_seq=65534, first_ts=1000, now=0.0)
    assert r.rewrite(65534, 1000, 0.0) == (65534, 1000)
    assert r.rewrite(1, 4000, 0.033) == (1, 4000)  # wraps, gap of one (65535 lost) kept
    assert r.source_seq(65535) == 65535
    # a new source continues right after the last packet, 0.5 s later
    r.switch_source(ssrc=2, first_seq=100, first_ts=7, now=0.533)
    seq, ts = r.rewrite(100, 7, 0.533)
    assert seq == 2
    assert ts == (4000 + 45000) % (1 << 32)
    assert r.source_seq(2) == 100
    # a late (reordered) packet does not move the high-water mark
    r.rewrite(99, 4, 0.6)
    assert r.last_out_seq == 2


def test_seq_newer_wraps() -> None:
    assert seq_newer(1, 65535)
    assert not seq_newer(65535, 1)
    assert not seq_newer(5, 5)


def test_packet_cache_holds_recent_and_drops_duplicates() -> None:
    cache: PacketCache[str] = PacketCache(4)
    assert cache.store(10, "a")
    assert not cache.store(10, "a again")
    assert cache.get(10) == "a"
    cache.store(14, "e")  # same slot, evicts 10
    assert cache.get(10) is None
    assert cache.get(14) == "e"
    with pytest.raises(ValueError):
        PacketCache(3)


def test_keyframe_requests_are_merged_within_the_interval() -> None:
    t = KeyframeThrottle(interval=0.5)
    assert t.request(10.0)
    assert not t.request(10.1)  # merged, but remembered
    assert not t.due(10.4)
    assert t.due(10.5)  # sent once the interval is over
    assert not t.due(10.6)
    assert not t.request(10.7)
    t.keyframe_seen()  # the publisher sent one anyway
    assert not t.due(11.5)
    assert t.request(11.5)


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5
    assert bucket.take()
    assert not bucket.take()


def test_resends_once_per_round_trip_and_within_a_share_of_the_rate() -> None:
    from mediaserver.forwarder import ResendLimit

    limit = ResendLimit(share=0.5, floor=40_000, burst=0.25)
    rate = 400_000  # the stream: half of it, 25 kB/s, may go to retransmissions
    assert limit.allow(1, 1000, now=0.0, rtt=0.2, rate=rate)
    assert not limit.allow(1, 1000, now=0.1, rtt=0.2, rate=rate), "again within the round trip"
    assert limit.allow(1, 1000, now=0.25, rtt=0.2, rate=rate), "the resend was lost too: once more"
    # A NACK for a whole queue's worth: only the bucket's 0.25 s worth goes out at once.
    allowed = sum(limit.allow(seq, 1000, now=0.3, rtt=0.2, rate=rate) for seq in range(100, 200))
    assert 4 <= allowed <= 7
    later = sum(limit.allow(seq, 1000, now=1.3, rtt=0.2, rate=rate) for seq in range(200, 300))
    assert 5 <= later <= 7  # refilled at 25 kB/s, capped at the burst


def test_the_size_of_a_vp8_keyframe_is_read_from_its_first_packet() -> None:
    import av

    from mediaserver.video_encoders import Vp8Encoder
    from mediaserver.video_payloads import vp8_payloads
    from mediaserver.vp8 import keyframe_size

    encoder = Vp8Encoder(320, 240, 15, 300_000)
    frame = av.VideoFrame(320, 240, "yuv420p")
    encoded = encoder.encode(frame, 0)
    assert encoded is not None and encoded.keyframe
    payloads = vp8_payloads(encoded, picture_id=1)
    assert keyframe_size(payloads[0]) == (320, 240)
    assert keyframe_size(payloads[-1]) is None if len(payloads) > 1 else True
    encoder.close()


def test_a_packet_asked_for_before_the_link_could_have_lost_it_is_not_resent() -> None:
    from mediaserver.forwarder import ResendLimit

    limit = ResendLimit()
    limit.sent(7, now=10.0)
    # The link answers in 60 ms, and its queue holds another 140: asked for 100 ms after it went, it is queued.
    assert not limit.allow(7, 100, now=10.1, rtt=0.06, rate=30_000, transit=0.2)
    assert limit.allow(7, 100, now=10.25, rtt=0.06, rate=30_000, transit=0.2)  # later than that: lost
    limit.sent(8, now=11.0)
    assert limit.allow(8, 100, now=11.1, rtt=0.06, rate=30_000, transit=None)  # nothing known of the link


def test_noting_every_packet_sent_leaves_the_collectors_young_pass_nothing_to_walk() -> None:
    from mediaserver.forwarder import ResendLimit

    from .gc_helpers import young_objects_after

    limit = ResendLimit()

    def forward_a_minute() -> None:  # a subscriber's minute of video: noted once per packet, as it is forwarded
        for seq in range(3000):
            limit.sent(seq, now=seq * 0.02)

    young = young_objects_after(forward_a_minute)
    assert young < 10  # not one per packet kept
    assert limit.on_its_way(2999, now=59.99, transit=0.2) and not limit.on_its_way(1975, now=59.99, transit=0.2)


def test_an_ask_that_comes_a_round_trip_after_the_packet_went_is_for_a_lost_one() -> None:
    from mediaserver.forwarder import ResendLimit

    # A 100 ms link without a queue, its round trip measured at 106 ms: the hole the next packet showed is
    # asked for right at that, a few milliseconds under it (the measure's own noise). Refused, the frame
    # would wait another round trip.
    limit = ResendLimit()
    limit.sent(7, now=10.0)
    assert limit.allow(7, 100, now=10.101, rtt=0.1, rate=300_000, transit=0.106)
    limit.sent(8, now=11.0)
    assert not limit.allow(8, 100, now=11.05, rtt=0.1, rate=300_000, transit=0.106)  # sooner: still on its way


def test_an_audio_receiver_asking_for_most_of_its_packets_hears_a_queue_and_gets_no_resends() -> None:
    from mediaserver.forwarder import ResendLimit

    limit = ResendLimit(late_share=0.5)
    for seq in range(100):  # two seconds of audio, every twentieth packet lost and asked for
        limit.sent(seq, now=seq * 0.02)
    assert limit.allow(95, 100, now=2.0, rtt=0.05, rate=30_000)
    # A queue fills: every packet comes late, and the receiver asks for each one as it is due.
    answered = []
    for seq in range(100, 150):
        limit.sent(seq, now=seq * 0.02)
        answered.append(limit.allow(seq - 3, 100, now=seq * 0.02 + 0.01, rtt=0.05, rate=30_000))
    assert answered[:3] == [True] * 3 and not any(answered[20:])


def test_a_burst_of_lost_audio_asked_for_three_times_is_still_resent() -> None:
    from mediaserver.forwarder import ResendLimit

    limit = ResendLimit(late_share=0.5)
    for seq in range(100):
        limit.sent(seq, now=seq * 0.02)
    # Four packets of a burst lost; the receiver asks for each three times, a repair time apart.
    answered = [limit.allow(seq, 100, now=2.0 + ask * 0.06, rtt=0.05, rate=30_000)
                for ask in range(3) for seq in (96, 97, 98, 99)]
    assert all(answered)  # a packet asked for again is one loss, not one more


def test_a_video_ask_and_its_echo_are_answered_once_and_counted_as_one_loss() -> None:
    from mediaserver.forwarder import ECHO_WINDOW, ResendLimit

    limit = ResendLimit()
    limit.sent(7, now=10.0)
    assert limit.new_asks([7], now=10.1) == 1 and limit.allow(7, 1000, now=10.1, rtt=0.1, rate=800_000)
    # Nära's receive path sends each first ask twice, 30 ms apart, in case one is lost on the way
    assert limit.new_asks([7], now=10.13) == 0 and not limit.allow(7, 1000, now=10.13, rtt=0.1, rate=800_000)
    # asked for again a repair's time later: its resend was lost, a loss of its own kind, answered anew
    assert limit.new_asks([7, 9], now=10.13 + ECHO_WINDOW + 0.1) == 2
    assert limit.allow(7, 1000, now=10.13 + ECHO_WINDOW + 0.1, rtt=0.1, rate=800_000)


def test_a_full_packet_is_resent_even_on_a_stream_measured_at_the_floor() -> None:
    from mediaserver.forwarder import ResendLimit

    # The lowest layer, or a subscriber just moved up from it whose stream is still measured at 60 kbit/s:
    # a quarter second of the 40 kbit/s floor is 1250 bytes. The keyframe's full packets must still be
    # resent (they were refused outright, and the picture waited for the next keyframe).
    limit = ResendLimit()
    assert limit.allow(1, 1300, now=0.0, rtt=0.1, rate=60_000)
    assert not limit.allow(2, 1300, now=0.01, rtt=0.1, rate=60_000)  # the bucket, spent, refills at 5 kB/s
    assert limit.allow(2, 1300, now=0.3, rtt=0.1, rate=60_000)
