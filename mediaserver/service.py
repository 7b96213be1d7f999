"""What signalling needs of the media side, whichever way it runs.

``MediaServer`` (``room.py``) runs every consultation in this process;
``WorkerPool`` (``pool.py``) runs them in worker processes and stands in for
them here. Signalling (``signalling/ws.py``, ``rest.py``, ``live.py``,
``metrics.py``, ``ops.py``) uses only what these protocols name, so it does not
care which one it has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .figures import ConsultationFigures
from .forwarding_delay import DelaySnapshot
from .peer import ParticipantInfo, Signal


class MediaPeer(Protocol):
    """One participant's media session, as its WebSocket sees it."""

    @property
    def info(self) -> ParticipantInfo: ...

    @property
    def awaiting_answer(self) -> bool: ...

    async def handle_answer(self, sdp: str) -> None: ...

    async def negotiate(self) -> None: ...


PeerFailed = Callable[[Any, str], Awaitable[None]]  # (the MediaPeer, a stable code)


class MediaService(Protocol):
    async def join(self, room_id: str, info: ParticipantInfo, signal: Signal, on_failed: PeerFailed) -> MediaPeer:
        """Add a participant; a second session of the same participant replaces the first."""

    async def leave(self, room_id: str, participant_id: str, peer: MediaPeer | None = None) -> None:
        """Remove a participant (only if ``peer`` is still its current session)."""

    async def mute(self, room_id: str, peer: MediaPeer, kind: str, muted: bool) -> None: ...

    async def participants(self, room_id: str) -> list[dict[str, Any]]:
        """Everyone in a consultation's call, as ``joined`` and the REST API show them."""

    def is_live(self, room_id: str) -> bool:
        """Has the consultation anyone in its call here?"""

    def counts(self) -> dict[str, int]:
        """``rooms`` and ``participants`` in calls now."""

    async def stats(self) -> dict[str, Any]:
        """Per consultation and participant: what came in and what went out (``GET /api/stats``)."""

    async def figures(self) -> list[ConsultationFigures]:
        """Every live consultation and each participant's figures (``mediaserver/figures.py``)."""

    async def forwarding_delays(self) -> dict[str, DelaySnapshot]:
        """How long the server held the copies it forwarded (``mediaserver/forwarding_delay.py``), since each
        process started, by media worker (its index, or ``main`` without workers); a worker that does not
        answer in time is left out."""

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, checked whenever the media state changes."""

    async def close(self) -> None: ...
