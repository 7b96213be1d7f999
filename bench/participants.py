"""Synthetic participants, and how they reach each other: through Nära's SFU or peer to peer.

Every participant reaches the others only through the impairing TURN relay
(bench/turn.py): its TURN username ``<profile>/<label>`` gives it its own
emulated access link. What it receives is measured as a person would notice
it (bench/metrics.py); what its link carried is read from the relay
(``LinkMeter``). Shared by ``nara bench run`` and ``nara bench adapt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from .metrics import AudioReceipt, StreamRecord, picture_psnr
from .process import NaraServer
from .synthetic import StampedVideoTrack, dominant_frequency, read_stamp, wall_ms
from .turn import ImpairingTurnServer

logger = logging.getLogger(__name__)

PSNR_EVERY = 3  # frames; PSNR costs a regenerated frame, so sample it


def made_up(track: MediaStreamTrack) -> bool:
    """Whether the receive path made up the audio frame it just returned.

    Nära's receive path says where each frame came from: a packet (played as
    it is, or lengthened or shortened to move the delay: the sound is there
    either way), FEC in the next packet, concealment, or silence while it
    thinks the sender paused (ours never does: its tone is continuous).
    aiortc's never makes one up: a lost frame simply never comes.
    """
    source = getattr(track, "last_frame_source", None)
    if source is not None:
        return source not in ("packet", "stretch", "shorten", "fec")
    return bool(getattr(track, "last_frame_concealed", False))


class Participant:
    """A synthetic participant: stamped video and a tone out (if it publishes), every other one measured in."""

    def __init__(self, label: str, profile: str, run_start: float, tags: dict[str, int],
                 camera: StampedVideoTrack | None = None, microphone: MediaStreamTrack | None = None,
                 source_size: tuple[int, int] | None = None, scene: str = "gradient") -> None:
        self.label = label
        self.profile = profile  # its link (bench/profiles.py), up and down
        self.run_start = run_start
        self.tags = tags  # every publisher's label -> the tag its frames carry
        self.camera = camera
        # What goes on the wire: the camera and the tone, or encoders over them.
        self.video: MediaStreamTrack | None = camera
        self.audio: MediaStreamTrack | None = microphone
        self.source_size = source_size  # (width, height) publishers send, for PSNR of smaller layers
        self.scene = scene  # what the publishers' cameras show (bench/synthetic.py), for PSNR
        self.corrupt_frames = 0
        self.unmeasured_frames = 0  # frames the measuring code failed on (a bug here, reported)
        self.records: dict[str, StreamRecord] = {}
        self.events: list[tuple[float, dict[str, Any]]] = []  # signalling events and when they came
        self.joined_at: float | None = None  # seconds since the run began
        self.tasks: list[asyncio.Task[None]] = []
        self.peers: list[RTCPeerConnection] = []
        self.client: Any = None

    @property
    def publishes(self) -> bool:
        return self.video is not None or self.audio is not None

    def now(self) -> float:
        return time.time() - self.run_start

    def record(self, publisher: str) -> StreamRecord:
        if publisher not in self.records:
            self.records[publisher] = StreamRecord(self.label, publisher)
        return self.records[publisher]

    def follow(self, track: Any, publisher: Any) -> None:
        """Read ``track``; ``publisher`` is a label or a function giving it (slots are reused)."""
        self.tasks.append(asyncio.ensure_future(self._read(track, publisher)))

    async def _read(self, track: Any, publisher: Any) -> None:
        count = 0
        while True:
            try:
                frame = await track.recv()
            except Exception:  # MediaStreamError: the track has ended
                return
            at = self.now()
            who = publisher() if callable(publisher) else publisher
            if who is None:
                continue
            try:
                if track.kind == "audio":
                    self._hear(who, at, track, frame)
                elif self._see(who, at, frame, count % PSNR_EVERY == PSNR_EVERY - 1):
                    count += 1
            except Exception:
                if not self.unmeasured_frames:
                    logger.exception("%s could not measure a frame from %s", self.label, who)
                self.unmeasured_frames += 1

    def _hear(self, who: str, at: float, track: Any, frame: Any) -> None:
        played = not made_up(track) and dominant_frequency(frame) > 0
        rate = int(1 / frame.time_base) if frame.time_base else frame.sample_rate
        counters = getattr(track, "counters", None)
        self.record(who).add_audio(AudioReceipt(at, frame.pts, rate, frame.samples / frame.sample_rate, played,
                                                getattr(track, "last_frame_source", None),
                                                getattr(counters, "skipped", None)))

    def _see(self, who: str, at: float, frame: Any, with_psnr: bool) -> bool:
        """Measure a decoded picture; False when it is not a picture anyone sent."""
        luma = frame.to_ndarray(format="yuv420p")[: frame.height]
        stamp = read_stamp(luma)
        latency = (wall_ms() - stamp.capture_ms) % (1 << 32)
        if stamp.tag != self.tags.get(who) or latency > 600_000:
            self.corrupt_frames += 1
            return False
        psnr = picture_psnr(luma, stamp, self.source_size, self.scene) if with_psnr else None
        self.record(who).add_frame(at, stamp, float(latency), psnr)
        return True

    def watch_events(self, client: Any) -> None:
        """Keep the client's signalling events with the time each arrived."""
        async def watch() -> None:
            while True:
                async with client.changed:
                    await client.changed.wait_for(lambda: len(client.events) > len(self.events))
                at = self.now()
                self.events.extend((at, event) for event in client.events[len(self.events):])

        self.tasks.append(asyncio.ensure_future(watch()))

    def peer_connections(self) -> list[RTCPeerConnection]:
        pcs = list(self.peers)
        if self.client is not None and self.client.pc is not None:
            pcs.append(self.client.pc)
        return pcs

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.client is not None:
            await self.client.close()
        for pc in self.peers:
            await pc.close()


# --- joining ---------------------------------------------------------------------------


def ice_servers(relay: ImpairingTurnServer, p: Participant) -> list[RTCIceServer]:
    return [RTCIceServer(urls=relay.url, username=f"{p.profile}/{p.label}", credential=relay.password)]


async def join_sfu(sfu: NaraServer, room: str, p: Participant, relay: ImpairingTurnServer,
                   **client_options: Any) -> None:
    """``p`` joins consultation ``room`` through the SFU; it follows every track it is sent."""
    from signalling.client import ConsultationClient

    token = await sfu.token(room, p.label, "patient", p.label)
    followed: set[str] = set()
    attached: set[int] = set()

    def owner(mid: str) -> Any:
        return lambda: (client.owners.get(mid) or (None,))[0]

    def follow_all(pc: RTCPeerConnection) -> None:
        for transceiver in pc.getTransceivers():
            sender, sent = transceiver.sender, transceiver.sender.track
            if sent is not None and hasattr(sent, "attach") and id(sender) not in attached:
                attached.add(id(sender))
                sent.attach(sender)  # Nära's encoders follow the REMB and keyframe requests their sender gets
            mid = transceiver.mid
            # The client's own remote track: aiortc's, or one that plays through Nära's receive path.
            track = client.remote_tracks.get(mid) if mid is not None else None
            if mid is None or mid in followed or track is None:
                continue
            followed.add(mid)
            p.follow(track, owner(mid))

    client = ConsultationClient(sfu.url, room, token, video=p.video, audio=p.audio, publish=p.publishes,
                                ice_servers=ice_servers(relay, p), relay_only=True, on_answered=follow_all,
                                **client_options)
    p.client = client
    p.watch_events(client)
    await client.join()
    p.joined_at = p.now()


async def connect_p2p(a: Participant, b: Participant, relay: ImpairingTurnServer,
                      fanout: dict[str, MediaRelay]) -> None:
    """A direct connection a <-> b, each side through its own link; what each publishes, the other gets."""
    if not a.publishes:
        a, b = b, a  # the offer needs something to offer
    pcs = []
    for me, other in ((a, b), (b, a)):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers(relay, me),
                                                iceTransportPolicy=RTCIceTransportPolicy.RELAY))
        me.peers.append(pc)
        relayed = fanout.setdefault(me.label, MediaRelay())
        for track in (me.video, me.audio):
            if track is not None:
                pc.addTrack(relayed.subscribe(track, buffered=False))
        pc.on("track", lambda track, me=me, other=other: me.follow(track, other.label))
        pcs.append(pc)
    offerer, answerer = pcs
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)
    for p in (a, b):
        if p.joined_at is None:
            p.joined_at = p.now()


# --- what the links carried --------------------------------------------------------------


@dataclass(frozen=True)
class LinkRates:
    """One participant's downlink over a sampling interval."""

    sent_kbps: float  # offered to the downlink: what was sent toward the participant
    received_kbps: float  # what the downlink delivered
    capacity_kbps: float | None  # the bottleneck's rate at the end of the interval (None: unlimited)


class LinkMeter:
    """Per participant (over all its allocations), what its downlink carried since the last sample.

    Counted by the relay: bytes of the UDP payloads it relays (SRTP and RTCP
    with their headers, no TURN framing), audio and video together.
    """

    def __init__(self, relay: ImpairingTurnServer) -> None:
        self.relay = relay
        self._previous: dict[int, tuple[int, int]] = {}  # allocation index -> (offered, delivered) bytes
        self._at = relay.loop.time()

    def sample(self) -> dict[str, LinkRates]:
        now = self.relay.loop.time()
        elapsed = max(now - self._at, 1e-6)
        self._at = now
        sent: dict[str, int] = {}
        received: dict[str, int] = {}
        capacity: dict[str, float | None] = {}
        for index, (username, _, down) in enumerate(self.relay.links(ever=True)):
            who = username.partition("/")[2] or username
            offered, delivered = down.counters.bytes_offered, down.counters.bytes_delivered
            before_offered, before_delivered = self._previous.get(index, (0, 0))
            self._previous[index] = (offered, delivered)
            sent[who] = sent.get(who, 0) + offered - before_offered
            received[who] = received.get(who, 0) + delivered - before_delivered
            rate = down.capacity_at(now)
            capacity[who] = None if rate is None else rate / 1000
        return {who: LinkRates(sent[who] * 8 / 1000 / elapsed, received[who] * 8 / 1000 / elapsed, capacity[who])
                for who in sent}
