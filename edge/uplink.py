"""The queue standing in the kit's uplink, from the server's transport feedback on the call's packets.

The kit stamps every RTP packet it sends with a transport-wide sequence number
and the server tells it, every 75 ms, when each one arrived (``docs/protocol.md``,
``uplink_feedback``). Each packet's one-way delay is its arrival (the server's
clock) less its send time (the kit's): the clocks' offset is unknown but fixed
on one connection, so the lowest delay of the last ``base_window`` seconds
stands for the empty link, and the rest is queue.

One packet's queue says little on a thin uplink: on 256 kbit/s one of a
photo's full packets takes 47 ms to send, so an audio packet that comes
behind one or two of them waits that long while the link is far from full.
A queue that stands is one every packet meets: the least delay over the
packets of the last ``window`` seconds (12-16 of the call's audio packets a
second, more with video), above the base. That is what the photo's upload
steers by (``edge.pacing``), where a receiver report a second gives one
packet's round trip.

Everything here takes the times as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class QueueSample:
    """The standing queue in front of the kit's packets on its uplink (seconds), learnt at ``at`` (the
    caller's clock) from a feedback that told ``packets`` packets' arrivals."""

    queue: float
    at: float
    packets: int


class UplinkQueue:
    """Follows the one-way delays of the packets the kit sent on one connection."""

    def __init__(self, window: float = 0.5, base_window: float = 120.0) -> None:
        self.window = window
        self.base_window = base_window
        # (sent, delay), kept increasing in delay: the front is the least over each window.
        self._recent: deque[tuple[float, float]] = deque()
        self._base: deque[tuple[float, float]] = deque()
        self._newest: float | None = None  # the latest send time heard of
        self.sample: QueueSample | None = None

    def on_arrivals(self, arrivals: Iterable[tuple[float, float | None]], now: float) -> QueueSample | None:
        """Learn packets' (send time, arrival time or None if lost); the standing queue now, or None
        until a packet has arrived. Send and arrival times are in seconds, each on its own clock."""
        heard = 0
        for sent, arrival in arrivals:
            if arrival is None:
                continue
            heard += 1
            delay = arrival - sent
            late = self._newest is not None and sent < self._newest - self.window  # (a feedback that came late)
            for history in (self._base,) if late else (self._recent, self._base):
                while history and history[-1][1] >= delay:
                    history.pop()
                history.append((sent, delay))
            if self._newest is None or sent > self._newest:
                self._newest = sent
        if not heard or self._newest is None:
            return self.sample
        newest = self._newest
        while self._recent and self._recent[0][0] < newest - self.window:
            self._recent.popleft()
        while len(self._base) > 1 and self._base[0][0] < newest - self.base_window:
            self._base.popleft()
        if not self._recent:
            return self.sample  # (only packets older than the window arrived: nothing new stands)
        queue = max(0.0, self._recent[0][1] - self._base[0][1])
        self.sample = QueueSample(queue, now, heard)
        return self.sample
