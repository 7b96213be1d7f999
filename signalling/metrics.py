"""``GET /metrics``: the server's figures in Prometheus' text format, for IT staff's monitoring.

Everything is read at scrape time from what the server already keeps
(``mediaserver/figures.py``): no counter is added to the packet path. Each
participant is labelled with its consultation id and participant id only; no
name, title or patient reference ever appears (docs/operations.md lists every
metric).

Who may scrape: a bearer token. The server generates ``metrics-token`` in its
data directory (mode 0600) on first run; Prometheus reads it with
``authorization: {credentials_file: ...}``. The admin key is accepted too, but
a Prometheus server should not hold it: the metrics token can only read these
figures.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from mediaserver.figures import ConsultationFigures
from mediaserver.forwarding_delay import BOUNDS_NS, DelaySnapshot
from mediaserver.pool import WorkerPool
from mediaserver.service import MediaService

from .config import ServerConfig, private_value
from .imagestore import ImageStore
from .live import LiveHistory
from .rest import ADMIN_KEY, api_error
from .tokens import ROLES

METRICS_TOKEN_FILE = "metrics-token"
PARTICIPANT = ["consultation", "participant"]


class NaraCollector(Collector):
    """The live figures of every consultation and participant, read when Prometheus asks."""

    def __init__(self, media: MediaService, history: LiveHistory, images: ImageStore | None = None) -> None:
        self.media = media
        self.history = history
        self.images = images
        self.consultations: list[ConsultationFigures] = []  # read by ``refresh`` before each scrape
        self.delays: dict[str, DelaySnapshot] = {}  # by worker, read with them

    async def refresh(self) -> None:
        """Read every participant's figures (from the media workers: each answers within a bound or is left
        out, so a stuck worker cannot hang a scrape)."""
        self.consultations, self.delays = await asyncio.gather(self.media.figures(), self.media.forwarding_delays())

    def collect(self) -> Iterator[Metric]:
        consultations = self.consultations
        yield from self._counts(consultations)
        yield from self._links(consultations)
        yield self._forwarding_delay(self.delays)
        if isinstance(self.media, WorkerPool):
            yield from self._workers(self.media)
        if self.images is not None:
            yield from self._images(self.images)

    @staticmethod
    def _workers(pool: WorkerPool) -> Iterator[Metric]:
        worker = ["worker"]
        up = GaugeMetricFamily("nara_media_worker_up", "1 while the SFU worker process is running and answering, "
                               "else 0.", labels=worker)
        consultations = GaugeMetricFamily("nara_media_worker_consultations", "Consultations whose call is on the "
                                          "worker.", labels=worker)
        participants = GaugeMetricFamily("nara_media_worker_participants", "Participants whose media is on the "
                                         "worker.", labels=worker)
        cpu = CounterMetricFamily("nara_media_worker_cpu_seconds", "CPU time the worker process has used (user "
                                  "and system), seconds.", labels=worker)
        memory = GaugeMetricFamily("nara_media_worker_resident_memory_bytes", "Resident memory of the worker "
                                   "process, bytes.", labels=worker)
        restarts = CounterMetricFamily("nara_media_worker_restarts", "Times the worker was started again after "
                                       "its process died.", labels=worker)
        share = GaugeMetricFamily("nara_media_worker_cpu_share", "Share of one core the worker used over its last "
                                  "load report (2 s): its event loop can use one core.", labels=worker)
        lag = GaugeMetricFamily("nara_media_worker_loop_lag_seconds", "How late the worker's event loop runs its "
                                "timers, smoothed, as it last reported: over 0.01 s it is behind.", labels=worker)
        saturated = GaugeMetricFamily("nara_media_worker_saturated", "1 while the worker uses 70 % of its core or "
                                      "more, or its loop is behind: it takes new consultations only when no other "
                                      "worker has room.", labels=worker)
        for described in pool.describe():
            label = [str(described["index"])]
            up.add_metric(label, 1 if described["up"] else 0)
            consultations.add_metric(label, len(described["consultations"]))
            participants.add_metric(label, described["participants"])
            if described["cpu_seconds"] is not None:
                cpu.add_metric(label, described["cpu_seconds"])
                memory.add_metric(label, described["memory_bytes"])
            restarts.add_metric(label, described["restarts"])
            if described["cpu_share"] is not None:
                share.add_metric(label, described["cpu_share"])
                lag.add_metric(label, described["loop_lag_ms"] / 1000)
            saturated.add_metric(label, 1 if described["saturated"] else 0)
        yield from (up, consultations, participants, cpu, memory, restarts, share, lag, saturated)

    @staticmethod
    def _forwarding_delay(delays: dict[str, DelaySnapshot]) -> Metric:
        histogram = HistogramMetricFamily("nara_forwarding_delay_seconds", "How long the server held each copy "
                                          "it forwarded as it came (not server-made layers, resends, probe padding "
                                          "or TURN relays), from the datagram's arrival to the copy's send, by media "
                                          "worker (main: no workers), since the worker started.", labels=["worker"])
        for worker, snapshot in sorted(delays.items()):
            buckets, seen = [], 0
            for bound, count in zip(BOUNDS_NS, snapshot.counts, strict=False):
                seen += count
                buckets.append((f"{bound / 1e9:g}", float(seen)))
            buckets.append(("+Inf", float(snapshot.total)))
            histogram.add_metric([worker], buckets, snapshot.sum_ns / 1e9)
        return histogram

    def _counts(self, consultations: list[ConsultationFigures]) -> Iterator[Metric]:
        yield GaugeMetricFamily("nara_consultations", "Consultations with at least one participant in the call.",
                                value=len(consultations))
        participants = GaugeMetricFamily("nara_participants", "Participants in calls, by role.", labels=["role"])
        for role in ROLES:
            participants.add_metric([role], sum(1 for c in consultations for p in c.participants if p.role == role))
        yield participants

    def _links(self, consultations: list[ConsultationFigures]) -> Iterator[Metric]:
        info = GaugeMetricFamily("nara_participant_info", "1 for each participant in a call, with its role, media "
                                 "connection state and ICE route (host, srflx, relay).",
                                 labels=[*PARTICIPANT, "role", "connection", "route"])
        sent = GaugeMetricFamily("nara_participant_send_bitrate_bps", "What the participant publishes, as it "
                                 "reaches the server, bit/s.", labels=[*PARTICIPANT, "kind"])
        received = GaugeMetricFamily("nara_participant_receive_bitrate_bps", "What the server forwards to the "
                                     "participant (resends and probe padding aside), bit/s.",
                                     labels=[*PARTICIPANT, "kind"])
        loss = GaugeMetricFamily("nara_participant_loss_ratio", "Share of packets lost: up, on the participant's "
                                 "uplink over the last sampling interval (before repair); down, as its receiver "
                                 "reports say (after repairs in time).", labels=[*PARTICIPANT, "direction"])
        nacked = GaugeMetricFamily("nara_participant_nack_ratio", "Share of the packets sent to the participant "
                                   "that it asked for again (NACK): loss toward it before repair.", labels=PARTICIPANT)
        rtt = GaugeMetricFamily("nara_participant_rtt_seconds", "Round trip between the server and the "
                                "participant, from its latest receiver report.", labels=PARTICIPANT)
        estimate = GaugeMetricFamily("nara_participant_estimate_bps", "What the participant's downlink is "
                                     "estimated to carry, bit/s.", labels=PARTICIPANT)
        cap = GaugeMetricFamily("nara_participant_rate_cap_bps", "The most the participant's video should send, as "
                                "last told to it (REMB), bit/s.", labels=PARTICIPANT)
        layers = GaugeMetricFamily("nara_layers_active", "Lower layers of the participant's video the server is "
                                   "making right now (each one an encoder).", labels=PARTICIPANT)
        layer = GaugeMetricFamily("nara_participant_video_layer", "1 for the layer of another participant's video "
                                  "(from) this participant receives: starting, paused, 90p, 180p, 360p or original.",
                                  labels=[*PARTICIPANT, "from", "layer"])
        height = GaugeMetricFamily("nara_participant_video_height_pixels", "Picture height of that video as sent "
                                   "to the participant; 0 while paused or starting.", labels=[*PARTICIPANT, "from"])
        paused = GaugeMetricFamily("nara_participant_video_paused", "1 while the participant's link cannot take "
                                   "even the lowest layer of that video.", labels=[*PARTICIPANT, "from"])
        forwarded = CounterMetricFamily("nara_forwarded_packets", "RTP packets sent to the participant (resends "
                                        "and probe padding included).", labels=[*PARTICIPANT, "kind"])
        forwarded_bytes = CounterMetricFamily("nara_forwarded_bytes", "RTP payload bytes sent to the participant.",
                                              labels=[*PARTICIPANT, "kind"])
        expected = CounterMetricFamily("nara_uplink_packets_expected", "RTP packets the participant sent to the "
                                       "server (by sequence number).", labels=[*PARTICIPANT, "kind"])
        lost = CounterMetricFamily("nara_uplink_packets_lost", "Of those, packets that did not arrive the first "
                                   "time (a retransmission may have repaired them).", labels=[*PARTICIPANT, "kind"])
        for consultation in consultations:
            for p in consultation.participants:
                who = [p.consultation, p.participant]
                info.add_metric([*who, p.role, p.connection, p.route or ""], 1)
                for kind, rate in sorted(p.sent.items()):
                    sent.add_metric([*who, kind], rate)
                for kind, rate in sorted(p.received.items()):
                    received.add_metric([*who, kind], rate)
                for kind, count in sorted(p.forwarded_packets.items()):
                    forwarded.add_metric([*who, kind], count)
                    forwarded_bytes.add_metric([*who, kind], p.forwarded_bytes[kind])
                for kind, (packets, missing) in sorted(p.uplink_packets.items()):
                    expected.add_metric([*who, kind], packets)
                    lost.add_metric([*who, kind], missing)
                loss_up = self.history.loss_up(p.consultation, p.participant)
                if loss_up is not None:
                    loss.add_metric([*who, "up"], loss_up)
                if p.loss_down is not None:
                    loss.add_metric([*who, "down"], p.loss_down)
                if p.nacked_down is not None:
                    nacked.add_metric(who, p.nacked_down)
                if p.rtt is not None:
                    rtt.add_metric(who, p.rtt)
                if p.estimate is not None:
                    estimate.add_metric(who, p.estimate)
                if p.rate_cap is not None:
                    cap.add_metric(who, p.rate_cap)
                if "video" in p.sent:
                    layers.add_metric(who, p.layers_active)
                for video in p.video:
                    layer.add_metric([*who, video.publisher, video.layer], 1)
                    height.add_metric([*who, video.publisher], video.height)
                    paused.add_metric([*who, video.publisher], 1 if video.paused else 0)
        yield from (info, sent, received, loss, nacked, rtt, estimate, cap, layers, layer, height, paused,
                    forwarded, forwarded_bytes, expected, lost)

    @staticmethod
    def _images(images: ImageStore) -> Iterator[Metric]:
        uploads, stored, size = images.totals()
        by_state = GaugeMetricFamily("nara_image_uploads", "Image uploads the server knows of, by state (open: "
                                     "under way or waiting to resume).", labels=["state"])
        for state in ("open", "complete", "discarded"):
            by_state.add_metric([state], uploads.get(state, 0))
        yield by_state
        yield GaugeMetricFamily("nara_images_stored", "Images stored.", value=stored)
        yield GaugeMetricFamily("nara_images_stored_bytes", "Bytes of the images stored.", value=size)


def registry_for(media: MediaService, history: LiveHistory,
                 images: ImageStore | None = None) -> tuple[CollectorRegistry, NaraCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = NaraCollector(media, history, images)
    registry.register(collector)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux)
    PlatformCollector(registry=registry)
    return registry, collector


METRICS_TOKEN: web.AppKey[str] = web.AppKey("metrics_token", str)
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry", CollectorRegistry)
COLLECTOR: web.AppKey[NaraCollector] = web.AppKey("metrics_collector", NaraCollector)


def _check_bearer(request: web.Request) -> None:
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        raise api_error(401, "metrics_token_missing",
                        "Send the metrics token (or the admin key) as 'Authorization: Bearer <token>'.")
    accepted = (request.app[METRICS_TOKEN], request.app[ADMIN_KEY])
    if not any(hmac.compare_digest(supplied.encode(), key.encode()) for key in accepted):
        raise api_error(403, "metrics_token_invalid", "The metrics token is not valid.")


async def metrics(request: web.Request) -> web.Response:
    _check_bearer(request)
    await request.app[COLLECTOR].refresh()
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Cache-Control": "no-store"})


def add_routes(app: web.Application, config: ServerConfig, media: MediaService, history: LiveHistory,
               images: ImageStore | None = None) -> None:
    """``/metrics``, unless the configuration turns it off (``[metrics] enabled = false``)."""
    if not config.metrics_enabled:
        return
    app[METRICS_TOKEN] = private_value(config.data_dir, METRICS_TOKEN_FILE)
    app[REGISTRY], app[COLLECTOR] = registry_for(media, history, images)
    app.router.add_get("/metrics", metrics, name="metrics")
