"""At a subscriber's move to another level, nothing of the level left waits ahead of the new level's keyframe
in its pacer (fake clock): each such packet took its turn when let go, only to be dropped as stale."""

from __future__ import annotations

from typing import Any, cast

from aiortc.rtp import RtpPacket

from mediaserver.forwarder import Publication, Subscription
from mediaserver.pacer import VideoPacer
from mediaserver.rewriter import StreamRewriter

from .test_pacer import FakeTimers
from .test_pacer_overflow import _Port
from .test_steady_probes import LEVELS, ORIGINAL, _Link


class _Call:
    """One publisher's video (without a ladder: each level's packets are given by hand) to one subscriber on
    the original, paced."""

    def __init__(self) -> None:
        self.timers = FakeTimers()
        self.timers.now = 100.0
        self.publication = Publication("kit", "video", cast(Any, None), clock=self.timers.clock)
        self.port = _Port()
        self.subscription = Subscription(self.publication, cast(Any, self.port), StreamRewriter(90000), _Link(1e6))
        self.subscription.level, self.subscription.target = ORIGINAL, None
        self.pacer = VideoPacer(clock=self.timers.clock, schedule=self.timers.schedule, factor=1.0,
                                burst_time=0.0, queue_limit=5.0)
        self.subscription.pacer = self.pacer
        self.pacer.allow(self.subscription, 80_000, self.timers.now)  # 10 kB a second
        self.sequence = {level: iter(range(1000 * level, 1000 * level + 999)) for level, _ in LEVELS}
        self.released: list[str] = []  # what the pacer let go, in order (to be sent, or dropped if stale)
        self.subscription.release = self._released  # type: ignore[method-assign]

    def _released(self, item: Any, waited: float) -> None:
        self.released.append(name(item[0]))

    async def arrives(self, level: int, name: str, keyframe: bool = False) -> None:
        seq = next(self.sequence[level])
        packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 3000, ssrc=10 + level)
        packet.payload = (b"\x10\x00" if keyframe else b"\x10\x01") + name.encode().ljust(998, b".")
        if not self.subscription.forward(level, packet, 0):
            await self.subscription.offer(level, packet, keyframe)

    def sent(self) -> list[str]:
        """What went at once, then what the pacer let go."""
        return [payload[2:].rstrip(b".").decode() for _, payload in self.port.sent] + self.released


def name(packet: RtpPacket) -> str:
    return packet.payload[2:].rstrip(b".").decode()


async def test_at_a_switch_what_waits_of_the_level_left_takes_no_turn_ahead_of_the_keyframe() -> None:
    call = _Call()
    for n in range(1, 6):
        await call.arrives(ORIGINAL, f"original {n}")  # 1 goes; 2-5 wait, 0.1 s each at 10 kB a second
    call.subscription.target = 1  # (a move down, the chooser's, with the original kept until the keyframe)
    await call.arrives(1, "layer keyframe", keyframe=True)
    assert call.pacer.queued_bytes == 1000, "only the keyframe waits"
    start = call.timers.now
    call.timers.run_until(start + 0.15)
    assert call.sent() == ["original 1", "layer keyframe"]  # after one packet's time, not five
