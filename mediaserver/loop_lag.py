"""How far behind a media worker's event loop runs, and the work it sheds while it is behind.

Every datagram that reaches a worker waits for its loop to get to it. Near the
core's capacity a stall (a collector's pass, a burst of keyframes) leaves the
loop behind for a while; past about three quarters of the core the benchmark
saw it fall behind for good (docs/benchmarks.md, issue 9): datagrams queued,
copies went out late and some work only added to the backlog. Some of what a
worker does can wait, or is worth doing only on time:

* a ladder (a decoder of the original and an encoder for a new subscriber's
  layer) costs a tenth of a core or more, and its thread shares the
  interpreter with the loop;
* a probe's padding measures a subscriber's link by duplicating its packets
  (up to several times its rate): on a worker that is behind, what it would
  measure is the worker, and the duplicates are load with no picture in them;
* a resend a subscriber asked for is useful only before the receiver gives up
  waiting for it, and costs as much as a fresh copy.

So the worker measures its loop's lateness (``LoopLag``: a timer every
``TICK`` that notes how late it ran, smoothed). While that is over
``BUSY_LAG`` (*behind*) no ladder and no new probe starts (``ladder.Ladder``,
``forwarder.Subscription``); while it is over ``SHED_LAG`` (*far behind*) no
resend is sent either. Resends
are shed only that late because a lost packet not resent costs the receiver
more than the packet: its picture stops at the gap until the next keyframe
(on loopback, a subscriber losing one video packet in 25 stopped decoding the
moment its resends were shed). Far behind, every call on the worker is
already late, and the resends' load is what keeps it there. The media itself
is never shed: every subscriber keeps every packet of its stream.

The smoothed lag also goes to the main process with each load report, where
placement keeps new consultations off a worker that is behind
(``pool.least_loaded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable

TICK = 0.05  # seconds between two looks at the loop's lateness
SMOOTHING = 0.25  # seconds: the time constant of the smoothed lag
# A loop whose timers run this late (smoothed) is behind: a quarter of its ticks 40 ms late, or all of them 10 ms.
BUSY_LAG = 0.010
SHED_LAG = 0.050  # ... and far behind: resends are shed too


class LoopLag:
    """The loop's lateness, smoothed: ``note`` how late each tick ran; ``busy`` while it is over BUSY_LAG,
    ``shedding`` while it is over SHED_LAG.

    The clock is a parameter (``now`` in ``note``), so the smoothing is exact under a fake clock; ``watch``
    is the thin part that reads a real loop.
    """

    def __init__(self, busy_lag: float = BUSY_LAG, shed_lag: float = SHED_LAG, smoothing: float = SMOOTHING) -> None:
        self.busy_lag = busy_lag
        self.shed_lag = shed_lag
        self.smoothing = smoothing
        self.lag = 0.0  # seconds, smoothed
        self.noted_at: float | None = None
        self.busy = False
        self.shedding = False
        self._task: asyncio.Task[None] | None = None

    def note(self, late: float, now: float) -> None:
        """A tick due at ``now - late`` ran at ``now``."""
        late = max(late, 0.0)
        if self.noted_at is None:
            self.lag = late
        else:
            # A tick stands for the time since the last: one long stall weighs what it held up, not one tick.
            kept = math.exp(-max(now - self.noted_at, 0.0) / self.smoothing)
            self.lag = self.lag * kept + late * (1.0 - kept)
        self.noted_at = now
        self.busy = self.lag >= self.busy_lag
        self.shedding = self.lag >= self.shed_lag

    def start(self, clock: Callable[[], float] | None = None) -> None:
        """Watch the running loop from now on (once; ``stop`` ends it)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self.watch(clock))

    async def watch(self, clock: Callable[[], float] | None = None) -> None:
        read = clock or asyncio.get_running_loop().time
        while True:
            due = read() + TICK
            await asyncio.sleep(TICK)  # (the tick itself: how late it wakes is the measurement)
            now = read()
            self.note(now - due, now)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# (a publication outside a media server: nothing to shed for)
NEVER_BUSY = LoopLag(busy_lag=math.inf, shed_lag=math.inf)
