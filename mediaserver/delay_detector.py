"""Whether a link's queue is growing, from per-packet send and arrival times: a pure function of feedback.

After the delay-based part of Google Congestion Control (draft-ietf-rmcat-gcc-02
and the WebRTC design notes), fed from transport-wide feedback (mediaserver/twcc.py):

* Packets sent within 5 ms of a group's first form one group (a frame, or a
  burst of padding): inside a burst the pacing says nothing about the link.
* Between two consecutive groups, the one-way delay variation is the gap
  between their last arrivals minus the gap between their last sends: positive
  when the second waited longer in a queue than the first.
* The trendline: those variations are summed into an accumulated delay,
  smoothed, and a least-squares line is fitted over the last 20 groups'
  (arrival time, smoothed delay). Its slope is how fast the queue grows; the
  detector reads the slope times the number of groups seen (at most 60) times
  a gain of 4, in milliseconds.
* Overuse when that stays above a threshold for 10 ms and at least two groups
  and is not falling; underuse below minus the threshold; normal between. The
  threshold follows the signal (up slowly, down faster) so that other flows'
  queues, which come and go, do not starve this one; bursts far above it (a
  sudden route change) leave it alone.
* The acknowledged bitrate: what the receiver says arrived over the last half
  second of its own clock, headers included; and the rate those same packets
  were sent at, over the span of their sending (``sent_rate``). A link that
  carries all it is given passes them on at the rate they came; a full one
  stretches them, and what arrives falls behind what was sent. A full queue
  that drops what overflows it passes the few it keeps at about the rate they
  came: the share of what was sent in that span that was lost
  (``lost_share``) tells it apart from a link with room.
* What arrives now (``arriving_rate``): the same over the last fifth of a
  second of arrivals. Through a full link packets arrive evenly at its
  capacity, and a link that has just fallen shows there at once, where the
  half second's average still holds most of what came before.
* The queue (``queue_delay``): the newest arrival's one-way delay over the
  least seen in the last ten seconds (the two clocks' offset cancels out). A
  queue that drops what overflows it is a full one, which holds every packet
  it keeps well above that least; a radio link's bursts of loss leave it at
  the least.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .twcc import PacketResult

GROUP_SPAN = 0.005  # seconds: packets sent this close to a group's first belong to it
SMOOTHING = 0.9  # weight of the smoothed accumulated delay's past
WINDOW = 20  # groups the trendline is fitted over
GAIN = 4.0
MAX_DELTAS = 60  # the slope is scaled by at most this many groups
THRESHOLD_START = 12.5  # milliseconds
THRESHOLD_MIN, THRESHOLD_MAX = 6.0, 600.0
THRESHOLD_UP, THRESHOLD_DOWN = 0.0087, 0.039  # per millisecond of the signal's distance from the threshold
THRESHOLD_IGNORE = 15.0  # a signal this far past the threshold does not move it
OVERUSE_TIME = 0.010  # seconds the signal must stay over the threshold
ACKED_WINDOW = 0.5  # seconds of arrivals the acknowledged bitrate counts
ARRIVING_WINDOW = 0.2  # seconds of the latest arrivals ``arriving_rate`` counts
ARRIVING_PACKETS = 5  # ... at least this many packets, over at least half that time
PACKET_OVERHEAD = 28  # bytes of IP and UDP around each datagram
QUEUE_WINDOW = 10.0  # seconds of arrivals whose least one-way delay is taken as the link's own, with no queue

NORMAL, OVERUSE, UNDERUSE = "normal", "overuse", "underuse"


@dataclass
class _Group:
    first_sent: float
    last_sent: float
    last_arrival: float


class DelayDetector:
    """The delay-based signal for one connection: feed it ``on_results`` in feedback order."""

    def __init__(self) -> None:
        self.state = NORMAL
        self.threshold = THRESHOLD_START
        self.signal = 0.0  # the last modified trend, ms
        self.overuse_since: float | None = None  # when the signal last went over the threshold
        self.overuse_groups = 0
        self.acked_rate: float | None = None  # bit/s
        self.sent_rate: float | None = None  # bit/s: the rate the packets behind acked_rate were sent at
        self.lost_share = 0.0  # of the bytes sent over the span they were sent in, the share lost
        self.arriving_rate: float | None = None  # bit/s over the last ARRIVING_WINDOW of arrivals
        self.queue_delay: float | None = None  # seconds: the newest arrival's one-way delay over the least lately
        self.groups_seen = 0
        self._group: _Group | None = None
        self._previous: _Group | None = None
        self._accumulated = 0.0
        self._smoothed = 0.0
        self._first_arrival: float | None = None
        self._points: deque[tuple[float, float]] = deque(maxlen=WINDOW)  # (arrival ms, smoothed delay ms)
        self._last_update: float | None = None
        # Per packet, in columns of plain numbers (a tuple per packet would be an object the garbage collector
        # tracks, hundreds per subscriber waiting for each young pass on a busy worker: docs/benchmarks.md, issue 9).
        # Arrival, bytes and send time of the last ACKED_WINDOW of arrivals:
        self._acked_arrivals: deque[float] = deque()
        self._acked_sizes: deque[int] = deque()
        self._acked_sents: deque[float] = deque()
        self._acked_bytes = 0
        self._newest_arrival: float | None = None
        self._newest_sent: float | None = None
        # Send time and bytes of lost packets, sent since the window's first:
        self._lost_sents: deque[float] = deque()
        self._lost_sizes: deque[int] = deque()
        self._lost_bytes = 0
        # Arrival and one-way delay of the last QUEUE_WINDOW, each delay lower than all after it: the least first
        self._least_arrivals: deque[float] = deque()
        self._least_delays: deque[float] = deque()

    def on_results(self, results: list[PacketResult]) -> str:
        """Take one feedback packet's results; the state after them."""
        for result in sorted(results, key=lambda r: r.sequence):
            arrival = result.arrival
            if arrival is None:
                if result.copy:
                    continue  # (a probe's padding or a resend: dropped unnoted where the original came)
                self._lost_sents.append(result.sent)
                self._lost_sizes.append(result.size + PACKET_OVERHEAD)
                self._lost_bytes += result.size + PACKET_OVERHEAD
                while self._lost_sents[0] < result.sent - 2 * ACKED_WINDOW:  # (bounded while nothing arrives)
                    self._lost_sents.popleft()
                    self._lost_bytes -= self._lost_sizes.popleft()
                continue
            self._acknowledge(arrival, result.size, result.sent)
            self._queue(arrival, arrival - result.sent)
            group = self._group
            if group is None or result.sent - group.first_sent > GROUP_SPAN:
                if group is not None:
                    self._group_done(group)
                self._group = _Group(result.sent, result.sent, arrival)
            else:
                group.last_sent = max(group.last_sent, result.sent)
                group.last_arrival = max(group.last_arrival, arrival)
        if self.acked_rate is not None and self._acked_sents and self._newest_sent is not None:
            # (the oldest arrival's send time for the window's first: arrivals keep the order of sending, but for
            # reordering, which moves the span by a packet's gap; a resend is a send of its own, sent later)
            first_sent = self._acked_sents[0]
            while self._lost_sents and self._lost_sents[0] < first_sent:
                self._lost_sents.popleft()
                self._lost_bytes -= self._lost_sizes.popleft()
            span = self._newest_sent - first_sent
            self.sent_rate = self._acked_bytes * 8 / max(span, 1e-3)  # (no floor: a full link's span is short)
            self.lost_share = self._lost_bytes / (self._acked_bytes + self._lost_bytes)
            self.arriving_rate = self._arriving()
        return self.state

    def _arriving(self) -> float | None:
        newest = self._newest_arrival
        if newest is None:
            return None
        count = total = 0
        oldest = newest
        for arrival, size in zip(reversed(self._acked_arrivals), reversed(self._acked_sizes), strict=True):
            if arrival < newest - ARRIVING_WINDOW:
                break
            if count:
                total += size  # (the oldest packet's bytes arrived before the span began)
            count += 1
            oldest = arrival
        if count < ARRIVING_PACKETS or newest - oldest < ARRIVING_WINDOW / 2:
            return None
        return total * 8 / (newest - oldest)

    def _queue(self, arrival: float, delay: float) -> None:
        arrivals, least = self._least_arrivals, self._least_delays
        while least and least[-1] >= delay:
            least.pop()
            arrivals.pop()
        least.append(delay)
        arrivals.append(arrival)
        while arrivals[0] < arrival - QUEUE_WINDOW:
            arrivals.popleft()
            least.popleft()
        if arrival >= (self._newest_arrival or arrival):  # (a reordered packet does not speak for the queue now)
            self.queue_delay = delay - least[0]

    def _acknowledge(self, arrival: float, size: int, sent: float) -> None:
        if self._newest_arrival is None or arrival > self._newest_arrival:
            self._newest_arrival = arrival
        if self._newest_sent is None or sent > self._newest_sent:
            self._newest_sent = sent
        arrivals, sizes, sents = self._acked_arrivals, self._acked_sizes, self._acked_sents
        arrivals.append(arrival)
        sizes.append(size + PACKET_OVERHEAD)
        sents.append(sent)
        self._acked_bytes += size + PACKET_OVERHEAD
        while arrivals and arrivals[0] < self._newest_arrival - ACKED_WINDOW:
            arrivals.popleft()
            sents.popleft()
            self._acked_bytes -= sizes.popleft()
        span = self._newest_arrival - arrivals[0]
        if span >= ACKED_WINDOW / 2:
            self.acked_rate = self._acked_bytes * 8 / max(span, ACKED_WINDOW * 0.9)

    def _group_done(self, group: _Group) -> None:
        previous, self._previous = self._previous, group
        if previous is None:
            return
        send_delta = group.last_sent - previous.last_sent
        arrival_delta = group.last_arrival - previous.last_arrival
        if send_delta <= 0:
            return  # (reordered across groups: says nothing)
        self.groups_seen += 1
        variation = (arrival_delta - send_delta) * 1000.0
        self._accumulated += variation
        self._smoothed = SMOOTHING * self._smoothed + (1 - SMOOTHING) * self._accumulated
        if self._first_arrival is None:
            self._first_arrival = group.last_arrival
        self._points.append(((group.last_arrival - self._first_arrival) * 1000.0, self._smoothed))
        if len(self._points) == WINDOW:
            slope = _slope(self._points)
            if slope is not None:
                self._detect(min(self.groups_seen, MAX_DELTAS) * slope * GAIN, group.last_sent, group.last_arrival)

    def _detect(self, signal: float, sent: float, arrival: float) -> None:
        previous, self.signal = self.signal, signal
        if signal > self.threshold:
            if self.overuse_since is None:
                self.overuse_since, self.overuse_groups = sent, 0
            self.overuse_groups += 1
            if sent - self.overuse_since >= OVERUSE_TIME and self.overuse_groups > 1 and signal >= previous:
                self.state = OVERUSE
        elif signal < -self.threshold:
            self.overuse_since = None
            self.state = UNDERUSE
        else:
            self.overuse_since = None
            self.state = NORMAL
        self._adapt(signal, arrival)

    def _adapt(self, signal: float, arrival: float) -> None:
        last, self._last_update = self._last_update, arrival
        if last is None or abs(signal) > self.threshold + THRESHOLD_IGNORE:
            return
        step = min(max(arrival - last, 0.0), 0.1) * 1000.0
        rate = THRESHOLD_DOWN if abs(signal) < self.threshold else THRESHOLD_UP
        self.threshold += rate * (abs(signal) - self.threshold) * step
        self.threshold = max(THRESHOLD_MIN, min(self.threshold, THRESHOLD_MAX))


def _slope(points: deque[tuple[float, float]]) -> float | None:
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in points)
    denominator = sum((x - mean_x) ** 2 for x, _ in points)
    return None if denominator == 0 else numerator / denominator
