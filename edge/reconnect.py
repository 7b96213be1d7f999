"""When the kit tries to (re)connect: a pure state machine on a clock it is given.

The agent (``edge/agent.py``) reports what happened — the server answered,
a call was joined, the link died, the kit was revoked — with the time it
happened, and asks ``next_step(now)`` what to do. Nothing here sleeps,
touches a socket or reads a clock, so the tests drive it on a fake clock.

Retries back off exponentially with full jitter (a uniformly random wait
between zero and ``base × 2^attempt``, at most ``cap``), so a hundred kits
that lost the same server do not all come back in the same second. While
waiting, the agent probes the server cheaply; when a probe is answered the
network is back and the wait ends at once. A call that stayed up for
``stable_after`` seconds starts the count again, so the first retry after a
long good call is quick. A revoked kit, or one with a broken configuration,
stops for good.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    STARTING = "starting"
    NO_NETWORK = "no_network"  # the server's name does not resolve, or there is no route
    WAITING = "waiting"  # the server answered: no consultation is due for this kit
    CONNECTING = "connecting"  # joining the consultation the server assigned
    CONNECTED = "connected"  # in the consultation, media flowing
    RECONNECTING = "reconnecting"  # the link or the server went away; retrying
    REVOKED = "revoked"  # IT staff revoked the kit's credential: stop until enrolled again
    CONFIG_ERROR = "config_error"  # the configuration or credential cannot be used: stop


FINAL_STATES = frozenset({State.REVOKED, State.CONFIG_ERROR})


class Step(StrEnum):
    """What the agent does next."""

    ASK = "ask"  # ask the server where the kit should be (a long poll while waiting)
    JOIN = "join"  # join the assigned consultation and stay in it until the call ends
    PAUSE = "pause"  # wait until ``retry_at``, probing the server meanwhile
    STOP = "stop"


class Failure(StrEnum):
    """Why an attempt or a call ended."""

    NO_NETWORK = "no_network"  # name resolution failed, network or host unreachable
    UNREACHABLE = "unreachable"  # refused, timed out, or the server answered with a 5xx
    HEARTBEAT = "heartbeat"  # no pong on the signalling connection in time
    MEDIA = "media"  # nothing arrived on the media connection in time
    CLOSED = "closed"  # the server closed the call
    REFUSED = "refused"  # the server refused the join or the request


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with full jitter, in seconds."""

    base: float = 0.5
    cap: float = 30.0

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (0 for the first)."""
        return min(self.cap, self.base * 2.0 ** min(attempt, 32))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(attempt))


@dataclass(frozen=True)
class Transition:
    at: float
    old: State
    new: State
    reason: str


class Reconnector:
    """The kit's connection state and when to try next."""

    def __init__(
        self,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        *,
        stable_after: float = 10.0,
        ask_spacing: float = 1.0,
        on_change: Callable[[Transition], None] | None = None,
    ) -> None:
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.stable_after = stable_after
        self.ask_spacing = ask_spacing  # the least time between two questions while waiting
        self.on_change = on_change
        self.state = State.STARTING
        self.reason = ""
        self.attempt = 0  # failures in a row
        self.retry_at: float | None = None
        self.connected_at: float | None = None
        self.asked_at: float | None = None
        self.transitions: list[Transition] = []

    # --- what the agent asks ----------------------------------------------------------

    def next_step(self, now: float) -> Step:
        if self.state in FINAL_STATES:
            return Step.STOP
        if self.state is State.CONNECTING:
            return Step.JOIN
        if self.retry_at is not None and now < self.retry_at:
            return Step.PAUSE
        return Step.ASK

    def asking(self, now: float) -> None:
        """The agent is about to ask the server."""
        self.asked_at = now
        self.retry_at = None

    # --- what the agent reports -------------------------------------------------------

    def idle(self, now: float, reason: str = "no consultation is due") -> None:
        """The server answered: nothing to join now."""
        self.attempt = 0
        # A server that answers a long poll at once must not make the kit ask in a loop.
        asked = self.asked_at if self.asked_at is not None else now
        self.retry_at = asked + self.ask_spacing if now < asked + self.ask_spacing else None
        self._move(now, State.WAITING, reason)

    def assigned(self, now: float, reason: str = "assigned to a consultation") -> None:
        self.retry_at = None
        self._move(now, State.CONNECTING, reason)

    def connected(self, now: float, reason: str = "media is flowing") -> None:
        self.connected_at = now
        self._move(now, State.CONNECTED, reason)

    def failed(self, now: float, failure: Failure, detail: str = "") -> float:
        """An attempt or a call ended badly; returns the wait before the next try."""
        if self.state in FINAL_STATES:
            return 0.0
        if self.connected_at is not None and now - self.connected_at >= self.stable_after:
            self.attempt = 0
        self.connected_at = None
        wait = self.backoff.delay(self.attempt, self.rng)
        self.attempt += 1
        self.retry_at = now + wait
        state = State.NO_NETWORK if failure is Failure.NO_NETWORK else State.RECONNECTING
        self._move(now, state, f"{failure.value}: {detail}" if detail else failure.value)
        return wait

    def server_answered(self, now: float) -> None:
        """A probe reached the server during a wait: try again at once."""
        if self.retry_at is not None and self.state in (State.RECONNECTING, State.NO_NETWORK):
            self.retry_at = now

    def revoked(self, now: float, reason: str) -> None:
        self.retry_at = None
        self._move(now, State.REVOKED, reason)

    def config_error(self, now: float, reason: str) -> None:
        self.retry_at = None
        self._move(now, State.CONFIG_ERROR, reason)

    def _move(self, now: float, state: State, reason: str) -> None:
        if state == self.state and reason == self.reason:
            return
        transition = Transition(now, self.state, state, reason)
        self.state, self.reason = state, reason
        self.transitions.append(transition)
        del self.transitions[:-100]
        if self.on_change is not None:
            self.on_change(transition)
