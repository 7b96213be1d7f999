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

Wound photos (``edge/photo_flow.py``) go into the durable outbox in the data
directory; a photo belongs to the consultation the kit is in, or was last
assigned to. A clinician's ``photo-requested`` event reaches the flow from
the call. The uploader (``edge/uploader.py``) delivers the outbox all the
time, beside a call at a rate that yields to it (the call's round trips come
from its receiver reports), and tries again at once when the agent reaches
the server after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mediaserver.aiortc_adapter import THIN_FEEDBACK_INTERVAL
from mediaserver.encoders import NORMAL, THIN_UPLINK

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
from .outbox import Outbox, OutboxError, OutboxItem
from .pacing import NO_CALL, CallSignal, RttSample
from .photo_flow import PhotoFlow
from .reconnect import Backoff, Failure, Reconnector, State, Step, Transition
from .remote import RemoteMedia, Speaker
from .uploader import Uploader, UploadSettings

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
        self.photos = PhotoFlow(config, self.touch)
        self.outbox: Outbox | None = None
        self.outbox_error: str | None = None
        self.uploader: Uploader | None = None
        self._last_rtt: RttSample | None = None  # the latest round trip of any call, for the uploader
        self.call: KitCall | None = None  # the call under way, if any
        self._feedback_interval: float | None = None  # the calls' transport feedback pace (None: the usual)

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
            "photos": {**self.photos.public(), "outbox_error": self.outbox_error},
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
            if self.outbox is not None:
                self.outbox.close()
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
        self._open_outbox()
        self.media = await KitMedia.open(self.config.camera, self.config.microphone,
                                         self.config.width, self.config.height, self.config.fps)
        self._notify()  # the camera's state is on the page before the first answer
        if self.speaker is not None:
            self.speaker.start()
        api = DeviceApi(self.config.server, self.credential)
        uploading = self._start_uploads()
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
            if uploading is not None:
                uploading.cancel()
                await asyncio.gather(uploading, return_exceptions=True)
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
            if self.outbox is not None:
                self.outbox.remember_consultation(answer.consultation_id)
            self.machine.assigned(now(), f"assigned to consultation {answer.consultation_id}")
        else:
            self.upcoming = answer
            self.machine.idle(now())

    async def _join(self) -> None:
        assert self.assignment is not None and self.media is not None
        now = self._loop.time
        self.calls += 1
        call = KitCall(self.config.server, self.assignment, self.media, self.remote, turn=self.config.turn,
                       timings=self.timings.call, on_connected=lambda: self.machine.connected(now()),
                       on_event=self.call_event)
        call.pace_feedback(self._feedback_interval)
        self.call = call
        try:
            end = await call.run()
        finally:
            self.call = None
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

    # --- photos ----------------------------------------------------------------------------------

    def _open_outbox(self) -> None:
        """Open the photo outbox; a kit whose outbox cannot be opened still calls, and its screen says why."""
        try:
            self.outbox = Outbox.open(self.config.outbox_dir)
        except OutboxError as exc:
            logger.error("photo outbox unavailable: %s", exc)
            self.outbox_error = exc.code
            return
        self.outbox.on_change = self._touch_threadsafe  # also called from worker threads
        self.photos.outbox = self.outbox

    def _start_uploads(self) -> asyncio.Task[None] | None:
        """Deliver the outbox from now on, as a task of its own (None without an outbox)."""
        if self.outbox is None or self.credential is None:
            return None
        self.uploader = Uploader(self.outbox, self.config.server, self.credential, call=self.call_signal,
                                 settings=UploadSettings(ceiling_kbps=self.config.upload_kbps))
        self.uploader.on_change = self.touch
        self.uploader.on_thin_uplink = self._thin_uplink
        self.photos.uploader_status = self.uploader.status
        self.outbox.on_change = self._outbox_changed
        return self._loop.create_task(self.uploader.run())

    def _thin_uplink(self, thin: bool) -> None:
        """The uploader found the uplink thin (a queue in front of the call at a low rate), or no longer:
        the call's audio goes in fewer, longer packets meanwhile, for less of the link in headers, and its
        transport feedback a quarter of a second apart instead of 75 ms (2 kbit/s of the uplink, not 8)."""
        self._feedback_interval = THIN_FEEDBACK_INTERVAL if thin else None
        if self.call is not None:
            self.call.pace_feedback(self._feedback_interval)
        if self.media is not None:
            self.media.use_audio(THIN_UPLINK if thin else NORMAL)
            logger.info("call audio: %d kbit/s in %d ms packets", self.media.audio_profile.bitrate // 1000,
                        self.media.audio_profile.packet_ms)

    def _outbox_changed(self) -> None:
        """The outbox changed, maybe in a worker thread: the page shows it, and a new photo goes at once."""
        self._touch_threadsafe()
        if self.uploader is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self.uploader.wake()

    def call_signal(self) -> CallSignal:
        """For the uploader: whether a call is up, its latest round trip, and the queue standing in the uplink.

        A dropped call being rebuilt still counts, with the last round trip it had (which soon grows old,
        and holds the upload's rate): the link is the same, and an upload at its ceiling there took the
        whole link just as the call came back.
        """
        call = self.call
        if call is not None and call.rtt is not None:
            self._last_rtt = call.rtt
        if self.machine.state is State.RECONNECTING and self.assignment is not None:
            return CallSignal(True, self._last_rtt)
        if call is None or self.machine.state not in (State.CONNECTING, State.CONNECTED):
            return NO_CALL
        return CallSignal(True, call.rtt if call.rtt is not None else self._last_rtt, call.uplink)

    def call_event(self, event: dict[str, Any]) -> None:
        """A message of the call's signalling that is not about the call itself."""
        if event.get("type") == "photo-requested":
            self.photos.requested(event)

    def photo_consultation(self) -> str | None:
        """The consultation a photo taken now belongs to: the current or the last assignment."""
        if self.assignment is not None:
            return self.assignment.consultation_id
        return self.outbox.last_consultation() if self.outbox is not None else None

    async def save_photo(self, photo_id: str, form: dict[str, Any]) -> OutboxItem:
        """Keep the photo on the screen; raises ``PhotoFormError`` or ``OutboxError``."""
        device = self.credential.name if self.credential is not None else ""
        patient_ref = self.assignment.patient_ref if self.assignment is not None else ""
        return await self.photos.save(photo_id, form, consultation=self.photo_consultation(), device=device,
                                      patient_ref=patient_ref)

    # --- telling others ------------------------------------------------------------------------

    def _changed(self, transition: Transition) -> None:
        self.since = time.time()
        logger.info("state=%s previous=%s reason=%r", transition.new.value, transition.old.value, transition.reason)
        back = transition.new in (State.WAITING, State.CONNECTING, State.CONNECTED)
        if back and transition.old in (State.NO_NETWORK, State.RECONNECTING) and self.uploader is not None:
            self.uploader.network_back()  # the server answers again: a waiting upload need not wait on
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

    def _touch_threadsafe(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is looking
            self._loop.call_soon_threadsafe(self.touch)


_pending: set[asyncio.Task[None]] = set()


async def _forever() -> None:
    await asyncio.Event().wait()
