"""Each participant's link as plain numbers, read from what the SFU already keeps.

Nothing here counts packets: forwarding keeps its rate meters, receiver-report
figures and bandwidth estimates anyway, and these are read only when someone
asks (a Prometheus scrape, the IT staff page's sampler). A participant is known
by its id and role; its display name is left out (IT staff do not need it).

Directions are the participant's own: *up* is what it sends to the server
(its uplink), *down* what the server sends to it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .aiortc_adapter import inbound_packets, selected_local_candidate_type
from .forwarder import Publication, Subscription
from .ladder import PAUSED
from .peer import Peer
from .room import MediaServer, Room

KINDS = ("audio", "video")


@dataclass(frozen=True)
class VideoReceived:
    """One other participant's video as this participant receives it."""

    publisher: str  # whose video (a participant id)
    layer: str  # "starting", "paused", a layer such as "180p", or "original"
    height: int  # lines of the picture sent; 0 while paused or starting
    paused: bool  # the link cannot take even the lowest layer


@dataclass(frozen=True)
class ParticipantFigures:
    consultation: str
    participant: str  # the participant id
    role: str
    joined_at: float  # Unix seconds
    connection: str  # the media connection: new, connecting, connected, failed or closed
    route: str | None  # the kind of local candidate ICE chose: host, srflx or relay
    sent: dict[str, float]  # kind -> bit/s the participant publishes, as it reaches the server
    received: dict[str, float]  # kind -> bit/s the server forwards to it (resends and probes aside)
    uplink_packets: dict[str, tuple[int, int]]  # kind -> (expected, lost) of what it published so far
    forwarded_packets: dict[str, int]  # kind -> packets sent to it so far (resends and probes included)
    forwarded_bytes: dict[str, int]  # kind -> payload bytes of those
    loss_down: float | None  # fraction lost toward it, from its receiver reports (after timely repairs)
    nacked_down: float | None  # fraction of what was sent to it that it asked for again
    rtt: float | None  # seconds, its latest round trip
    estimate: float | None  # bit/s its link is estimated to carry toward it
    rate_cap: int | None  # bit/s its video publisher was last told to stay under (REMB)
    layers_active: int  # lower layers of its video made on the server right now
    video: list[VideoReceived] = field(default_factory=list)


@dataclass(frozen=True)
class ConsultationFigures:
    consultation: str
    started_at: float  # Unix seconds: its first participant joined
    participants: list[ParticipantFigures]


def _video_received(subscription: Subscription) -> VideoReceived:
    publication = subscription.publication
    level = subscription.level
    height = 0
    if level is not None and level != PAUSED:
        if publication.ladder is not None and publication.ladder.is_layer(level):
            height = publication.ladder.specs[level].height
        elif publication.source_size is not None:
            height = publication.source_size[1]
    return VideoReceived(publication.participant_id, publication.level_name(level), height, level == PAUSED)


def _layers_active(publication: Publication | None) -> int:
    return len(publication.ladder.layers) if publication is not None and publication.ladder is not None else 0


def participant_figures(room: Room, peer: Peer, now: float) -> ParticipantFigures:
    """What the server knows of one participant's link at ``now`` (time.monotonic())."""
    bandwidth = peer.bandwidth
    subscriptions = peer.subscriptions()
    heard = bandwidth.reports > 0
    video = peer.publications.get("video")
    return ParticipantFigures(
        consultation=room.id,
        participant=peer.info.id,
        role=peer.info.role,
        joined_at=peer.joined_at,
        connection=str(peer.pc.connectionState),
        route=selected_local_candidate_type(peer.pc) if peer.pc.connectionState == "connected" else None,
        sent={kind: p.meter.current(now) for kind, p in peer.publications.items() if not p.closed},
        received={kind: sum(s.meter.current(now) for s in subscriptions if s.publication.kind == kind)
                  for kind in KINDS},
        uplink_packets={kind: inbound_packets(peer.inbound[kind].receiver)
                        for kind in peer.publications if kind in peer.inbound},
        forwarded_packets={kind: sum(slot.port.sent[0] for slot in peer.slots if slot.kind == kind)
                           for kind in KINDS},
        forwarded_bytes={kind: sum(slot.port.sent[1] for slot in peer.slots if slot.kind == kind)
                         for kind in KINDS},
        loss_down=bandwidth.loss if heard else None,
        nacked_down=bandwidth.asked if heard else None,
        rtt=bandwidth.rtt if bandwidth.bases else None,
        estimate=bandwidth.estimate if bandwidth.known else None,
        rate_cap=video.rate_cap if video is not None else None,
        layers_active=_layers_active(video),
        video=[_video_received(s) for s in subscriptions if s.publication.kind == "video"],
    )


# Participants read between two looks at the media sockets. Read whole, a worker's 200 participants held its
# loop for about 10 ms every time the IT staff page's sampler asked (every 2 s); every packet that arrived
# meanwhile waited, and near the worker's capacity the loop takes several times as long again to catch up.
FIGURES_SLICE = 8


async def live_figures(media: MediaServer, now: float | None = None) -> list[ConsultationFigures]:
    """Every consultation with someone in it, and each participant's figures, read a slice at a time (the
    loop forwards what arrived in between)."""
    now = time.monotonic() if now is None else now
    consultations = []
    read = 0
    for room in list(media.rooms.values()):
        participants = []
        for peer in list(room.peers.values()):
            if peer.closed:
                continue  # (also one that left while the loop was away)
            participants.append(participant_figures(room, peer, now))
            read += 1
            if read % FIGURES_SLICE == 0:
                await asyncio.sleep(0)  # (one turn of the loop: not waiting for anything)
        if participants:
            consultations.append(ConsultationFigures(room.id, room.started_at, participants))
    return consultations


def uplink_loss(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> float | None:
    """The share of a participant's packets its uplink lost between two readings of ``uplink_packets``
    (None when nothing was expected in between, or the counts started again: a new connection)."""
    expected = lost = 0
    for kind, (now_expected, now_lost) in after.items():
        then_expected, then_lost = before.get(kind, (0, 0))
        if now_expected < then_expected or now_lost < then_lost:
            return None
        expected += now_expected - then_expected
        lost += now_lost - then_lost
    return min(lost / expected, 1.0) if expected > 0 else None
