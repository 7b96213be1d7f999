"""How fast the kit may upload photos: a token bucket under a rate that yields to the call.

Photos go beside the call, never in its way. The upload's rate has a
configured ceiling; while a call is up it is a scavenger, like LEDBAT
(RFC 6817): it watches the call's round-trip time (from the RTCP receiver
reports the server sends the kit) against the lowest seen lately, the
"base". Queueing delay above ``target`` means the upload is filling the
link's queue ahead of the call's audio: the rate is cut by a quarter (at most
once per ``cut_interval``). A call starts the rate low (``call_start``); until
the first sign of a queue (half the target) it grows quickly, by 2^0.7 a
second (a slow start, so a photo beside a call on a good link still takes
seconds, not minutes); after that slowly, by at most ``growth`` of itself per
second (and at least ``min_step``), in proportion to how far below the target
the delay is. It never goes under ``floor``, so a photo still arrives on the
worst link, and never over the ceiling. Without a call the ceiling applies.
While the latest round trip is older than ``stale_after`` the rate holds: a
report stops coming when it is lost or stuck behind a long queue, so its
silence is no sign that the link is free. Nor does it grow while more than
``busy_after`` seconds of bytes wait unsent in the upload's socket: TCP is
not keeping up with the rate (losses to repair), so a low queue says nothing
of what the rate would do; grown there, the rate stood far above the link's
and sent the backlog in a rush once TCP caught up.

With the upload's own connection to read (``SocketSignal``, from its
``TCP_INFO``) the rate also keeps near what TCP actually delivers: it grows
to at most ``headroom`` times the most delivered over ``delivery_interval``
lately, plus ``probe`` (half again as much in the slow start, which ends when
TCP stops keeping up), so it can never stand far above what the link
carries (a rate cut low may grow back to ``recall_share`` of the most
delivered over ``recall_window``, as after an outage); and the connection's
own round trip, updated by every acknowledgement, shows a queue within a
round trip instead of a report a second late. A queue then cuts the rate at once to under what was delivered,
the deeper the longer the queue (to be gone in ``drain``), and the rate grows
back by ``regrowth`` a second to near the rate the cut was for. That round trip
also grows with no queue at all when a slow upload's packets come far apart
(the server delays its acknowledgements), so below ``socket_alone`` it
counts only while the call's report shows a queue too, and a new connection's
round trip counts only once it has carried ``socket_settle`` (its first ones
are inflated after an outage), and so does one back from a silence of
``resume_silence`` (an outage it lived through). The kernel may send the bytes up to
``catch_up`` times the rate (``pacing_rate``) unless a queue cut it lately, so
TCP makes up the time it stalls repairing each loss. After a queue showed
beside an upload under ``thin_below``, ``thin_uplink`` says the link is thin
for ``thin_hold`` seconds (the call's audio then goes in longer packets); a
call's upload begins with the link presumed thin until it shows itself.

Where the server tells the kit when each of its packets arrived (transport
feedback, ``QueueSample`` from edge/uplink.py), the call's queue is the one
every packet of the last half second met, against ``standing_target``, in
place of the one packet a second a report tells: on a thin uplink a report
that came behind one or two of the photo's packets read as a queue while the
link was far from full, and each such reading cut the rate.

In a fluid model of a 256 kbit/s uplink with a 32 kbit/s call and a receiver
report a second (tests/test_edge_pacing.py), the queue in front of the audio
peaks once at about 250 ms when the slow start ends and then stays under
about 100 ms (20 ms on average) while the photo gets 95 % of what the call
leaves; beside a call on 2 Mbit/s a 3 MB photo takes about 18 s.

Bytes are paced by ``TokenBucket``; a PATCH carries about ``chunk_seconds``
of bytes at the current rate (``chunk_size``), so a chunk lost to an outage
costs little. Everything here takes ``now`` as an argument.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .uplink import QueueSample

KIB = 1024
MIN_CHUNK = 16 * KIB
MAX_CHUNK = 1024 * KIB
MIN_BACKLOG = 4 * KIB


@dataclass(frozen=True)
class RttSample:
    """The call's round-trip time in seconds, and when it was learnt (the caller's clock)."""

    rtt: float
    at: float


@dataclass(frozen=True)
class CallSignal:
    """What the upload knows of the call: whether one is up, its latest round trip (None until measured), and
    the queue standing in the uplink (None until the server's transport feedback told it: edge/uplink.py)."""

    in_call: bool
    rtt: RttSample | None = None
    queue: QueueSample | None = None


NO_CALL = CallSignal(False)


@dataclass(frozen=True)
class SocketSignal:
    """What the upload's TCP connection says of itself (``edge.tcpinfo``), read at ``at`` (the caller's clock).

    Its round trip is updated with every acknowledgement, so a queue in front of the call's audio shows
    there within a round trip, long before the call's next receiver report says so.
    """

    at: float
    connection: int  # tells connections apart: a new one counts its bytes from zero
    acked: int  # payload bytes acknowledged so far
    rtt: float  # smoothed round trip, seconds
    min_rtt: float  # the lowest seen on this connection
    unsent: int = 0  # bytes written and not sent yet


class TokenBucket:
    """Bytes at ``rate`` per second, with at most ``burst`` bytes at once."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self.rate = rate

    def take(self, size: int, now: float) -> float:
        """Take ``size`` bytes; how long to wait before sending them (0 if at once)."""
        self._refill(now)
        self._tokens -= size
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now


@dataclass(frozen=True)
class ScavengerSettings:
    ceiling: float  # bytes per second
    floor: float = 2 * KIB  # 16 kbit/s
    target: float = 0.060  # seconds of queueing delay the call's audio may be given
    base_window: float = 120.0  # the base RTT is the lowest of the last this many seconds
    cut: float = 0.75
    cut_interval: float = 1.0
    growth: float = 0.08  # at most this fraction of the rate, per second
    slow_start: float = 0.7  # until the first sign of a queue the rate doubles each second (2 ** (1.0 × s))
    min_step: float = 1 * KIB  # bytes per second per second
    stale_after: float = 2.0  # seconds: an older round trip says nothing of the queue now; the rate holds
    busy_after: float = 1.0  # seconds of bytes unsent in the socket: TCP is not keeping up; the rate does not grow
    call_start: float = 8 * KIB  # where the rate starts when a call begins (64 kbit/s)
    # With the upload's own connection to read (``SocketSignal``):
    # Seconds of its round trip above its base: a queue in front of the audio. Its round trip varies by
    # tens of ms with no queue at all (delayed acknowledgements, the audio's packets between its own).
    socket_target: float = 0.120
    # With the connection's round trip to cut within a round trip, the call's report (a second late) is held
    # to this before it cuts. A trade, measured (``nara bench upload``, docs/benchmarks.md, issue 7's fifth
    # round): at 60 ms here and 120 ms for the connection the rate stands where about 30 ms of queue shows
    # (the audio's packets over 200 ms in the link in 2-7 seconds of a run, and a photo got 55-62 % of the
    # 256 kbit/s link); at 90 and 160 ms the link was 90 % full and a photo got 67-71 % of it, but the
    # audio's packets were over 200 ms in 14-28 seconds and it lost 2.6-5 times what it lost alone.
    # The audio comes first.
    steer_target: float = 0.060
    # The slow start goes on while the queue is under this share of those targets (at half of 90 and 160 ms
    # it doubled once more with 33 ms showing, to 217 kbit/s beside a call still in 20 ms packets, and the
    # audio met 300-350 ms of queue for two seconds; half of 60 and 120 ms is where it stopped before).
    start_pressure: float = 0.5
    # It also grows by up to 200 ms as a slow upload's packets come far apart (the server then delays its
    # acknowledgements), and cut on that alone, the rate fell to the floor: under ``socket_alone`` the
    # connection's queue counts only while the call's last report showed a queue too (half its target).
    socket_alone: float = 0.300
    socket_settle: int = 64 * KIB  # a connection's round trip counts (base and queue) once it carried this much
    # ... and again after this many seconds without an acknowledgement (an outage it lived through): the round
    # trips of the first packets after a 20 s outage read 0.6-2.7 s, and as a queue cut the rate by a quarter.
    resume_silence: float = 3.0
    # What TCP delivered is measured over at least this long: over a shorter time a repaired loss, which
    # acknowledges many segments at once, reads as a burst far above the link's rate.
    delivery_interval: float = 2.0
    # ... and over this long in the slow start while the uplink's standing queue is known (a queue then shows
    # within half a second, and cuts): at 2 s the slow start, held to ``standing_start_headroom`` times the
    # latest measurement, went 66, 106, 130, 202 kbit/s at 1, 3, 5 and 7 s on a link with room for 190, and
    # the photo's first 10 s carried 100-115 kbit/s.
    start_interval: float = 1.0
    # ... or as soon as this many bytes came in at least ``short_interval``: on a fast link a measurement
    # every two seconds held the slow start to its headroom per two seconds, and a photo took half a minute.
    short_bytes: int = 96 * KIB
    short_interval: float = 0.5
    delivery_window: float = 10.0  # the upload's share of the link: the most delivered per interval lately
    # A rate cut low (a queue as an outage began, a burst of losses) may grow back to this share of the most
    # delivered over ``recall_window`` at the usual pace: capped near what a low rate itself delivered, it
    # crept back over 50 s after an outage.
    recall_window: float = 60.0
    recall_share: float = 0.8
    headroom: float = 1.05  # the rate grows to at most this times that share (feeling for more, slowly)
    probe: float = 2 * KIB  # ... plus this (16 kbit/s): a share cut low, on a thin link, comes back in seconds
    start_headroom: float = 1.3  # ... and in the slow start, before any queue showed
    # TCP kept up with the rate when it delivered at least this share of what the rate asked over the
    # interval (the rest: the idle round trip between two chunks). Then the rate being above what was
    # delivered says only that the measurement lags a growing rate, not that the link is full: judged
    # so, the slow start ended within seconds on any link and a photo on a good one crept up by 2 % a
    # second.
    kept_up_share: float = 0.8
    # The slow start ends once TCP has not kept up over this many intervals in a row: on a lossy link a
    # retransmission timeout alone (a second or more without deliveries) made one interval short and ended
    # it at 106 kbit/s on a link with room for 200, and the usual pace took 20 s from there.
    start_misses: int = 2
    # A queue found is to be gone in about this long: the cut goes deeper the longer it is. In half a second,
    # a queue of 250 ms cut the rate by half, and the link stood a fifth empty for the 10-20 s it took to
    # grow back; in the fluid model of the 256 kbit/s uplink a second keeps the queue shorter too.
    drain: float = 1.0
    deepest_cut: float = 0.5  # a cut leaves at least this share of what was delivered
    # The kernel may send the upload's packets this much faster than the rate (``pacing_rate``) unless a
    # queue cut the rate lately: TCP stalls for a round trip or more at each loss it repairs, and paced at
    # the rate itself it never made that time up (on the 256 kbit/s link with 10 % loss, it delivered a
    # quarter less than the rate asked while the link stood idle as often). The bytes still go at the rate
    # on average: they are written no faster.
    catch_up: float = 1.25
    # ... and beside a call at most this many seconds of bytes at the rate wait unsent in the socket, so what
    # TCP catches up is bounded: 20 kB left behind by a stall went out at the catch-up rate into a link
    # already nearly full, and the audio waited 300-400 ms.
    backlog: float = 0.3
    catch_up_after: float = 2.0  # seconds after a cut: what it left waiting in the socket goes at the new rate
    # After a cut the rate grows back by ``regrowth`` a second (not ``growth``) while it is under
    # ``knee_share`` of the rate the cut was for and no queue shows: grown back at the usual pace, it spent
    # 10-20 s of every 15-20 well under what the link had carried, and the link stood a fifth empty.
    regrowth: float = 0.15
    knee_share: float = 0.9
    # ... and from there to ``knee_top`` of it at this share of the usual pace: at the usual pace it went on
    # past the rate of the last cut within seconds, and the queue that showed a second later was 400-500 ms
    # long. Above that, the usual pace again: slow for good, each cut a little under the last one's rate
    # brought the next lower, and the rate sank to 140-170 kbit/s on a link with room for 210.
    past_knee: float = 0.25
    knee_top: float = 1.05
    knee_memory: float = 3.0  # seconds: a cut this soon after the last one is for the same queue
    # The uplink counts as thin (the call then packs its audio more tightly, see ``thin_uplink``) for
    # ``thin_hold`` seconds after a queue showed while the upload carried under ``thin_below``.
    thin_below: float = 250_000 / 8
    thin_hold: float = 60.0
    # A call's upload begins with the uplink presumed thin, until the first queue shows (the rules above then
    # judge it), TCP delivers ``thin_below``, or this many seconds pass: else the slow start met the audio in
    # 20 ms packets, 20-25 kbit/s more of a 256 kbit/s link than the 60 ms ones it went to only at the first
    # queue, 7-10 s later, and that queue was the start's overshoot over the larger share.
    presume_thin: float = 10.0
    # A cut within this many seconds of the uplink's becoming thin keeps no knee: the queue it was for had
    # the call's audio in 20 ms packets in it, 20-25 kbit/s more of a 256 kbit/s link than the 60 ms packets
    # it goes to, and held to a quarter of the usual pace near that rate, the photo's first minute went at
    # 115-135 kbit/s where the link had room for 180 (``nara bench upload``, issue 7's sixth round).
    thin_settle: float = 5.0
    # Seconds of a call's upload without its connection read after which a queue the call reports ends the
    # slow start (see ``_queue_seen``): only where the system gives no ``TCP_INFO``.
    unread_start: float = 10.0
    # With the server's transport feedback on the call's packets (``QueueSample``, edge/uplink.py): the queue
    # every packet of the last half second met, against this target, in place of the one packet's round trip
    # a report tells a second. On the 256 kbit/s uplink one of the photo's full packets takes 47 ms to send,
    # so a report that came behind one or two of them read 60-100 ms while the link was 83-88 % full, and cut
    # the rate by a tenth every 5-10 s (issue 7's eighth round); a queue that stands is the link being full.
    standing_target: float = 0.040
    standing_stale: float = 0.5  # seconds: an older standing queue says nothing of now (the report's then counts)
    # A cut for a standing queue leaves this share (a report's, at most 0.9): the queue is measured, not guessed
    # from one packet, and a second later it cuts again if it still stands. At 0.9 the rate spent 5-10 s of
    # every cycle growing back at a quarter of the usual pace; at 0.95 the link was 90-92 % full, not 86-88.
    standing_cut: float = 0.95
    # ... and the slow start may run to this many times what TCP delivered lately (a report's: ``start_headroom``):
    # a queue now shows within about half a second, and at 1.3 times, measured every two seconds, the photo's
    # first 10 s went at 66-111 kbit/s where the link had room for 180.
    standing_start_headroom: float = 1.6


class ScavengerRate:
    """The upload's rate, from the call's round-trip times."""

    def __init__(self, settings: ScavengerSettings) -> None:
        self.settings = settings
        self.rate = settings.ceiling
        self.base: float | None = None
        self.queueing: float | None = None
        self._history: deque[tuple[float, float]] = deque()  # (at, rtt), kept increasing in rtt
        self._last: RttSample | None = None
        self._updated_at: float | None = None
        self._cut_at = float("-inf")
        self._cut_queue = 0.0  # the queue that the last cut was for
        self._cut_report: RttSample | None = None  # the call's report that the last cut was for, if one
        self._restarted_at = float("-inf")  # when the connection's congestion control was last started afresh
        self._squeezed: tuple[float, float] | None = None  # (when, at what rate) a queue last showed in a call
        self._thin_since: float | None = None  # when the uplink last became thin
        self._presumed_until = float("-inf")  # the uplink counts as thin until then, unless shown otherwise
        self._knee: float | None = None  # the rate the last cut was for
        self._calling = False
        self._starting = False  # in slow start: no queue seen yet in this call
        self._began_at = 0.0  # when the call's upload began
        self.delivered: float | None = None  # bytes per second TCP delivered over the latest interval
        self.kept_up: bool | None = None  # whether TCP delivered what the rate asked over the latest interval
        self._misses = 0  # intervals in a row, on a settled connection, in which TCP did not keep up
        self._asked = 0.0  # bytes the rate asked for since the current delivery interval began
        self._asked_at: float | None = None
        self._mark: SocketSignal | None = None  # where the current delivery interval began
        self._deliveries: deque[tuple[float, float]] = deque()  # (at, bytes per second), kept decreasing
        self._recall: deque[tuple[float, float]] = deque()  # the same over recall_window
        self._heard: SocketSignal | None = None  # the last reading with news (an acknowledgement since the one before)
        self._settle_from = 0  # the connection's bytes acknowledged before it last came back from a silence
        # The upload connections' base: the lowest smoothed round trip of the last base_window, once full
        # packets set it (a connection's first round trips are of small packets, quicker through a thin link).
        self._socket_history: deque[tuple[float, float]] = deque()
        self.socket_queueing: float | None = None
        self._standing = False  # the latest update steered by the uplink's standing queue

    @property
    def in_call(self) -> bool:
        return self._calling

    def set_ceiling(self, ceiling: float) -> None:
        self.settings = ScavengerSettings(**{**self.settings.__dict__, "ceiling": ceiling})
        self.rate = min(self.rate, ceiling) if self.in_call else ceiling

    def update(self, now: float, sample: RttSample | None, in_call: bool | None = None, unsent: int = 0,
               sock: SocketSignal | None = None, queue: QueueSample | None = None) -> float:
        """The rate at ``now``; ``sample`` is the call's latest RTT, or None without a call.

        ``in_call`` says a call is up even before its first RTT (it defaults to ``sample is not None``):
        the rate then stays at the call's starting rate until there is a measurement. ``unsent``: bytes
        waiting unsent in the upload's socket. ``sock``: the upload connection's own reading, if any;
        with it the rate keeps near what TCP delivers and is cut as soon as the connection's round trip
        shows a queue (see ``_steer``). ``queue``: the queue standing in the uplink, if the call's transport
        feedback tells it; while fresh it stands for the queue in place of the round trip's, against
        ``standing_target``.
        """
        s = self.settings
        if self._asked_at is not None and sock is not None:
            self._asked += self.rate * max(0.0, now - self._asked_at)
        self._asked_at = now if sock is not None else None
        fresh_socket = self._watch_socket(sock)
        if sock is not None:
            unsent = max(unsent, sock.unsent)
        in_call = sample is not None if in_call is None else in_call
        if not in_call:
            self._history.clear()
            self._last, self.base, self.queueing = None, None, None
            self._calling = False
            self.rate = s.ceiling
            self._updated_at = now
            return self.rate
        if not self._calling:
            self._calling = self._starting = True
            self._presumed_until, self._thin_since = now + s.presume_thin, now
            self._began_at = now
            if sock is None:
                self._heard = None  # a connection read in an earlier call says nothing of this one's upload
            self.rate = max(s.floor, min(self.rate, s.call_start))  # a call begins: start low, grow
            self._updated_at = now
        if sample is None:
            self._updated_at = now
            return self.rate  # nothing measured yet: hold
        if self._last is None:
            self._updated_at = now  # growth counts from the first measurement
        if sample != self._last:
            self._learn(sample)
        self._last = sample
        assert self.base is not None
        queueing = max(0.0, sample.rtt - self.base)
        standing = self._standing = queue is not None and now - queue.at <= s.standing_stale
        if queue is not None and standing:
            queueing = queue.queue
        target = s.standing_target if standing else s.target
        steer_target = s.standing_target if standing else s.steer_target
        self.queueing = queueing
        elapsed = max(0.0, now - (self._updated_at if self._updated_at is not None else now))
        self._updated_at = now
        on_socket = self._socket_queue(queueing, standing or now - sample.at <= s.stale_after, steer_target)
        if fresh_socket is not None and on_socket > s.socket_target:
            self._starting = False
            self._cut(now, on_socket)  # seen per acknowledgement: no waiting for the next report
            return self.rate
        if not standing and now - sample.at > s.stale_after:
            # No report for a while: lost, or stuck behind a queue that has grown long. No news is not
            # good news: grown on an old "no queue", the rate ran to the ceiling while the audio waited.
            return self.rate
        if unsent > s.busy_after * self.rate and queueing <= target:
            return self.rate  # TCP is behind the rate: no growth (a queue above the target still cuts)
        if sock is not None:
            return self._steer(now, queueing, elapsed, on_socket, steer_target, None if standing else sample)
        if queueing > target:
            self._queue_seen(now)
            self._squeezed, self._presumed_until = (now, self.rate), float("-inf")
            if now - self._cut_at >= s.cut_interval:
                self.rate *= s.cut
                self._cut_at = now
        elif self._starting and queueing < target / 2:
            self.rate *= 2.0 ** (s.slow_start * elapsed)
        else:
            self._starting = False
            off_target = 1.0 - queueing / target
            self.rate += off_target * max(s.min_step, s.growth * self.rate) * elapsed
        self.rate = min(s.ceiling, max(s.floor, self.rate))
        return self.rate

    def _socket_queue(self, queueing: float, fresh: bool, steer_target: float) -> float:
        """The connection's queue as it counts: alone when long, else while the call's report agrees
        (else at most half its target: it slows the growth, and never cuts)."""
        s = self.settings
        on_socket = self.socket_queueing or 0.0
        if on_socket > s.socket_alone or (fresh and queueing >= steer_target / 2):
            return on_socket
        return min(on_socket, s.socket_target / 2)

    def _steer(self, now: float, queueing: float, elapsed: float, on_socket: float, steer_target: float,
               report: RttSample | None) -> float:
        """The rate beside a call, with the upload's own connection to read.

        The queue in front of the audio is the larger of the call's (late, from its reports) and the
        connection's (per acknowledgement), each against its target. Above it, the rate is cut at once
        to under what TCP delivered, the deeper the longer the queue. Below half of it, the rate grows
        (a slow start at first), but never beyond ``headroom`` times the most TCP delivered lately: a
        rate far above what the link carries fills its queue in seconds, ahead of the audio. A report
        (``report``: the call's queue came from one, not from the standing queue) cuts once: as an outage
        began, the last report before it cut the rate twice, a second apart, and it stayed there until the
        call was back.
        """
        s = self.settings
        pressure = max(queueing / steer_target, on_socket / s.socket_target)
        told = report is not None and report == self._cut_report and on_socket <= s.socket_target
        if pressure > 1.0 and told:
            self._queue_seen(now)  # that report's queue was cut for: hold until another says more
        elif pressure > 1.0:
            self._queue_seen(now)
            self._cut(now, max(queueing - steer_target, on_socket), report)
        elif self._starting and pressure < s.start_pressure:
            self._grow(self.rate * (2.0 ** (s.slow_start * elapsed) - 1.0))
        else:
            self._queue_seen(now)
            step = (1.0 - pressure) * max(s.min_step, s.growth * self.rate) * elapsed
            if self._knee is not None and s.knee_share * self._knee <= self.rate < s.knee_top * self._knee:
                step *= s.past_knee
            elif self._knee is not None and pressure < 0.5:
                step = max(step, min(s.regrowth * self.rate * elapsed, s.knee_share * self._knee - self.rate))
            self._grow(step)
        self.rate = min(s.ceiling, max(s.floor, self.rate))
        return self.rate

    def _queue_seen(self, now: float) -> None:
        """A queue showed: the slow start ends, unless the upload's connection has not carried ``socket_settle``
        yet (or not been read at all: the photo's first request still going). Seen as a photo's first bytes went
        (its requests, the agent busy starting it), such a queue ended the start at 35-50 kbit/s, and the usual
        pace took 20 s from there; one the call reported before the connection could be read ended it at 49
        kbit/s, and the usual pace took 26 s to 110 (``nara bench upload``, issue 7's sixth round). The rate is
        still cut, or grows at the usual pace while the queue lasts. Where no connection is read at all (no
        ``TCP_INFO``), the call's report alone ends it once ``unread_start`` seconds of the call's upload went."""
        unread = self._heard is None and now - self._began_at >= self.settings.unread_start
        self._starting = self._starting and not self._settled and not unread

    @property
    def _settled(self) -> bool:
        """The upload's connection has carried ``socket_settle``: its round trips and deliveries count."""
        return self._heard is not None and self._heard.acked - self._settle_from >= self.settings.socket_settle

    def _grow(self, step: float) -> None:
        share = self.share
        if share is None:
            return  # nothing delivered measured yet on this connection: hold
        s = self.settings
        recalled = self._recall[0][1] * s.recall_share if self._recall else 0.0
        if self.rate > max(share, recalled) and not (self._starting and self.kept_up):
            step *= 0.25  # above what TCP delivered lately: feel the way, slowly
        if self._starting and self._misses >= s.start_misses:
            # TCP no longer keeps up with the doubling, ``start_misses`` intervals in a row: the link is full, or
            # nearly. Only intervals on a connection that has carried ``socket_settle`` count: its own start
            # (handshake, first round trips, a loss repaired with a timeout) delivered 60-80 % of a slow start's
            # rate and ended it at 110 kbit/s, and growing from there at the usual pace took 20 s.
            self._starting = False
        start_headroom = s.standing_start_headroom if self._standing else s.start_headroom
        ceiling = share * start_headroom if self._starting else share * s.headroom + s.probe
        self.rate = max(self.rate, min(self.rate + step, max(ceiling, recalled)))

    def _cut(self, now: float, queue: float, report: RttSample | None = None) -> None:
        """Cut for a queue of ``queue`` seconds (told by ``report``, if by one): under what TCP delivered, the
        deeper the longer the queue."""
        s = self.settings
        thin = self.thin_uplink(now)
        self._squeezed = (now, min(self.rate, self.share or self.rate))
        self._presumed_until = float("-inf")  # the link has shown itself: judged by its queue from now
        if not thin and self.thin_uplink(now):
            self._thin_since = now
        if now - self._cut_at < s.cut_interval:
            return  # the last cut has not shown in the round trips yet
        if self.share is not None and queue < self._cut_queue and now - self._cut_at < 2 * s.cut_interval:
            return  # shorter than at the last cut: draining already (round trips are smoothed, and lag)
        # The rate this queue showed at: a second cut for the same queue, within ``knee_memory``, keeps the
        # first one's (after an outage the call's first reports cut twice, and the rate crept back from the
        # second cut's lower knee at a quarter of the usual pace, 140-160 kbit/s for 20 s).
        if self._thin_since is not None and now - self._thin_since < s.thin_settle:
            self._knee = None  # the call is about to take less of the link: the queue says little of the rest
        elif self._knee is None or now - self._cut_at > s.knee_memory:
            self._knee = self.rate
        else:
            self._knee = max(self._knee, self.rate)
        self._cut_at, self._cut_queue, self._cut_report = now, queue, report
        share = self.share
        if share is None:
            self.rate *= s.cut
        else:
            # Under the most TCP delivered lately (what the link carried of the upload), not the latest
            # interval's: that one follows the rate down after each cut, and the chunks' round trips.
            most = s.standing_cut if self._standing else 0.9
            keep = min(most, max(s.deepest_cut, 1.0 - queue / s.drain))
            self.rate = min(self.rate * most, share * keep)
        self.rate = max(s.floor, self.rate)

    def pacing_rate(self, now: float) -> float:
        """How fast the kernel may send the upload's bytes: the rate, with room to catch up after TCP repaired
        a loss (``catch_up``) beside a call unless a queue cut the rate in the last ``catch_up_after`` s, or
        the connection has not carried ``socket_settle`` yet: a new one has nothing to make up, and after an
        outage its first window at the catch-up rate met the call coming back (300 ms of queue in front of the
        audio, two cuts); nor in the ``catch_up_after`` s after its congestion control was started afresh
        (``restarted``): BBR starts at nearly three times its estimate, and at the catch-up rate the 7-8 kB that
        had waited unsent went into a link already full, the audio met 220-400 ms of queue, and the rate was
        cut by a tenth to two fifths."""
        s = self.settings
        if (not self._calling or now - max(self._cut_at, self._restarted_at) < s.catch_up_after
                or not self._settled):
            return self.rate
        return min(s.ceiling, self.rate * s.catch_up)

    def restarted(self, now: float) -> None:
        """The upload connection's congestion control was started afresh (``HeldEstimate``): see ``pacing_rate``."""
        self._restarted_at = now

    def backlog_limit(self) -> float:
        """The most bytes that may wait unsent in the upload's socket (``backlog`` seconds at the rate, at
        least ``MIN_BACKLOG``, beside a call; without one, no limit)."""
        if not self._calling:
            return float("inf")
        return max(MIN_BACKLOG, self.rate * self.settings.backlog)

    def thin_uplink(self, now: float) -> bool:
        """Whether the link is thin: lately a queue showed in front of the call while the upload carried
        less than ``thin_below`` (at most what it was sending and what TCP had delivered), or, as a call's
        upload begins, until it shows itself (``presume_thin``)."""
        s = self.settings
        if self._calling and now < self._presumed_until:
            carried = self.share if self._heard is not None else self.rate
            if carried is None or carried < s.thin_below:
                return True
            self._presumed_until = float("-inf")  # room shown
        return self._squeezed is not None and now - self._squeezed[0] < s.thin_hold and self._squeezed[1] < s.thin_below

    def thin_presumed(self, now: float) -> bool:
        """Whether the uplink counts as thin only by presumption, as a call's upload began (``presume_thin``;
        a queue, which every cut is for, ends the presumption)."""
        return self._calling and now < self._presumed_until

    @property
    def share(self) -> float | None:
        """The most TCP delivered per interval over the last ``delivery_window`` (bytes per second)."""
        return self._deliveries[0][1] if self._deliveries else None

    def _watch_socket(self, sock: SocketSignal | None) -> SocketSignal | None:
        """Learn what TCP delivered; the reading if it brings news (an acknowledgement since the last one)."""
        if sock is None:
            return None
        s = self.settings
        mark = self._mark
        if mark is None or mark.connection != sock.connection or sock.acked < mark.acked:
            self._mark = self._heard = sock
            self._settle_from = 0
            self._asked, self.kept_up, self._misses = 0.0, None, 0
            return None
        news = self._heard is None or sock.acked != self._heard.acked
        if news:
            if self._heard is not None and sock.at - self._heard.at > s.resume_silence:
                self._settle_from = self._heard.acked  # back from a silence: it settles anew
            self._heard = sock
            self._learn_socket(sock)
        span = sock.at - mark.at
        interval = s.start_interval if self._starting and self._standing else s.delivery_interval
        if span >= interval or (span >= s.short_interval and sock.acked - mark.acked >= s.short_bytes):
            delivered = (sock.acked - mark.acked) / span
            self.kept_up = delivered * span >= s.kept_up_share * self._asked
            settled = mark.acked - self._settle_from >= s.socket_settle
            self._misses = self._misses + 1 if settled and not self.kept_up else 0
            self._mark, self._asked = sock, 0.0
            self.delivered = delivered
            if delivered > 0:  # nothing at all delivered: an outage or a pause, which says nothing of the link
                for history in (self._deliveries, self._recall):
                    while history and history[-1][1] <= delivered:
                        history.pop()
                    history.append((sock.at, delivered))
        for history, window in ((self._deliveries, s.delivery_window), (self._recall, s.recall_window)):
            while history and history[0][0] < sock.at - window:
                history.popleft()
        return sock if news else None

    def _learn_socket(self, sock: SocketSignal) -> None:
        history = self._socket_history
        settled = sock.acked - self._settle_from >= self.settings.socket_settle
        if settled:
            while history and history[-1][1] >= sock.rtt:
                history.pop()
            history.append((sock.at, sock.rtt))
        while history and history[0][0] < sock.at - self.settings.base_window:
            history.popleft()
        # A connection's queue counts only once it has settled too: the first round trips of one opened just
        # after an outage were inflated to 2 s, read against the last one's base as a queue of a second, and
        # cut the rate from 189 to 77 kbit/s (the call's report still shows a real queue meanwhile).
        self.socket_queueing = max(0.0, sock.rtt - history[0][1]) if history and settled else None

    def _learn(self, sample: RttSample) -> None:
        history = self._history
        while history and history[-1][1] >= sample.rtt:
            history.pop()
        history.append((sample.at, sample.rtt))
        while history[0][0] < sample.at - self.settings.base_window:
            history.popleft()
        self.base = history[0][1]


class HeldEstimate:
    """Notices the upload connection's BBR holding its bandwidth estimate under the rate: its long-term
    ("policer") mode. BBR enters it after two sampling intervals of a few round trips each that lost a fifth
    of their packets at about the same throughput, takes their throughput as the link's and paces at it with
    a gain of 1 for 48 round trips, about 10 s here. On a link that loses 10 % at random, with a few packets
    per round trip, that happens now and then, and the photo then went at 130-180 kbit/s for 10-14 s while
    the rate asked 200 and no queue showed (``nara bench upload``, issue 7's sixth and ninth rounds).

    ``held`` says when to start the connection's congestion control afresh (``edge.tcpinfo``): the gain
    has stayed at exactly 1 and the estimate unchanged for ``held_for`` seconds (and for ``rounds`` of its
    round trips: while probing, BBR leaves a gain of 1 after six), under ``share`` of the rate; at most once
    per ``every`` seconds. Everything here takes ``now`` as an argument.
    """

    def __init__(self, held_for: float = 3.0, rounds: int = 10, share: float = 0.95, every: float = 15.0) -> None:
        self.held_for = held_for
        self.rounds = rounds
        self.share = share
        self.every = every
        self._since: float | None = None  # when the gain and the estimate last became what they are
        self._seen: tuple[int, float] | None = None
        self._restarted_at = float("-inf")
        self.restarts = 0

    def held(self, now: float, bandwidth: int, pacing_gain: float, min_rtt: float, rate: float) -> bool:
        """Whether to restart, given BBR's estimate (bytes per second), its pacing gain and round trip now,
        and the upload's rate (bytes per second)."""
        seen = (bandwidth, pacing_gain)
        if seen != self._seen or pacing_gain != 1.0:
            self._seen, self._since = seen, now
            return False
        assert self._since is not None
        if now - self._since < max(self.held_for, self.rounds * min_rtt) or bandwidth >= self.share * rate:
            return False
        if now - self._restarted_at < self.every:
            return False
        self._restarted_at, self._seen, self._since = now, None, None
        self.restarts += 1
        return True


def chunk_size(rate: float, seconds: float = 1.5, smallest: int = MIN_CHUNK, largest: int = MAX_CHUNK) -> int:
    """Bytes per PATCH: about ``seconds`` at ``rate`` bytes per second, within the bounds."""
    return int(min(largest, max(smallest, rate * seconds)))
