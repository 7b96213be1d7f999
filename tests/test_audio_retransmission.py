"""Audio retransmission: a receiver asks again for lost audio packets, and bursts of loss leave no gaps.

The policy (``AudioPlayout`` with ``on_missing``) runs on a fake clock over a
scripted link whose far end answers requests after a round trip; the end to
end test runs a publisher and listeners through the real SFU, which answers
from its packet cache, with bursty loss on each listener's way in.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import Counter
from collections.abc import Callable

import pytest

from bench.link import GilbertElliott, Link, LinkProfile
from mediaserver.aiortc_adapter import dtls_transport, filter_inbound_rtp
from mediaserver.encoders import OpusTrack
from mediaserver.receive import AudioPlayout, PlayoutFrame
from mediaserver.receive_track import ReceivedAudioTrack
from signalling.client import ConsultationClient

from .conftest import RunningServer
from .media_helpers import receiving_from
from .test_receive_path import FRAME, PACKETS, RATE, TICK, SpeechTrack, reading

BURSTY_10 = GilbertElliott.with_mean(0.10, 3.0)


def bursty(seed: int) -> Callable[[], bool]:
    """A seeded Gilbert–Elliott loss process: 10 % of packets, in bursts of 3 on average. True: lost."""
    link = Link(LinkProfile(bursts=BURSTY_10), seed=seed)
    return lambda: link.send(200, 0.0) is None


# --- the policy, fake clock -------------------------------------------------------


class RepairingLink:
    """20 ms packets sent one way, and a far end that answers each request a round trip later.

    ``lost(index)`` says whether the original of packet ``index`` is lost;
    ``repair_lost(index)`` whether one retransmission of it is.
    """

    def __init__(self, playout: AudioPlayout | None = None, *, one_way: float = 0.04,
                 lost: Callable[[int], bool] = lambda index: False,
                 repair_lost: Callable[[int], bool] = lambda index: False,
                 seq0: int = 1000, ts0: int = 77_000, asking: bool = True, replays_refused: bool = False) -> None:
        self.playout = playout if playout is not None else AudioPlayout()
        self.playout.on_missing = self.ask if asking else None
        self.one_way = one_way
        self.lost = lost
        self.repair_lost = repair_lost
        self.seq0, self.ts0 = seq0, ts0
        self.replays_refused = replays_refused  # a copy of a packet already here never reaches the playout (SRTP)
        self._delivered: set[int] = set()
        self.now = 0.0
        self.sent = 0
        self.requests: list[tuple[float, list[int]]] = []  # (when, sequence numbers)
        self.played: list[tuple[float, PlayoutFrame]] = []
        self.delays: list[float] = []  # the playout delay at each tick
        self._arrivals: list[tuple[float, int, int]] = []  # (time, order, index)
        self._order = 0

    def index(self, seq: int) -> int:
        return (seq - self.seq0) % 65536

    def ask(self, seqs: list[int]) -> None:
        self.requests.append((self.now, list(seqs)))
        for seq in seqs:
            if not self.repair_lost(self.index(seq)):
                self._arrive(self.now + 2 * self.one_way, self.index(seq))

    def _arrive(self, when: float, index: int) -> None:
        heapq.heappush(self._arrivals, (when, self._order, index))
        self._order += 1

    def run(self, seconds: float) -> None:
        """Send packets for ``seconds`` more of media, and play everything due until then."""
        end = self.now + seconds
        while self.sent * TICK < end:
            if not self.lost(self.sent):
                self._arrive(self.sent * TICK + self.one_way, self.sent)
            self.sent += 1
        while True:
            due = self.playout.next_due()
            ask = self.playout.next_request_due()
            arrival = self._arrivals[0][0] if self._arrivals else None
            if arrival is not None and arrival <= end and (due is None or arrival <= due) and (
                    ask is None or arrival <= ask):
                self.now, _, index = heapq.heappop(self._arrivals)
                if self.replays_refused and index in self._delivered:
                    continue
                self._delivered.add(index)
                self.playout.push((self.seq0 + index) % 65536, (self.ts0 + index * FRAME) % (1 << 32),
                                  PACKETS[index % len(PACKETS)], self.now)
            elif ask is not None and ask <= end and (due is None or ask <= due):
                self.now = max(self.now, ask)
                self.playout.request_missing(self.now)
            elif due is not None and due <= end:
                self.now = due
                frame = self.playout.pop(self.now)
                assert frame is not None
                self.played.append((self.now, frame))
                self.delays.append(self.playout.delay)
            else:
                self.now = end
                return

    def frame_index(self, frame: PlayoutFrame) -> int:
        return ((frame.timestamp - self.ts0) % (1 << 32)) // FRAME

    def played_at(self, index: int) -> list[tuple[float, str]]:
        """When the slot of packet ``index`` was played, and how (a held slot plays more than once)."""
        return [(t, f.source) for t, f in self.played if self.frame_index(f) == index]

    def concealed_share(self, since: float = 0.0) -> float:
        ticks = [f for t, f in self.played if t >= since]
        return sum(f.concealed for f in ticks) / len(ticks)


def asks(link: RepairingLink) -> dict[int, list[float]]:
    """When each sequence number was asked for."""
    out: dict[int, list[float]] = {}
    for when, seqs in link.requests:
        for seq in seqs:
            out.setdefault(seq, []).append(when)
    return out


def test_a_missing_packet_is_asked_for_at_once_and_again_a_round_trip_later() -> None:
    # packet 20 comes again when asked, which shows the round trip (20 ms); the burst's never do
    link = RepairingLink(lost=lambda i: i in (20, 50, 51, 52), repair_lost=lambda i: i >= 50, one_way=0.01)
    link.run(3.0)
    asked = asks(link)
    # asked for as soon as it is overdue: half a frame after its time, before the next packet shows the gap
    assert asked[1020] == [pytest.approx(20 * TICK + 0.01 + TICK / 2)]
    assert link.played_at(20)[-1][1] == "packet"
    assert link.playout.repair_time == pytest.approx(0.02)
    for index in (50, 51, 52):
        first, *again = asked[1000 + index]
        assert first == pytest.approx(index * TICK + 0.01 + TICK / 2)
        # no answer: once more, a round trip and a quarter later, if its frame has not played by then
        assert again == [pytest.approx(first + 0.025)] or not again
        assert all(when < t for when in asked[1000 + index] for t, _ in link.played_at(index))
    assert sum(len(a) > 1 for a in asked.values()) >= 1
    assert link.playout.counters.nacked == 4
    assert link.playout.counters.recovered_retransmission == 1


def test_nothing_is_asked_for_a_frame_that_has_already_played() -> None:
    # packet 30 lost, and the ones after it held up until slot 30 has been concealed: 30 is past saving
    link = RepairingLink(lost=lambda i: i == 30, repair_lost=lambda i: True, one_way=0.02)
    on_time = link._arrive
    link._arrive = lambda when, index: on_time(when + (0.15 if index > 30 else 0.0), index)  # type: ignore[method-assign]
    link.run(2.0)
    assert link.played_at(30)[0][1] == "conceal"
    assert link.requests  # the ones held up looked lost while they could still play
    for when, seqs in link.requests:
        for seq in seqs:
            # (before the slot's last play: a slot held while its packet is on the way plays more than once)
            assert all(when < t for t, _ in link.played_at(link.index(seq))[-1:]), seq
    # and an outage of two seconds: asking stops once it is longer than the delay could cover,
    # and when it ends, only the frames that can still play are asked for
    out = RepairingLink(lost=lambda i: 100 <= i < 200, repair_lost=lambda i: True, one_way=0.02)
    out.run(6.0)
    asked = asks(out)
    assert min(asked) == 1100 and max(asked) == 1199
    assert len(asked) <= 0.25 / TICK + 4
    for seq, times in asked.items():
        assert all(when < t for when in times for t, _ in out.played_at(out.index(seq))), seq
    assert out.playout.counters.nacked == len(asked)


def test_a_long_burst_is_asked_for_before_it_ends() -> None:
    # 200 ms lost: waiting for the packet after the burst would leave its first frames no time
    link = RepairingLink(lost=lambda i: i in (20, *range(100, 110)), one_way=0.01)
    link.run(4.0)
    burst = [(when, seqs) for when, seqs in link.requests if any(1100 <= s < 1110 for s in seqs)]
    assert burst[0] == (pytest.approx(100 * TICK + 0.01 + TICK / 2), [1100])  # overdue, not 200 ms later
    assert all(when < 110 * TICK + 0.01 for when, _ in burst)  # all asked for before packet 110 came
    assert all(source == "packet" for i in range(100, 110) for _, source in link.played_at(i)[-1:])
    assert link.playout.counters.recovered_retransmission == 11


def test_each_packet_is_asked_for_at_most_three_times() -> None:
    playout = AudioPlayout()
    playout.round_trip_time = 0.01
    link = RepairingLink(playout, lost=lambda i: i % 25 == 10, repair_lost=lambda i: True, one_way=0.01)
    link.run(10.0)
    asked: dict[int, int] = {}
    for _, seqs in link.requests:
        for seq in seqs:
            asked[seq] = asked.get(seq, 0) + 1
    assert asked and max(asked.values()) == 3
    assert link.playout.counters.nacked == len(asked)


def test_sequence_numbers_asked_for_wrap_like_the_stream() -> None:
    link = RepairingLink(lost=lambda i: i in (40, 41), seq0=65536 - 41, one_way=0.005)
    link.run(2.0)
    assert list(asks(link)) == [65535, 0]
    assert link.playout.counters.recovered_retransmission == 2
    assert {f.source for _, f in link.played} == {"packet"}


def test_retransmissions_fill_bursty_loss_where_fec_alone_leaves_gaps() -> None:
    # 10 % loss in bursts of 3 on average, on a link with an 80 ms round trip; retransmissions lost alike
    arms = {}
    for asking in (True, False):
        lost, repair = bursty(7), bursty(8)
        pattern = [lost() for _ in range(3000)]
        link = RepairingLink(lost=pattern.__getitem__, repair_lost=lambda i, r=repair: r(), asking=asking)
        link.run(5.0)  # settling
        settled = link.now
        link.run(50.0)
        arms[asking] = link, link.concealed_share(since=settled)
    with_nack, gaps = arms[True]
    without, gaps_without = arms[False]
    assert gaps <= 0.02, gaps
    assert gaps_without >= 0.05, gaps_without
    counters = with_nack.playout.counters
    assert counters.recovered_retransmission >= 0.5 * counters.nacked > 0
    # room for one retransmission: more than the 80 ms round trip, less than a quarter of a second
    assert 0.1 <= with_nack.playout.delay <= 0.25 + TICK
    assert max(with_nack.delays) <= 0.25 + TICK
    assert without.playout.counters.nacked == 0 and without.playout.delay <= 0.1
    # the round trip was learned from how long retransmissions took
    assert with_nack.playout.repair_time is not None and abs(with_nack.playout.repair_time - 0.08) < 0.02


def test_the_delay_grown_for_repairs_shrinks_back_slowly_once_the_link_is_clean() -> None:
    lost = bursty(3)
    link = RepairingLink(lost=lambda i: i < 1000 and lost())
    link.run(20.0)
    grown = link.playout.delay
    assert grown >= 0.1
    ticks = len(link.delays)
    link.run(40.0)  # a clean link
    later = link.delays[ticks:]
    # at most one frame less per second
    for second in range(len(later) // 50 - 1):
        assert later[second * 50] - later[(second + 1) * 50] <= TICK + 1e-9
    assert link.playout.delay <= 0.07
    assert link.concealed_share(since=20.5) == 0.0


def test_a_long_round_trip_grows_the_delay_no_further_than_the_bound() -> None:
    lost = bursty(5)
    link = RepairingLink(lost=lambda i: lost(), one_way=0.2)  # a 400 ms round trip cannot be waited for
    link.run(20.0)
    assert max(link.delays) <= 0.25 + TICK
    assert link.playout.target_delay <= 0.25


def test_a_round_trip_time_given_sets_when_to_ask_again() -> None:
    playout = AudioPlayout(start_delay=0.2, max_delay=0.2, clock_rate=RATE)
    playout.round_trip_time = 0.1
    link = RepairingLink(playout, lost=lambda i: i in (20, 21, 22), repair_lost=lambda i: True, one_way=0.005)
    link.run(2.0)
    asked = asks(link)
    assert sorted(asked) == [1020, 1021, 1022]
    assert all(again - first == pytest.approx(0.125) for first, again in asked.values())


# --- end to end: a publisher and listeners through the real SFU ------------------------


class InboundLoss:
    """Loss on a listener's way in: originals by their place in the stream, retransmissions by a chain of their own.

    ``lost()`` draws one packet's fate. Originals take theirs from one seeded
    sequence by position, so two listeners with the same seed lose the same
    packets of the stream; a retransmission (a sequence number seen before)
    meets the same kind of loss, drawn separately.
    """

    def __init__(self, lost: Callable[[], bool], repair_lost: Callable[[], bool]) -> None:
        self.lost = lost
        self.repair_lost = repair_lost
        self.pattern: list[bool] = []
        self.first: dict[int, int] = {}
        self.seen: set[tuple[int, int]] = set()
        self.dropped = 0

    def keep(self, data: bytes) -> bool:
        ssrc = int.from_bytes(data[8:12], "big")
        seq = int.from_bytes(data[2:4], "big")
        if (ssrc, seq) in self.seen:
            lost = self.repair_lost()
        else:
            self.seen.add((ssrc, seq))
            position = (seq - self.first.setdefault(ssrc, seq)) % 65536
            while len(self.pattern) <= position:
                self.pattern.append(self.lost())
            lost = self.pattern[position]
        self.dropped += lost
        return not lost


def random_loss(share: float, seed: int) -> Callable[[], bool]:
    rng = random.Random(seed)
    return lambda: rng.random() < share


LISTENERS = {  # name: (loss of originals, loss of retransmissions, asks again)
    "bursty, NACK": (lambda: bursty(21), lambda: bursty(22), True),
    "bursty, no NACK": (lambda: bursty(21), lambda: bursty(22), False),
    "random, NACK": (lambda: random_loss(0.05, 23), lambda: random_loss(0.05, 24), True),
    "random, no NACK": (lambda: random_loss(0.05, 23), lambda: random_loss(0.05, 24), False),
}


async def test_through_the_sfu_asking_again_leaves_no_gaps_under_bursty_loss(server: RunningServer) -> None:
    room = server.consultation()
    speech = SpeechTrack()
    publisher = ConsultationClient(server.url, room, server.token(room, "Nurse", participant_id="p1"),
                                   audio=OpusTrack(speech))
    listeners = {name: ConsultationClient(server.url, room, server.token(room, name, participant_id=f"l{n}"),
                                          publish=False, nara_receive=True)
                 for n, name in enumerate(LISTENERS)}
    heard: dict[str, Counter[str]] = {name: Counter() for name in LISTENERS}
    tracks: dict[str, ReceivedAudioTrack] = {}
    losses: dict[str, InboundLoss] = {}
    tasks: list[asyncio.Task[None]] = []
    try:
        for listener in listeners.values():
            await listener.join()
        await publisher.join()
        for name, listener in listeners.items():
            await receiving_from(listener, {"p1"})
            (track,) = listener.remote_tracks.values()
            assert isinstance(track, ReceivedAudioTrack)
            lost, repair_lost, asking = LISTENERS[name]
            if not asking:
                track.playout.on_missing = None
            losses[name] = InboundLoss(lost(), repair_lost())
            assert listener.pc is not None
            filter_inbound_rtp(dtls_transport(listener.pc), losses[name].keep)
            tracks[name] = track

            def count(frame: object, name: str = name, track: ReceivedAudioTrack = track) -> None:
                assert track.last_frame_source is not None
                heard[name][track.last_frame_source] += 1

            tasks.append(asyncio.ensure_future(reading(track, count)))
        await asyncio.wait_for(speech.reached(speech.sent + 150).wait(), 10)  # three seconds to settle
        start = speech.sent
        for counter in heard.values():
            counter.clear()
        await asyncio.wait_for(speech.reached(start + 500).wait(), 20)  # ten seconds of speech
        sent = speech.sent - start
    finally:
        for task in tasks:
            task.cancel()
        for client in [*listeners.values(), publisher]:
            await client.close()
    # (a frame the playout lengthened or shortened is its packet's sound, played)
    delivered = {name: (c["packet"] + c["stretch"] + c["shorten"] + c["fec"]) / sent for name, c in heard.items()}
    gaps = {name: c["conceal"] / sum(c.values()) for name, c in heard.items()}
    figures = {name: f"delivered {delivered[name]:.1%}, gaps {gaps[name]:.1%}, "
                     f"lost {losses[name].dropped}, {tracks[name].counters}" for name in LISTENERS}
    print("\n" + "\n".join(f"{name}: {line}" for name, line in figures.items()))
    # with NACK, the SFU's cache fills what bursts take: no more than 2 % of the time concealed
    assert delivered["bursty, NACK"] >= 0.98 and gaps["bursty, NACK"] <= 0.02, figures
    assert delivered["random, NACK"] >= 0.98 and gaps["random, NACK"] <= 0.02, figures
    # without it, FEC alone rebuilds only the last frame of each burst
    assert delivered["bursty, no NACK"] <= delivered["bursty, NACK"] - 0.03, figures
    for name in ("bursty, NACK", "random, NACK"):
        assert tracks[name].counters.recovered_retransmission >= 10, figures
    assert tracks["bursty, no NACK"].counters.nacked == 0


def test_a_filling_queue_is_late_not_lost_and_is_not_asked_for() -> None:
    # from packet 50 on, each packet waits 5 ms longer than the one before (a queue filling
    # at a link's bottleneck): nothing is lost; asking for every packet that is late would only
    # add retransmissions to the queue that delays them. Once a packet asked for comes twice
    # (it was only late), asking for overdue packets stops for a while.
    link = RepairingLink(one_way=0.02)
    on_time = link._arrive
    link._arrive = lambda when, index: on_time(  # type: ignore[method-assign]
        when + max(0, index - 50) * 0.005, index)
    link.run(3.0)
    assert link.playout.counters.nacked <= 3  # of the 100 packets that came late, a handful asked for
    assert all(when < 1.2 for when, _ in link.requests)


def test_a_filling_queue_is_not_asked_for_though_the_copies_asked_for_never_come() -> None:
    # The same queue behind SRTP: the receiver refuses the copy of a packet it has as a replay, so a
    # packet asked for as overdue never comes twice. It came sooner than a resend could: that alone
    # says it was only late.
    link = RepairingLink(one_way=0.02, replays_refused=True)
    on_time = link._arrive
    link._arrive = lambda when, index: on_time(  # type: ignore[method-assign]
        when + max(0, index - 50) * 0.005, index)
    link.run(3.0)
    assert link.playout.counters.nacked <= 3
    assert all(when < 1.2 for when, _ in link.requests)


def test_packets_that_were_only_late_do_not_shorten_the_time_between_asks() -> None:
    # Every tenth packet comes 15 ms late, and is asked for as overdue before it comes; a burst of
    # three is lost every second, and the first resend of each is lost too. The asks for them again
    # must wait a round trip (a sender answers a packet once a round trip), or they are wasted.
    def late(when: float, index: int) -> None:
        on_time(when + (0.015 if index % 10 == 5 else 0.0), index)

    link = RepairingLink(lost=lambda i: i % 50 in (20, 21, 22), one_way=0.03)
    on_time = link._arrive
    link._arrive = late  # type: ignore[method-assign]
    link.run(10.0)
    assert link.playout.repair_time == pytest.approx(0.06, abs=0.001)  # the round trip
