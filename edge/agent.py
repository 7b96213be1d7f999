"""The kit's agent: asks the server where to be, joins, stays connected, and says how it is going.

The decisions are ``edge.reconnect.Reconnector``'s, made on the event loop's
clock; this module carries them out:

* ASK: ``POST /api/devices/{id}/session`` — a long poll while the kit is
  waiting (it answers as soon as a consultation is due or a clinician presses
  "call the home kit"), a quick question after a failure;
* JOIN: one ``KitCall`` with a fresh peer connection, until it ends;
* PAUSE: wait out the back-off, probing ``/healthz`` once a second, and go
  at once when the server answers.

Every change of state is logged (``state=… previous=… reason=…``, never a
secret or a token) and handed to listeners: the local page and systemd's
STATUS line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .call import CallTimings, KitCall
from .config import EdgeConfig
from .device_api import (
    Assignment,
    CredentialError,
    DeviceApi,
    DeviceCredential,
    Idle,
    Refused,
    Unreachable,
    read_credential,
)
from .media import KitMedia, MediaStatus
from .reconnect import Backoff, Failure, Reconnector, State, Step, Transition
from .remote import RemoteMedia, Speaker

logger = logging.getLogger("edge.agent")


@dataclass(frozen=True)
class AgentTimings:
    probe_interval: float = 1.0
    # With no route at all a probe fails at once without sending a packet, so it can be
    # repeated often: the kit is back within a fraction of a second of its network.
    no_network_probe_interval: float = 0.25
    probe_timeout: float = 1.0
    session_wait: float = 25.0
    backoff: Backoff = field(default_factory=Backoff)
    call: CallTimings = field(default_factory=CallTimings)


class KitAgent:
    def __init__(self, config: EdgeConfig, *, timings: AgentTimings | None = None,
                 rng: random.Random | None = None, speaker: Speaker | None = None) -> None:
        self.config = config
        self.timings = timings or AgentTimings()
        self.machine = Reconnector(self.timings.backoff, rng, on_change=self._changed)
        self.media: KitMedia | None = None
        self.remote = RemoteMedia(speaker)
        self.speaker = speaker
        self.credential: DeviceCredential | None = None
        self.assignment: Assignment | None = None
        self.upcoming: Idle | None = None
        self.calls = 0  # calls joined since start
        self.since = time.time()
        self.changed = asyncio.Condition()
        self.listeners: list[Callable[[Transition], None]] = []
        self._loop = asyncio.get_running_loop()

    # --- what others read ----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.machine.state

    def status(self) -> dict[str, Any]:
        """What the local page shows: state, why, the consultation, the camera."""
        media = self.media.status if self.media is not None else MediaStatus(camera="off", microphone="off")
        next_call = None
        if self.upcoming is not None and self.upcoming.scheduled_for is not None:
            next_call = self.upcoming.scheduled_for
        in_call = self.machine.state in (State.CONNECTING, State.CONNECTED)
        return {
            "state": self.machine.state.value,
            "reason": self.machine.reason,
            "since": self.since,
            "kit": self.credential.name if self.credential is not None else None,
            "consultation": self.assignment.title if self.assignment is not None and in_call else None,
            "next_call": next_call,
            "language": self.config.language,
            "speaker": bool(self.speaker is not None and self.speaker.working),
            **media.public(),
        }

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until ``predicate()`` holds; checked at every change of state."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    # --- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled; a revoked or unconfigured kit stays up, saying why, until stopped."""
        try:
            await self._run()
        finally:
            self.remote.forget_all()
            if self.media is not None:
                await self.media.close()
            if self.speaker is not None:
                self.speaker.stop()

    async def _run(self) -> None:
        now = self._loop.time
        try:
            self.credential = read_credential(self.config.credential)
        except CredentialError as exc:
            self.machine.config_error(now(), str(exc))
            await _forever()  # stay up: the screen says why, and systemd need not restart us
            return
        self.media = await KitMedia.open(self.config.camera, self.config.microphone,
                                         self.config.width, self.config.height, self.config.fps)
        self._notify()  # the camera's state is on the page before the first answer
        if self.speaker is not None:
            self.speaker.start()
        api = DeviceApi(self.config.server, self.credential)
        try:
            while True:
                step = self.machine.next_step(now())
                if step is Step.STOP:
                    await _forever()
                elif step is Step.ASK:
                    await self._ask(api)
                elif step is Step.JOIN:
                    await self._join()
                else:
                    await self._pause(api)
        finally:
            await api.close()

    async def _ask(self, api: DeviceApi) -> None:
        now = self._loop.time
        waiting = self.machine.state is State.WAITING  # a long poll; otherwise a quick question
        self.machine.asking(now())
        try:
            answer = await api.session(self.timings.session_wait if waiting else 0.0)
        except Refused as exc:
            if exc.revoked:
                self.machine.revoked(now(), "device_revoked: IT staff revoked this kit; it must be enrolled again")
            elif exc.needs_enrolment:
                self.machine.config_error(now(), f"{exc.code}: the kit must be enrolled again")
            else:
                self.machine.failed(now(), Failure.REFUSED, exc.code)
            return
        except Unreachable as exc:
            self.machine.failed(now(), exc.failure, exc.detail)
            return
        if isinstance(answer, Assignment):
            self.assignment = answer
            self.machine.assigned(now(), f"assigned to consultation {answer.consultation_id}")
        else:
            self.upcoming = answer
            self.machine.idle(now())

    async def _join(self) -> None:
        assert self.assignment is not None and self.media is not None
        now = self._loop.time
        self.calls += 1
        call = KitCall(self.config.server, self.assignment, self.media, self.remote, turn=self.config.turn,
                       timings=self.timings.call, on_connected=lambda: self.machine.connected(now()))
        end = await call.run()
        if end.revoked:
            self.machine.revoked(now(), "device_revoked: IT staff revoked this kit; it must be enrolled again")
        else:
            self.machine.failed(now(), end.failure, end.detail)

    async def _pause(self, api: DeviceApi) -> None:
        """Wait for the retry time; while reconnecting, probe the server and go as soon as it answers."""
        now = self._loop.time
        retry_at = self.machine.retry_at
        if retry_at is None:
            return
        if self.machine.state is State.WAITING:
            await asyncio.sleep(max(0.0, retry_at - now()))
            return
        while now() < retry_at:
            started = now()
            if await api.probe(min(self.timings.probe_timeout, retry_at - started)):
                self.machine.server_answered(now())
                return
            interval = self.timings.probe_interval
            if self.machine.state is State.NO_NETWORK:
                interval = self.timings.no_network_probe_interval
            await asyncio.sleep(max(0.0, min(started + interval, retry_at) - now()))

    # --- telling others ------------------------------------------------------------------------

    def _changed(self, transition: Transition) -> None:
        self.since = time.time()
        logger.info("state=%s previous=%s reason=%r", transition.new.value, transition.old.value, transition.reason)
        for listener in list(self.listeners):
            listener(transition)
        self._notify()

    def _notify(self) -> None:
        async def wake() -> None:
            async with self.changed:
                self.changed.notify_all()

        task = self._loop.create_task(wake())
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    def touch(self) -> None:
        """Something the page shows changed without a change of state (e.g. the camera)."""
        self._notify()


_pending: set[asyncio.Task[None]] = set()


async def _forever() -> None:
    await asyncio.Event().wait()
