"""A quality ladder per published video, made on the server.

Browsers and the kit send one stream; they cannot send simulcast. So the
original is forwarded untouched to whoever can take it, and lower layers are
made here: the original is decoded once, and each layer in use is encoded
once and shared by every subscriber on it. A layer starts when the first
subscriber needs it and stops when the last one leaves; the decoder runs only
while some layer does.

Decoding and encoding run on one worker thread per published video: the
codecs release the GIL, so forwarding on the event loop never waits for them.

Which layer a subscriber gets is decided by ``LayerChooser``, a pure function
of time and the subscriber's budget: down at once, up only after the budget
has held for a while, and paused below the lowest layer (with hysteresis, so
a link on the edge does not flicker between paused and playing).

A level costs its rate, or what its largest burst needs if more
(``available_levels``, ``BURST_DRAIN``): at the lowest rates a keyframe and
the frame after it carry most of a second's bits in a few hundred
milliseconds, and on a link they nearly fill they queue the sound behind
them past its playout. So a thin link keeps a smaller level whose bursts it
can take, rather than the original its mean rate would allow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import av

from .aiortc_adapter import RtpPacket
from .keyframes import KeyframeThrottle
from .packet_cache import RtpPacketCache
from .rates import BurstMeter, RateMeter
from .receive import VideoFrameAssembler
from .video_encoders import Vp8Encoder
from .video_payloads import EncodedFrame, vp8_payloads

if TYPE_CHECKING:
    from .forwarder import Publication

logger = logging.getLogger(__name__)

PAUSED = -1
UP_HOLD = 1.0  # seconds the budget must allow a higher level before moving up (it rose by a probe: proven)
DOWN_QUIET = 3.0  # seconds after moving down before moving up again
PAUSE_BELOW = 0.8  # pause when the budget falls under this share of the lowest layer
STAY_TOLERANCE = 1.15  # a level already flowing stays until the budget falls this far below it
SOURCE_HEADROOM = 1.1  # the original needs this much more than it measures
LAYER_BELOW_SOURCE = 0.8  # a layer is only worth making if it is well below the original
UNMEASURED_SOURCE = 800_000.0  # bit/s assumed for an original not measured yet
# A publisher held back by its cap could use this many times what it sends (a probe goes at most a step of
# the estimate towards it): after a link has come back, the cap rises only as fast as probes prove it.
HELD_WANTS = 4.0
MAX_BACKLOG = 3  # frames waiting for the worker before we skip to the next keyframe
LAYER_KEYFRAME_INTERVAL = 1.0  # seconds between keyframes a layer makes on request
# A level fits a budget that sends its largest burst (rates.BURST_WINDOW of it: a keyframe and the frame
# after it) within this time: the queue it leaves on a nearly full link holds the audio behind it for
# the rest. Above a few hundred kbit/s a stream's bursts are well within it; at the lowest rates a
# keyframe and its next frame carry most of a second's bits.
BURST_DRAIN = 0.45


@dataclass(frozen=True)
class LayerSpec:
    """A layer by its height: its width follows the original's shape, so nothing is ever stretched
    (a wound must look the shape it is)."""

    height: int
    framerate: float
    bitrate: int

    @property
    def name(self) -> str:
        return f"{self.height}p"

    def size(self, source: tuple[int, int] | None) -> tuple[int, int]:
        """(width, height) for an original of ``source`` size (16:9 when not known yet)."""
        width, height = source or (16, 9)
        return max(2, round(self.height * width / height / 2) * 2), self.height


DEFAULT_LAYERS = (
    LayerSpec(90, 8.0, 50_000),
    LayerSpec(180, 12.0, 150_000),
    LayerSpec(360, 15.0, 400_000),
)


def burst_cost(burst: float) -> float:
    """The budget (bit/s) that sends a level's largest burst (bits) within ``BURST_DRAIN``."""
    return burst / BURST_DRAIN


def available_levels(layers: Sequence[LayerSpec], source_rate: float,
                     source_size: tuple[int, int] | None = None,
                     bursts: Mapping[int, float] | None = None) -> list[tuple[int, float]]:
    """(level, bit/s) a subscriber may be given, cheapest first; the original is level ``len(layers)``.

    A layer is offered only when it is clearly cheaper and smaller than the original. A level
    costs its rate, or what its largest burst lately (``bursts``: bits, by level) needs, if more.
    """
    source_level = len(layers)
    bursts = bursts or {}
    # Until the original has been measured, assume it is a typical camera stream.
    source_cost = (source_rate if source_rate > 0 else UNMEASURED_SOURCE) * SOURCE_HEADROOM
    levels = [(i, max(float(spec.bitrate), burst_cost(bursts.get(i, 0.0)))) for i, spec in enumerate(layers)
              if (source_rate <= 0 or spec.bitrate < source_rate * LAYER_BELOW_SOURCE)
              and (source_size is None or spec.height < source_size[1])]
    levels.append((source_level, max(source_cost, burst_cost(bursts.get(source_level, 0.0)))))
    # (the cheapest level's bursts do not count: below it video pauses, which its rate alone decides)
    lowest = levels[0][0]
    cheapest = float(layers[lowest].bitrate) if lowest < source_level else source_cost
    return [(lowest, cheapest), *levels[1:]]


@dataclass
class LayerChooser:
    """The level one subscriber should get, from its budget over time."""

    current: int | None = None
    last_down: float | None = None
    fits_since: float | None = None  # since when the budget has allowed a higher level

    def choose(self, now: float, budget: float, levels: Sequence[tuple[int, float]], probing: bool = False,
               floor: float | None = None, rise_budget: float | None = None) -> int:
        """The level for this budget now. ``probing``: a paused subscriber may try the lowest layer at once.

        ``floor``: the budget under which video pauses (default: the cheapest level). When the
        publisher is capped so low that no layer is worth making, the original is the cheapest
        level, but video should still pause only under the lowest layer's rate.

        ``rise_budget``: how far up the subscriber may move, when that is less than the budget (a
        budget still resting on a guess keeps the subscriber where it is, but raises it no higher
        than the link has been seen to carry).
        """
        rates = dict(levels)
        current = self.current
        # Moving up needs the whole rate; the level in use (and those below) may stay a
        # little over budget, so a rate that wobbles around the budget does not flap.
        tolerant = current if current is not None else PAUSED
        fitting = [level for level, rate in levels
                   if rate <= budget * (STAY_TOLERANCE if level <= tolerant else 1.0)]
        best = fitting[-1] if fitting else PAUSED
        lowest = min(levels[0][1], floor) if floor is not None else levels[0][1]
        if current is None:
            if rise_budget is not None and best != PAUSED:
                best = max((lv for lv, rate in levels if lv <= best and rate <= rise_budget), default=levels[0][0])
            self.current = best
            return best
        if current != PAUSED and current not in rates:
            current = min((lv for lv, _ in levels if lv > current), default=levels[-1][0])
            self.current = current
        if rise_budget is not None and best > current and not probing:
            # no higher than the link has been seen to carry
            best = max((lv for lv, rate in levels if current < lv <= best and rate <= rise_budget), default=current)
        if best == PAUSED and current != PAUSED and budget >= lowest * PAUSE_BELOW:
            best = levels[0][0]  # on the edge: keep the lowest layer rather than flicker
        if best < current:
            self.current = best
            self.last_down = now
            self.fits_since = None
            return best
        if best == current:
            self.fits_since = None
            return current
        if self.fits_since is None:
            self.fits_since = now
        if probing and current == PAUSED:
            self.current = levels[0][0]
            self.fits_since = None
            return self.current
        settled = self.last_down is None or now - self.last_down >= DOWN_QUIET
        if now - self.fits_since >= UP_HOLD and settled:
            self.current = best
            self.fits_since = None
            return best
        return current

    def wanted(self, levels: Sequence[tuple[int, float]], cap_limited: bool) -> float:
        """What this subscriber could use: the original (more of it, if the publisher is held back by
        its cap), or, while paused, the lowest layer. A probe goes at most a step of the estimate
        towards it, so aiming high is safe and saves a probe per level."""
        if self.current is None or self.current == PAUSED:
            return levels[0][1]
        top = levels[-1][1]
        return top * (HELD_WANTS if cap_limited else 1.2)


# --- join storms: how many ladders a worker starts ---------------------------------------

LADDER_STARTS_PER_SECOND = 1.0  # ladders (a decoder of the original and its first layer) a worker starts a second
LADDER_START_BURST = 3  # and at once, after a quiet while


@dataclass
class StartPacer:
    """How many ladders may start now, across one worker: a token bucket.

    A new subscriber starts on a layer made on the server until its link has
    proven itself (a thin link must not be flooded by the original first), so
    the first subscriber of every new consultation starts a decoder of the
    original and an encoder. Many consultations joining a worker at once (a
    busy hour, or every call of a worker that died moving to this one) would
    start them all in the same second and stall the worker's forwarding for
    every call on it. Starts are paced instead: a subscriber whose layer may not
    start yet stays "starting" (no video yet, as its client shows) and gets it
    within seconds. Starts are counted, not ladders running: a thin link keeps
    its layer for good, and that must never hold other calls' starts back.
    """

    rate: float = LADDER_STARTS_PER_SECOND
    burst: float = LADDER_START_BURST
    tokens: float | None = None  # (None: full)
    at: float = 0.0
    refused: int = 0  # starts put off, since the worker started

    def take(self, now: float) -> bool:
        """Whether a ladder may start now (and if so, count it)."""
        elapsed = max(now - self.at, 0.0)
        tokens = self.burst if self.tokens is None else min(self.burst, self.tokens + elapsed * self.rate)
        self.at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        self.refused += 1
        return False


# --- the running ladder --------------------------------------------------------------


@dataclass
class LayerWork:
    """What one layer of a published video has cost, over every time it ran: paid once per layer, so with
    one subscriber on it or ten, it makes its own frame rate and no more."""

    frames: int = 0  # frames its encoder made
    encode_seconds: float = 0.0  # the worker thread's CPU time encoding (and scaling) for it
    ran: float = 0.0  # seconds it ran, in the runs that ended
    started: float | None = None  # when its current run began (None: not running)

    def seconds(self, now: float) -> float:
        """Seconds it has run, its current run included."""
        return self.ran + (now - self.started if self.started is not None else 0.0)

    def stop(self, now: float) -> None:
        self.ran = self.seconds(now)
        self.started = None


@dataclass
class Layer:
    """One lower layer of a published video: its encoder and its own RTP stream."""

    level: int
    spec: LayerSpec
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    sequence: int = field(default_factory=lambda: random.getrandbits(16))
    picture_id: int = field(default_factory=lambda: random.getrandbits(15))
    cache: RtpPacketCache = field(default_factory=lambda: RtpPacketCache(512))
    meter: RateMeter = field(default_factory=RateMeter)
    bursts: BurstMeter = field(default_factory=BurstMeter)
    encoder: Vp8Encoder | None = None  # made and used on the worker thread only
    # A keyframe of a small layer is most of a second's budget: at most one a second.
    throttle: KeyframeThrottle = field(default_factory=lambda: KeyframeThrottle(interval=LAYER_KEYFRAME_INTERVAL))
    keyframe_wanted: bool = True
    stopped: bool = False
    frames: int = 0
    work: LayerWork = field(default_factory=LayerWork)  # (the level's, kept by the ladder across runs)

    def encode(self, picture: av.VideoFrame, timestamp: int) -> EncodedFrame | None:
        """On the worker thread: one picture of the original into this layer (None: not due, or dropped).

        The encoder scales the picture and keeps the layer's frame rate itself.
        """
        width, height = self.spec.size((picture.width, picture.height))
        if self.encoder is None:
            self.encoder = Vp8Encoder(width, height, self.spec.framerate, self.spec.bitrate)
        elif (self.encoder.width, self.encoder.height) != (width, height):
            self.encoder.set_target(width=width, height=height)  # the original changed shape
        if self.keyframe_wanted:
            self.keyframe_wanted = False
            self.encoder.request_keyframe()
        return self.encoder.encode(picture, timestamp)

    def packets(self, frame: EncodedFrame) -> list[RtpPacket]:
        """On the event loop: the encoded frame as this layer's RTP packets."""
        payloads = vp8_payloads(frame, self.picture_id)
        self.picture_id = (self.picture_id + 1) % (1 << 15)
        out = []
        for index, payload in enumerate(payloads):
            packet = RtpPacket(payload_type=96, marker=int(index == len(payloads) - 1),
                               sequence_number=self.sequence, timestamp=frame.timestamp, ssrc=self.ssrc,
                               payload=payload)
            self.sequence = (self.sequence + 1) % (1 << 16)
            out.append(packet)
        self.frames += 1
        return out

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None


class Ladder:
    """The lower layers of one published video, started and stopped as subscribers need them."""

    def __init__(self, publication: Publication, specs: Sequence[LayerSpec] = DEFAULT_LAYERS) -> None:
        self.publication = publication
        self.specs = tuple(specs)
        self.pacer = StartPacer()  # (a media server gives every ladder of a worker the same one: peer.py)
        self.start_put_off = False  # its subscribers wait "starting" for a free start
        self.layers: dict[int, Layer] = {}
        self._assembler: VideoFrameAssembler | None = None
        self._decoder: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._backlog = 0
        self._skipping = False
        self.decoded_frames = 0
        self.dropped_frames = 0
        self.source_bursts = BurstMeter()  # the original's (every layer's: Layer.bursts)
        self.bursts: dict[int, float] = {}  # bits, by level, as ``levels`` last measured them
        # The worker thread's CPU time decoding the original, and encoding (and scaling for) every layer:
        # paid once per published video and once per layer, however many subscribers each has.
        self.decode_seconds = 0.0
        self.encode_seconds = 0.0
        self.encoded_frames = 0  # by all its layers together
        self.layer_work: dict[int, LayerWork] = {}  # by level, since the video was published

    @property
    def source_level(self) -> int:
        return len(self.specs)

    def levels(self) -> list[tuple[int, float]]:
        now = self.publication.clock()
        bursts = {level: layer.bursts.peak(now) for level, layer in self.layers.items()}
        bursts[self.source_level] = self.source_bursts.peak(now)
        self.bursts = bursts
        return available_levels(self.specs, self.publication.meter.rate, self.publication.source_size, bursts)

    def burst_cost(self, level: int) -> float:
        """What a budget needs for the level's largest burst, as the last ``levels`` measured it (0: not running)."""
        return burst_cost(self.bursts.get(level, 0.0))

    def is_layer(self, level: int | None) -> bool:
        return level is not None and 0 <= level < len(self.specs)

    # --- layers in use --------------------------------------------------------------

    def update(self, in_use: set[int]) -> None:
        """Start the layers some subscriber is on or moving to; stop the others."""
        for level in sorted(in_use - set(self.layers)):
            if not self.is_layer(level):
                continue
            # A ladder (a decoder of the original and an encoder) costs a worker a tenth of its core or more:
            # none starts while the worker's loop is behind (loop_lag.py), where it would take the worker
            # over its core and every call on it with it; the subscriber waits "starting" as in a storm.
            if self._executor is None and (self.publication.loop_lag.busy
                                           or not self.pacer.take(self.publication.clock())):
                if not self.start_put_off:
                    self.start_put_off = True
                    logger.info("%s: layers put off: this worker is behind, or starting others (a storm of joins)",
                                self.publication.id)
                break  # asked again at the next decision (a quarter second)
            self.start_put_off = False
            self._start(level)
        for level in set(self.layers) - in_use:
            self._stop(level)

    def _start(self, level: int) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"ladder-{self.publication.id}")
            # The assembler hands on nothing before a keyframe of the original, and asks for one.
            self._assembler = VideoFrameAssembler(on_keyframe_needed=self._keyframe_needed)
            self._decoder = None
            self._skipping = False
        work = self.layer_work.setdefault(level, LayerWork())
        work.started = self.publication.clock()
        self.layers[level] = Layer(level, self.specs[level], work=work)
        self.publication.on_change()
        logger.info("%s: layer %s started", self.publication.id, self.specs[level].name)

    def _stop(self, level: int) -> None:
        layer = self.layers.pop(level)
        layer.stopped = True
        layer.work.stop(self.publication.clock())
        self.publication.on_change()
        logger.info("%s: layer %s stopped", self.publication.id, layer.spec.name)
        executor = self._executor
        if executor is not None:
            executor.submit(layer.close)
            if not self.layers:
                executor.shutdown(wait=False)
                self._executor = None
                self._assembler = None

    def work_by_layer(self) -> dict[str, dict[str, float]]:
        """Per layer that has run (by name): frames encoded, encode CPU seconds, seconds run, its frame rate,
        and the subscribers on it now (``GET /api/stats``: ``ladder_cpu.layers``)."""
        now = self.publication.clock()
        on = Counter(s.level for s in self.publication.subscriptions)
        return {self.specs[level].name: {"encoded_frames": work.frames, "encode_s": round(work.encode_seconds, 4),
                                         "ran_s": round(work.seconds(now), 3),
                                         "framerate": self.specs[level].framerate, "subscribers": on[level]}
                for level, work in sorted(self.layer_work.items())}

    def request_keyframe(self, level: int) -> None:
        layer = self.layers.get(level)
        if layer is not None and layer.throttle.request(self.publication.clock()):
            layer.keyframe_wanted = True

    def _keyframe_needed(self) -> None:
        asyncio.ensure_future(self.publication.request_keyframe())

    # --- the original in, layers out -------------------------------------------------

    async def on_source_packet(self, packet: RtpPacket, now: float) -> None:
        self.source_bursts.add(len(packet.payload), now)
        assembler, executor = self._assembler, self._executor
        if assembler is None or executor is None:
            return
        for layer in self.layers.values():
            if layer.throttle.due(now):
                layer.keyframe_wanted = True
        for frame in assembler.push(packet.sequence_number, packet.timestamp, bool(packet.marker),
                                    packet.payload, now, packet.ssrc):
            if self._skipping and not frame.keyframe:
                continue
            if self._backlog >= MAX_BACKLOG and not frame.keyframe:
                # The worker cannot keep up: drop until the next keyframe rather than
                # decode a picture whose reference was skipped.
                self._skipping = True
                self.dropped_frames += 1
                self._keyframe_needed()
                continue
            self._skipping = False
            self._backlog += 1
            layers = list(self.layers.values())
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(executor, self._work, frame.data, frame.timestamp, layers)
            future.add_done_callback(lambda f: asyncio.ensure_future(self._deliver(f)))

    def _work(self, data: bytes, timestamp: int, layers: list[Layer]) -> list[tuple[Layer, EncodedFrame]] | None:
        """On the worker thread: decode one frame of the original, encode it into each layer due.

        None: the frame could not be decoded (the next keyframe is needed).
        """
        began = time.thread_time()
        if self._decoder is None:
            self._decoder = av.CodecContext.create("vp8", "r")
        out: list[tuple[Layer, EncodedFrame]] = []
        try:
            pictures = self._decoder.decode(av.Packet(data))
        except av.error.FFmpegError as exc:
            logger.info("%s: could not decode a frame of the original: %s", self.publication.id, exc)
            self._decoder = None
            return None
        finally:
            self.decode_seconds += time.thread_time() - began
        for picture in pictures:
            self.decoded_frames += 1
            for layer in layers:
                if layer.stopped:
                    continue
                began = time.thread_time()
                encoded = layer.encode(picture, timestamp)
                spent = time.thread_time() - began
                self.encode_seconds += spent
                layer.work.encode_seconds += spent
                if encoded is not None:
                    self.encoded_frames += 1
                    layer.work.frames += 1
                    out.append((layer, encoded))
        return out

    async def _deliver(self, future: asyncio.Future[list[tuple[Layer, EncodedFrame]] | None]) -> None:
        self._backlog -= 1
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            logger.warning("%s: layer encoding failed: %r", self.publication.id, exc)
            return
        now = self.publication.clock()
        encoded_frames = future.result()
        if encoded_frames is None:
            if self._assembler is not None:
                self._assembler.decode_failed(now)
            return
        for layer, encoded in encoded_frames:
            if layer.stopped:
                continue
            if encoded.keyframe:
                layer.throttle.keyframe_seen()
            for index, packet in enumerate(layer.packets(encoded)):
                layer.cache.store(packet.sequence_number, packet)
                layer.meter.add(len(packet.payload), now)
                layer.bursts.add(len(packet.payload), now)
                keyframe = encoded.keyframe and index == 0
                await self.publication.forward_level(layer.level, packet, keyframe)

    def close(self) -> None:
        for level in list(self.layers):
            self._stop(level)

