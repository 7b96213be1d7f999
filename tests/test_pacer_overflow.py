"""After a subscriber's paced video overflows its queue, nothing from before the keyframe it now waits
for is sent again: resends would mend a picture that keyframe replaces, and held the keyframe up in the
queue in turn (after a link fell from 2 Mbit/s to 300 kbit/s, a second of no picture)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from aiortc.rtp import RtpPacket

from mediaserver.aiortc_adapter import RtcpFeedback
from mediaserver.forwarder import Publication, Subscription, UnknownLink
from mediaserver.pacer import VideoPacer
from mediaserver.rewriter import StreamRewriter

from .test_pacer import FakeTimers


@dataclass
class _Port:
    connected: bool = True
    payload_type: int | None = 96
    round_trip_time: float | None = 0.1
    sent: list[tuple[int, bytes]] = field(default_factory=list)  # (sequence number, payload)

    async def send(self, payload: bytes, *, sequence_number: int, timestamp: int, marker: bool, padding_size: int,
                   audio_level: Any, probe: bool, resend: bool = False) -> None:
        self.sent.append((sequence_number, payload))


async def test_an_overflowed_video_answers_no_asks_until_its_keyframe_and_sends_no_stale_resend() -> None:
    timers = FakeTimers()
    publication = Publication("kit", "video", cast(Any, None), clock=timers.clock)
    port = _Port()
    subscription = Subscription(publication, cast(Any, port), StreamRewriter(90000), UnknownLink())
    subscription.level, subscription.target = publication.source_level, None
    pacer = VideoPacer(clock=timers.clock, schedule=timers.schedule, factor=1.0, burst_time=0.0, queue_limit=0.5)
    subscription.pacer = pacer
    pacer.allow(subscription, 80_000, 0.0)  # 10 kB a second: 5 kB may wait (the pacer's allowance, set here)
    subscription.meter.rate = 80_000.0  # (what the resend budget is a share of)
    sequence = iter(range(100, 200))

    async def arrives(name: str, keyframe: bool = False) -> None:
        seq = next(sequence)
        packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 3000, ssrc=1234)
        # (a VP8 payload descriptor, and the frame's first byte: a keyframe's or another's)
        packet.payload = (b"\x10\x00" if keyframe else b"\x10\x01") + name.encode().ljust(998, b".")
        publication.cache.store(seq, packet)
        if not subscription.forward(publication.source_level, packet, 0):
            await subscription.offer(publication.source_level, packet, keyframe)

    def sent() -> list[str]:
        return [payload[2:].rstrip(b".").decode() for _, payload in port.sent]

    await arrives("frame 1", keyframe=True)
    first_out = port.sent[0][0]
    await arrives("frame 2")
    await arrives("frame 3")  # (these wait: the bucket is empty)
    await subscription.on_feedback(RtcpFeedback("nack", lost=[first_out]))  # queued behind them
    assert len(pacer.resends) == 1 and subscription.stats.retransmitted == 1
    for n in range(4, 9):  # the link fell: more than the queue may hold
        await arrives(f"frame {n}")
    assert subscription.pacing_dropped, "overflowed: waits for a keyframe"
    await subscription.on_feedback(RtcpFeedback("nack", lost=[first_out]))  # asked again: not answered
    assert not pacer.waiting, "nothing of the video waits any more, its resend neither"
    assert subscription.stats.retransmitted == 1
    await arrives("keyframe", keyframe=True)
    assert not subscription.pacing_dropped and pacer.waiting, "the keyframe waits its turn: nothing ahead of it"
    assert pacer.queued_bytes == 1000
    assert sent() == ["frame 1"]
