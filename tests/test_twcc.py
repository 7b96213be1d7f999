"""The transport feedback packet (RTCP RTPFB FMT 15), what a receiver keeps and what a sender keeps."""

from __future__ import annotations

import struct

import pytest

from mediaserver.twcc import (
    FeedbackError,
    FeedbackRecorder,
    SendHistory,
    encode_feedback,
    parse_feedback,
    transport_feedbacks,
)


def chromium_shaped(base: int, count: int, reference: int, feedback_count: int, chunks: list[int],
                    deltas: bytes) -> bytes:
    """A feedback packet laid out by hand, as Chromium's writes them."""
    body = struct.pack("!HHL", base, count, ((reference & 0xFFFFFF) << 8) | feedback_count)
    body += b"".join(struct.pack("!H", c) for c in chunks) + deltas
    padding = -len(body) % 4
    first = 0x80 | 15
    if padding:
        body += bytes(padding - 1) + bytes([padding])
        first |= 0x20
    return struct.pack("!BBHLL", first, 205, (8 + len(body)) // 4, 0x11111111, 0x22222222) + body


def test_a_run_length_chunk_and_small_deltas() -> None:
    # 5 packets received, deltas 1, 2, 3, 4, 5 ms (4, 8, ... quarter milliseconds)
    data = chromium_shaped(100, 5, 10, 7, [(1 << 13) | 5], bytes([4, 8, 12, 16, 20]))
    feedback = parse_feedback(data)
    assert (feedback.base_sequence, feedback.feedback_count, feedback.reference_time) == (100, 7, 10)
    base = 10 * 64_000
    assert feedback.arrivals == [base + 1000, base + 3000, base + 6000, base + 10000, base + 15000]
    assert (feedback.sender_ssrc, feedback.media_ssrc) == (0x11111111, 0x22222222)


def test_one_bit_status_vectors_with_losses() -> None:
    # received, lost, received, then 11 lost (a 14-symbol one-bit vector); count 3 leaves the rest out
    chunk = 0x8000 | (1 << 13) | (0 << 12) | (1 << 11)
    feedback = parse_feedback(chromium_shaped(65534, 3, 1, 0, [chunk], bytes([0, 4])))
    assert feedback.packets() == [(65534, 64_000), (65535, None), (0, 65_000)]


def test_two_bit_status_vectors_with_large_and_negative_deltas() -> None:
    # large (+10 s is too far: +8 s), negative (-3 ms), small
    chunk = 0xC000 | (2 << 12) | (2 << 10) | (1 << 8)
    deltas = struct.pack("!h", 32000) + struct.pack("!h", -12) + bytes([40])
    feedback = parse_feedback(chromium_shaped(7, 3, -2, 255, [chunk], deltas))
    start = -2 * 64_000
    assert feedback.reference_time == -2
    assert feedback.arrivals == [start + 8_000_000, start + 8_000_000 - 3000, start + 8_000_000 + 7000]


def test_encoding_round_trips_through_every_chunk_kind() -> None:
    arrivals: list[int | None] = [1_000_000 + 1000 * i for i in range(20)]  # a long run of small deltas
    arrivals += [None, 1_030_000, None, None, 1_031_000, 1_031_250, None, 1_032_000]  # a one-bit vector
    arrivals += [1_020_000, 2_000_000, None, 2_000_500]  # negative and large: a two-bit vector
    arrivals += [None] * 9 + [2_100_000]  # a run of losses
    data = encode_feedback(1, 2, 65530, 3, arrivals)
    assert len(data) % 4 == 0
    feedback = parse_feedback(data)
    assert feedback.base_sequence == 65530 and feedback.feedback_count == 3
    assert feedback.arrivals == arrivals
    assert feedback.packets()[6][0] == 0  # (sequence numbers wrap)


def test_arrivals_are_kept_to_a_quarter_millisecond_without_drift() -> None:
    arrivals: list[int | None] = [5_000_000 + 1100 * i + (i % 3) * 70 for i in range(300)]
    feedback = parse_feedback(encode_feedback(1, 2, 0, 0, arrivals))
    assert all(abs(got - want) <= 125 for got, want in zip(feedback.arrivals, arrivals, strict=True))  # type: ignore[operator]


@pytest.mark.parametrize("data", [
    b"",
    bytes(20),  # not version 2
    chromium_shaped(0, 5, 0, 0, [(1 << 13) | 5], bytes([1, 2])),  # deltas missing
    chromium_shaped(0, 40, 0, 0, [(1 << 13) | 5], bytes([1] * 5)),  # status chunks missing
    chromium_shaped(0, 2, 0, 0, [(3 << 13) | 2], b""),  # the reserved symbol
])
def test_malformed_packets_are_refused_with_a_stable_code(data: bytes) -> None:
    with pytest.raises(FeedbackError) as refused:
        parse_feedback(data)
    assert refused.value.code == "twcc_malformed"


def test_a_compound_datagram_gives_its_transport_feedback_and_skips_the_rest() -> None:
    receiver_report = struct.pack("!BBHL", 0x80, 201, 1, 1)
    nack = struct.pack("!BBHLLHH", 0x81, 205, 3, 1, 2, 10, 0)
    good = encode_feedback(1, 2, 10, 0, [1000, None, 2000])
    broken = chromium_shaped(0, 40, 0, 0, [(1 << 13) | 5], bytes([1] * 5))
    found = transport_feedbacks(receiver_report + nack + good + broken)
    assert [f.base_sequence for f in found] == [10]


def test_the_recorder_describes_each_packet_once_in_order_with_losses() -> None:
    recorder = FeedbackRecorder(sender_ssrc=9)
    assert recorder.feedback() is None
    for seq, at in ((65534, 1_000), (65535, 2_000), (1, 5_000)):  # 0 lost, across the wrap
        recorder.on_packet(seq, at, media_ssrc=77)
    first = parse_feedback(recorder.feedback() or b"")
    assert first.packets() == [(65534, 1_000), (65535, 2_000), (0, None), (1, 5_000)]
    assert first.media_ssrc == 77 and first.feedback_count == 0
    assert recorder.feedback() is None  # nothing new
    recorder.on_packet(0, 6_000)  # too late: described as lost already
    recorder.on_packet(3, 9_000)
    recorder.on_packet(2, 8_000)  # reordered
    second = parse_feedback(recorder.feedback() or b"")
    assert second.packets() == [(2, 8_000), (3, 9_000)] and second.feedback_count == 1


def test_the_recorder_starts_a_new_packet_where_a_delta_would_not_fit() -> None:
    recorder = FeedbackRecorder(sender_ssrc=9)
    recorder.on_packet(10, 1_000_000)
    recorder.on_packet(11, 20_000_000)  # 19 s later
    first = parse_feedback(recorder.feedback() or b"")
    second = parse_feedback(recorder.feedback() or b"")
    assert first.packets() == [(10, 1_000_000)]
    assert second.packets()[0][0] == 11 and abs((second.arrivals[0] or 0) - 20_000_000) <= 125


def test_the_send_history_matches_feedback_to_what_was_sent_and_forgets_the_oldest() -> None:
    history = SendHistory(capacity=16)
    sequences = [history.take(100.0 + i / 100, 1000 + i, copy=(i % 2 == 1)) for i in range(20)]
    assert sequences == list(range(20))
    results = history.results(parse_feedback(encode_feedback(1, 2, 2, 0, [1000 * i for i in range(1, 19)])))
    # 2 and 3 were overwritten by 18 and 19: only 4..19 are still known
    assert [r.sequence for r in results] == list(range(4, 20))
    assert results[0].sent == pytest.approx(100.04) and results[0].size == 1004 and not results[0].copy
    assert results[1].copy and results[1].arrival == pytest.approx(0.004)  # (seq 5: the fourth described)


def test_the_send_history_wraps_its_sequence_numbers() -> None:
    history = SendHistory(capacity=16)
    history.next = 65530
    for i in range(10):
        history.take(float(i), 100)
    results = history.results(parse_feedback(encode_feedback(1, 2, 65534, 0, [1000, 2000, None, 4000])))
    assert [(r.sequence & 0xFFFF, r.sent, r.arrival) for r in results] == [
        (65534, 4.0, 0.001), (65535, 5.0, 0.002), (0, 6.0, None), (1, 7.0, 0.004)]


def test_feedback_describing_more_than_the_ring_holds_is_not_matched() -> None:
    history = SendHistory(capacity=16)
    for i in range(16):
        history.take(float(i), 100)
    flood = encode_feedback(1, 2, 0, 0, [1000] + [None] * 8000 + [2000])  # (a few dozen bytes)
    assert len(flood) < 64
    assert history.results(parse_feedback(flood)) == []
