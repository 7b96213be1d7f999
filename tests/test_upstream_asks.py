"""What the server asks a publisher to send again when a subscriber reports audio missing (fake clock).

On a thin uplink with a queue building in front of the kit's audio, the listener's playout asks for
packets that are only late. Relayed to the kit, each would be sent again behind the same queue: the
call's uplink rose from 33 to 55-65 kbit/s for the seconds a queue lasted (``nara bench upload``).
"""

from __future__ import annotations

from typing import Any, cast

from aiortc.rtp import RtpPacket

from mediaserver.forwarder import Publication

STEP = 0.06  # 60 ms packets, as on a thin uplink


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Publisher:
    """The publisher's end of the server's receiver: which packets it was asked to send again."""

    arrival_ns = 0

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def request_retransmission(self, media_ssrc: int, sequence_numbers: list[int]) -> None:
        self.asked.extend(sequence_numbers)


def audio(seq: int) -> RtpPacket:
    return RtpPacket(payload_type=111, sequence_number=seq % 65536, timestamp=seq * 2880, ssrc=1234,
                     payload=bytes(60))


async def kit_audio() -> tuple[Publication, Publisher, Clock]:
    clock, publisher = Clock(), Publisher()
    publication = Publication("kit", "audio", cast(Any, publisher), clock=clock)
    for seq in range(65530, 65540):  # across the 16-bit wrap
        await publication.on_packet(audio(seq))
        clock.now += STEP
    return publication, publisher, clock


async def test_a_packet_newer_than_any_the_server_has_is_late_not_lost_and_not_asked_for() -> None:
    publication, publisher, clock = await kit_audio()
    clock.now += 0.3  # a queue builds: nothing comes for a while, the listener asks for what is overdue
    await publication.recover([65540 % 65536, 65541 % 65536])
    clock.now += 0.2
    await publication.recover([65540 % 65536, 65541 % 65536, 65542 % 65536])
    assert publisher.asked == []


async def test_a_gap_is_asked_for_again_only_once_the_publisher_has_had_its_time_to_answer() -> None:
    publication, publisher, clock = await kit_audio()
    await publication.on_packet(audio(65543))  # 65540-65542 (4-6) lost on the way in
    await publication.recover([4, 5, 6])  # the listener's ask: the only one for audio, passed on at once
    assert publisher.asked == [4, 5, 6]
    clock.now += 0.05
    await publication.recover([4, 5, 6])
    assert publisher.asked == [4, 5, 6]
    clock.now += 0.35  # the answer took 0.4 s (a queue in front of it): asks now wait that long
    await publication.on_packet(audio(65540))
    clock.now += 0.05
    await publication.recover([5, 6])  # 0.45 s after the ask: before the publisher's 1.25 x 0.4 s
    assert publisher.asked == [4, 5, 6]
    clock.now += 0.1
    await publication.recover([5, 6])
    assert publisher.asked == [4, 5, 6, 5, 6]


async def test_a_packet_asked_for_while_only_late_is_asked_for_once_a_later_one_shows_it_lost() -> None:
    """The listener asks for an overdue packet (held: nothing after it has come) and may spend all its asks
    before the next packet comes; that packet shows the first one lost, and the server asks for it then."""
    publication, publisher, clock = await kit_audio()
    clock.now += 0.03
    await publication.recover([4])  # overdue: 65540 (4) not here, nor anything after it
    await publication.recover([4])
    assert publisher.asked == []
    clock.now += 0.02
    await publication.on_packet(audio(65541))  # 5 came: 4 was lost
    assert publisher.asked == [4]
    await publication.on_packet(audio(65542))
    assert publisher.asked == [4]


async def test_a_late_packet_that_comes_before_the_next_is_not_asked_for() -> None:
    publication, publisher, clock = await kit_audio()
    await publication.recover([4, 5])  # overdue behind a queue
    clock.now += 0.3
    await publication.on_packet(audio(65540))
    await publication.on_packet(audio(65541))
    await publication.on_packet(audio(65542))
    assert publisher.asked == []
