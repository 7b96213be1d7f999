"""The network doctor's peer on the server: a WebRTC connection to the SFU's host that joins no consultation.

A client (``nara doctor`` or the ``/doctor/`` page) offers one data channel,
named ``doctor``, and asks over it in JSON text messages:

* ``{"type": "ping", "seq": n, ...}``: the same message comes back with
  ``"type": "pong"``; the client times the round trip.
* ``{"type": "down", "seconds": s, "bytes": b}``: binary messages follow as
  fast as the channel takes them, for at most ``s`` seconds and ``b`` bytes
  (both capped here), then ``{"type": "down-done", "bytes": n, "seconds": d}``.
  The client measures what arrives.
* ``{"type": "up", "seconds": s, "bytes": b}``: the client sends binary
  messages, then ``{"type": "up-end"}``; the answer, once ``s`` seconds have
  passed since the first binary message arrived or at ``up-end`` if that is
  sooner, is ``{"type": "up-done", "bytes": n, "seconds": d}``: the bytes that
  arrived in that window after the first message, and the time from its
  arrival to the last one's, so it is the rate that reached the server.

Anything else gets ``{"type": "error", "code": ..., "message": ...}``. The peer
closes itself after ``lifetime`` seconds whatever the client does, after
``connect_within`` seconds if the connection has not come up by then, and
after it has sent or received more than ``MAX_TOTAL_BYTES``. Nothing received is
kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription

logger = logging.getLogger(__name__)

CHANNEL_LABEL = "doctor"
CHUNK = 16 * 1024  # bytes per binary message; browsers and aiortc take up to 64 KiB
MAX_SECONDS = 5.0  # one bandwidth test, either way
MAX_BYTES = 4 * 1024 * 1024  # one bandwidth test, either way
MAX_TOTAL_BYTES = 4 * MAX_BYTES  # everything sent and received over one peer's life
BUFFERED_HIGH = 64 * 1024  # stop queueing while this much waits unsent (under 4 s at 150 kbit/s)
MAX_TEXT = 1024  # a control message's length


class ProbeRequestError(ValueError):
    """A control message the doctor peer does not take."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def transfer_limits(message: dict[str, Any]) -> tuple[float, int]:
    """The seconds and bytes a ``down`` or ``up`` request asks for, capped at the server's limits."""
    seconds, size = message.get("seconds", MAX_SECONDS), message.get("bytes", MAX_BYTES)
    for name, value in (("seconds", seconds), ("bytes", size)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ProbeRequestError("request_invalid", f"{name} must be a positive number.")
    return min(float(seconds), MAX_SECONDS), min(int(size), MAX_BYTES)


class Receipt:
    """Bytes arriving in a bandwidth test: how many, and over what time, in a window from the first message.

    Bytes after ``window`` seconds are not counted: on a thin link what is still
    queued then takes a while to drain (and SCTP's retransmission timer, at
    least a second, stretches it further), which says nothing about the rate.
    ``on_window_end`` is called once the window has passed.
    """

    def __init__(self, window: float, on_window_end: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.on_window_end = on_window_end
        self.clock = clock
        self.first: float | None = None
        self.last: float | None = None
        self.bytes = 0  # after the first message, which only starts the clock

    def add(self, size: int) -> None:
        now = self.clock()
        if self.first is None:
            self.first = now
            if self.on_window_end is not None:
                asyncio.get_running_loop().call_later(self.window, self.on_window_end)
        elif now - self.first <= self.window:
            self.bytes += size
        else:
            return
        self.last = now

    @property
    def seconds(self) -> float:
        return 0.0 if self.first is None or self.last is None else self.last - self.first

    def kbps(self) -> float | None:
        """The rate in the window, or None if too little arrived to tell."""
        return self.bytes * 8 / self.seconds / 1000 if self.seconds >= 0.05 else None

    def summary(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "bytes": self.bytes, "seconds": round(self.seconds, 4)}


async def send_for(channel: RTCDataChannel, seconds: float, size: int, clock: Callable[[], float] = time.monotonic,
                   ) -> int:
    """Send binary messages as fast as ``channel`` takes them, for ``seconds`` or ``size`` bytes; the bytes queued."""
    low = asyncio.Event()
    channel.bufferedAmountLowThreshold = BUFFERED_HIGH // 2

    @channel.on("bufferedamountlow")
    def _drained() -> None:
        low.set()

    payload = bytes(CHUNK)
    deadline = clock() + seconds
    sent = 0
    try:
        while sent < size and clock() < deadline and channel.readyState == "open":
            if channel.bufferedAmount > BUFFERED_HIGH:
                low.clear()
                try:
                    await asyncio.wait_for(low.wait(), max(0.0, deadline - clock()))
                except TimeoutError:
                    break
                continue
            piece = payload[: min(CHUNK, size - sent)]
            channel.send(piece)
            sent += len(piece)
            await asyncio.sleep(0)  # let the SCTP transport run between messages
    finally:
        channel.remove_listener("bufferedamountlow", _drained)
    return sent


class DoctorPeer:
    """One client's connection for the network doctor; see the module's description."""

    def __init__(self, lifetime: float, on_closed: Callable[[DoctorPeer], None] | None = None,
                 connect_within: float = 20.0) -> None:
        # No ICE servers: the server's own host candidates (the SFU's media addresses) are
        # what is tested; the client brings the relay when it tests TURN.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.lifetime = lifetime
        self.connect_within = connect_within  # a client whose connection fails does not hold a place for long
        self.on_closed = on_closed
        self.closed = False
        self.total_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._receipt: Receipt | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._unconnected: asyncio.TimerHandle | None = None
        self.pc.on("datachannel", self._on_channel)
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer_sdp: str) -> str:
        """Take the client's offer and return the answer, with this peer's candidates in it."""
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(self.lifetime, self._spawn_close)
        self._unconnected = loop.call_later(self.connect_within, self._close_unless_connected)
        await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_close(self) -> None:
        self._spawn(self.close())

    def _close_unless_connected(self) -> None:
        if self.pc.connectionState != "connected":
            self._spawn_close()

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    def _on_channel(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL:
            channel.close()
            return

        @channel.on("message")
        def _message(data: str | bytes) -> None:
            if isinstance(data, bytes):
                self._received(len(data))
            else:
                self._control(channel, data)

    def _count(self, size: int) -> bool:
        self.total_bytes += size
        if self.total_bytes > MAX_TOTAL_BYTES:
            logger.info("doctor peer closed: more than %d bytes over its life", MAX_TOTAL_BYTES)
            self._spawn_close()
            return False
        return True

    def _received(self, size: int) -> None:
        if self._count(size) and self._receipt is not None:
            self._receipt.add(size)

    def _control(self, channel: RTCDataChannel, text: str) -> None:
        try:
            if len(text) > MAX_TEXT:
                raise ProbeRequestError("message_too_long", f"Control messages may be at most {MAX_TEXT} characters.")
            try:
                message = json.loads(text)
            except ValueError:
                raise ProbeRequestError("message_malformed", "Control messages are JSON objects.") from None
            if not isinstance(message, dict):
                raise ProbeRequestError("message_malformed", "Control messages are JSON objects.")
            kind = message.get("type")
            if kind == "ping":
                channel.send(json.dumps({**message, "type": "pong"}))
            elif kind == "down":
                seconds, size = transfer_limits(message)
                self._spawn(self._send_down(channel, seconds, size))
            elif kind == "up":
                seconds, _ = transfer_limits(message)
                self._receipt = Receipt(seconds, on_window_end=lambda: self._up_done(channel))
            elif kind == "up-end":
                self._up_done(channel)
            else:
                raise ProbeRequestError("type_unknown", "type must be ping, down, up or up-end.")
        except ProbeRequestError as exc:
            channel.send(json.dumps({"type": "error", "code": exc.code, "message": exc.message}))

    def _up_done(self, channel: RTCDataChannel) -> None:
        """The upload's result, once: when its window has passed, or when the client says it is done."""
        receipt, self._receipt = self._receipt, None
        if receipt is not None and channel.readyState == "open":
            channel.send(json.dumps(receipt.summary("up-done")))

    async def _send_down(self, channel: RTCDataChannel, seconds: float, size: int) -> None:
        if not self._count(size):
            return
        started = time.monotonic()
        sent = await send_for(channel, seconds, size)
        if channel.readyState == "open":
            channel.send(json.dumps({"type": "down-done", "bytes": sent,
                                     "seconds": round(time.monotonic() - started, 4)}))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for timer in (self._expiry, self._unconnected):
            if timer is not None:
                timer.cancel()
        await self.pc.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.on_closed is not None:
            self.on_closed(self)
