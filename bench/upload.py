"""``nara bench upload``: a wound photo over a thin, lossy link with outages, beside the kit's audio call.

The goal of issue 7: a 5 MB image over 256 kbit/s with 10 % loss and two
20 s outages arrives intact, with goodput of at least 70 % of the link's rate,
while an audio call on the same link keeps its audio without gaps.

Who is where. The benchmark runs in a network namespace of its own (it starts
itself in one with ``unshare --net`` when it is not). ``nara serve`` listens
there. The kit (``nara edge run``, camera ``none``, synthetic microphone: an
audio call) runs in a second namespace whose only way out is the packet link
(``bench/packetlink.py``): every packet of its call (UDP) and of its uploads
and signalling (TCP) crosses one emulated bottleneck, in each direction.
A clinician on the server's side, unimpaired, is in the call: it speaks (a
tone, through Nära's Opus) and listens to the kit through Nära's receive path.

The run, on one link and one call:

1. baseline: ``--baseline-seconds`` of the call alone, with one outage as
   long as the first of the upload's;
2. upload: a photo of ``--image-mb`` megabytes (a synthetic wound scene,
   JPEG) is put in the kit's outbox with ``nara edge photo``; the kit's
   running agent uploads it (tus, paced by ``edge/pacing.py``); the outages
   come at their set times after the photo was put in; the run ends when the
   clinician is told ``image-added``, and the stored image's SHA-256 and the
   listing (exactly one image) are checked.

Reported: delivered intact, total time, goodput (image bytes over the time
the link was up while uploading) as a share of the link's rate, the audio's
gap share while the call was up (each outage left out, and the time until
the kit's audio played again after it) in both phases and their ratio, that
recovery time after each outage, and per second what each direction carried
(TCP and UDP apart), the queueing delay the audio met, losses, the kit's
upload socket (congestion window, round trip, retransmissions), and the
audio gap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from mediaserver.receive import PacketFate

from .link import GilbertElliott, LinkProfile
from .metrics import AudioReceipt, audio_gap
from .packetlink import Addressing, LinkReading, PacketLink
from .process import PROJECT, NaraServer
from .upload_figures import (
    PhaseFigures,
    goodput_share,
    percent,
    phase_figures,
    ratio,
    seconds_list,
    up_time,
)

GOODPUT_GOAL = 0.70
SAMPLE_INTERVAL = 1.0
KIT_LABEL = "kit"
KIT_PAGE_PORT = 8090  # on the kit's own loopback
NETNS_MARK = "NARA_BENCH_NETNS"
ADDRESSING = Addressing()


@dataclass(frozen=True)
class Settings:
    rate_kbps: float = 256.0  # both ways
    loss: float = 0.10  # both ways
    loss_burst: float = 1.0  # mean length of a loss burst in packets; 1: independent losses
    rtt_ms: float = 100.0
    queue_ms: float = 500.0
    outages: tuple[tuple[float, float], ...] = ((30.0, 20.0), (120.0, 20.0))  # (s after the photo, length)
    image_bytes: int = 5_000_000
    baseline_s: float = 60.0
    upload_kbps: int = 2000  # the kit's ceiling for uploads (its `upload_kbps` setting)
    # The kit's TCP congestion control. A Raspberry Pi runs cubic, but a network namespace other than the
    # first may only make an algorithm of net.ipv4.tcp_allowed_congestion_control its default (reno and bbr
    # here); reno is cubic's loss-based kin, and at this link's window of a few packets they behave alike.
    kit_tcp: str = "reno"
    seed: int = 1
    timeout_s: float = 1200.0  # the upload must be done by then

    def link(self) -> LinkProfile:
        bursty = self.loss > 0 and self.loss_burst > 1
        return LinkProfile(rate_bps=self.rate_kbps * 1000, queue_ms=self.queue_ms, delay_ms=self.rtt_ms / 2,
                           loss=0.0 if bursty else self.loss,
                           bursts=GilbertElliott.with_mean(self.loss, self.loss_burst) if bursty else None)

    def describe(self) -> str:
        loss = f"{100 * self.loss:g} % loss" + (f" in bursts of {self.loss_burst:g}" if self.loss_burst > 1 else "")
        outages = ", ".join(f"{length:g} s at {at:g} s" for at, length in self.outages) or "none"
        return (f"{self.rate_kbps:g} kbit/s both ways, {loss}, RTT {self.rtt_ms:g} ms, queue {self.queue_ms:g} ms; "
                f"{self.image_bytes / 1e6:g} MB photo; outages {outages}; kit ceiling {self.upload_kbps} kbit/s, "
                f"TCP {self.kit_tcp}; seed {self.seed}")


# --- the photo ------------------------------------------------------------------------------------


def wound_photo(size: int, seed: int) -> bytes:
    """A JPEG of a synthetic wound scene of exactly ``size`` bytes.

    The scene is rendered at a 12-megapixel sensor's size and encoded at the
    highest quality that fits; comment segments fill the rest, so runs with
    the same size carry the same number of bytes.
    """
    from edge.photos import encode_jpeg
    from edge.scene import SyntheticScene, render_scene

    width = 4056
    while width >= 64:
        picture = render_scene(SyntheticScene(width=width, height=width * 3 // 4, seed=seed))
        for quality in range(100, 49, -1):
            data = encode_jpeg(picture, quality)
            if len(data) == size or len(data) <= size - COMMENT_OVERHEAD:
                return padded(data, size)
        width //= 2
    raise ValueError(f"no JPEG fits in {size} bytes")


COMMENT_OVERHEAD = 4  # a JPEG comment segment: its marker and length
COMMENT_MAX = 65533  # bytes of text in one


def padded(jpeg: bytes, size: int) -> bytes:
    """``jpeg`` grown to ``size`` bytes with comment segments after its start marker (decoders skip them)."""
    fill = size - len(jpeg)
    segments = []
    while fill > 0:
        body = min(fill - COMMENT_OVERHEAD, COMMENT_MAX)
        if 0 < fill - body - COMMENT_OVERHEAD < COMMENT_OVERHEAD:
            body -= COMMENT_OVERHEAD  # leave enough for one more segment
        segments.append(b"\xff\xfe" + (body + 2).to_bytes(2, "big") + b" " * body)
        fill -= body + COMMENT_OVERHEAD
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


# --- the kit, in a namespace of its own --------------------------------------------------------


def in_private_namespace() -> bool:
    """Root, in a network namespace with loopback only (so nothing here touches the machine's network)."""
    try:
        return os.geteuid() == 0 and [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


class KitProcess:
    """``nara edge run`` in a network namespace of its own; its log is kept and its states noted."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path, clock: Any) -> None:
        self.process = process
        self.states: list[tuple[float, str]] = []  # (run time, state)
        self.lines: list[str] = []
        self._log = log.open("w")
        self._clock = clock
        self.changed = asyncio.Condition()  # notified at every line of its log
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, config: Path, log: Path, clock: Any) -> KitProcess:
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        env.pop("NOTIFY_SOCKET", None)
        process = await asyncio.create_subprocess_exec(
            "unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            sys.executable, "-m", "nara.cli", "edge", "run", "--config", str(config),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        return cls(process, log, clock)

    @property
    def pid(self) -> int:
        return self.process.pid  # unshare and sh exec into the agent: one process throughout

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            at = self._clock()
            self.lines.append(line)
            self._log.write(f"{at:9.3f} {line}\n")
            self._log.flush()
            if " state=" in line:
                self.states.append((at, line.split(" state=")[1].split()[0]))
            async with self.changed:
                self.changed.notify_all()

    def state(self) -> str:
        return self.states[-1][1] if self.states else "-"

    def entered(self, state: str, after: float) -> float | None:
        """When the kit first logged ``state`` after ``after`` (on the clock it was given)."""
        return next((t for t, s in self.states if s == state and t > after), None)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, checked at every line the kit logs."""
        try:
            async with self.changed:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout)
        except TimeoutError:
            raise TimeoutError("the kit did not get there; its log ends:\n" + "\n".join(self.lines[-20:])) from None

    async def in_namespace(self, *command: str) -> tuple[int, str]:
        """Run ``command`` in the kit's network namespace: (exit status, its output)."""
        process = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(self.pid), "-n", *command, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(PROJECT)})
        output, _ = await process.communicate()
        return await process.wait(), output.decode(errors="replace")

    async def page_status(self) -> dict[str, Any]:
        """The kit's own page's /status (served on the kit's loopback, so asked from inside its namespace)."""
        request = (f'exec 3<>/dev/tcp/127.0.0.1/{KIT_PAGE_PORT} && '
                   'printf "GET /status HTTP/1.0\\r\\n\\r\\n" >&3 && cat <&3')
        status, output = await self.in_namespace("bash", "-c", request)
        _, _, body = output.partition("\r\n\r\n")
        try:
            data: dict[str, Any] = json.loads(body) if status == 0 else {}
        except ValueError:
            return {}
        return data

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._log.close()


def kit_toml(server: str, credential: Path, data_dir: Path, upload_kbps: int) -> str:
    return "\n".join([
        f'server = "{server}"', f'credential = "{credential}"', 'camera = "none"', 'microphone = "synthetic"',
        f'page = "127.0.0.1:{KIT_PAGE_PORT}"', f'data_dir = "{data_dir}"', f"upload_kbps = {upload_kbps}", ""])


def socket_stats(ss_output: str, server: str) -> dict[str, float | str]:
    """The kit's TCP connections to the server (``ss -tin``): the busiest one's window and round trip,
    and retransmissions over all of them."""
    connections: list[dict[str, str]] = []
    for line in ss_output.splitlines():
        if line.startswith((" ", "\t")) and connections and line.strip():
            tokens = line.split()
            connections[-1].update(dict(token.split(":", 1) for token in tokens if ":" in token))
            connections[-1]["cc"] = tokens[0]  # the congestion control comes first, on its own
            for name, value in zip(tokens, tokens[1:], strict=False):
                if name == "pacing_rate":  # "pacing_rate 202328bps/222496bps": its own, and the most allowed
                    connections[-1][name] = value
        elif server in line:
            connections.append({})
    if not connections:
        return {}
    busiest = max(connections, key=lambda c: int(c.get("bytes_sent", "0")))
    stats: dict[str, float | str] = {
        "tcp_connections": len(connections),
        "tcp_cc": busiest.get("cc", ""),
        "tcp_cwnd": float(busiest.get("cwnd", "0")),
        "tcp_rtt_ms": float(busiest.get("rtt", "0/0").split("/")[0]),
        "tcp_rto_ms": float(busiest.get("rto", "0")),
        "tcp_unacked": float(busiest.get("unacked", "0")),
        "tcp_bytes_retrans": float(sum(int(c.get("bytes_retrans", "0")) for c in connections)),
    }
    if "pacing_rate" in busiest:  # what actually paced the upload: TCP's own pacing under the uploader's
        own, _, most = busiest["pacing_rate"].partition("/")
        stats["tcp_pacing_kbps"] = _kbps(own)
        if most:
            stats["tcp_max_pacing_kbps"] = _kbps(most)
    if "notsent" in busiest or "pacing_rate" in busiest:
        stats["tcp_notsent"] = float(busiest.get("notsent", "0"))
    bbr = busiest.get("bbr", "")
    if bbr.startswith("("):  # "bbr:(bw:204376bps,mrtt:149.973,pacing_gain:1.25,cwnd_gain:2)"
        fields = dict(item.split(":", 1) for item in bbr.strip("()").split(",") if ":" in item)
        if "bw" in fields:
            stats["tcp_bbr_bw_kbps"] = _kbps(fields["bw"])
        if "pacing_gain" in fields:
            stats["tcp_bbr_gain"] = float(fields["pacing_gain"])
    return stats


def _kbps(value: str) -> float:
    """ss's rates ("202328bps", "1.2Mbps", "980Kbps") in kbit/s."""
    scale = {"Mbps": 1000.0, "Kbps": 1.0, "bps": 0.001}
    for unit, factor in scale.items():
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    return float(value) / 1000


# --- the clinician -------------------------------------------------------------------------------


class Clinician:
    """In the call on the server's side, unimpaired: speaks a tone and listens to the kit."""

    def __init__(self, kit_id: str, run_start: float) -> None:
        from .participants import Participant

        self.kit_id = kit_id
        self.listener = Participant("clinician", "loopback", run_start, tags={})
        self.client: Any = None
        self._followed: set[str] = set()
        self.tracks: list[Any] = []  # the audio tracks followed (Nära's receive path: they count what they play)
        self.run_start = run_start
        self.packets: list[tuple[Any, ...]] = []  # what became of each of the kit's audio packets (packets.csv)

    async def join(self, url: str, room: str, token: str) -> None:
        from mediaserver.encoders import OpusTrack
        from signalling.client import ConsultationClient

        from .synthetic import ToneAudioTrack

        self.token = token
        self.client = ConsultationClient(url, room, token, audio=OpusTrack(ToneAudioTrack(440.0, voiced=True)),
                                         on_answered=lambda pc: self._follow(), nara_receive=True)
        self.listener.client = self.client  # closed with the listener
        await self.client.join()

    def _follow(self) -> None:
        for mid, track in self.client.remote_tracks.items():
            if track.kind == "audio" and mid not in self._followed:
                self._followed.add(mid)
                self.tracks.append(track)
                self.listener.follow(track, self._owner(mid))
                playout = getattr(track, "playout", None)
                if playout is not None:
                    playout.on_packet = self._note_packet(self._owner(mid))

    def _note_packet(self, owner: Callable[[], str | None]) -> Callable[[PacketFate], None]:
        def note(p: PacketFate) -> None:
            if owner() == KIT_LABEL:
                self.packets.append((round(time.time() - self.run_start, 4), p.sequence_number, p.timestamp, p.fate,
                                     int(p.asked), round(p.transit, 4), round(1000 * (p.transit - p.base), 1),
                                     round(1000 * p.delay, 1), round(1000 * p.target, 1)))

        return note

    def playout_counters(self) -> dict[str, int]:
        """What the receive path did with the kit's audio so far: played, concealed, dropped late, restarted..."""
        totals: dict[str, int] = {}
        for track in self.tracks:
            counters = getattr(track, "counters", None)
            for name, value in (asdict(counters) if counters is not None else {}).items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def _owner(self, mid: str) -> Any:
        def who() -> str | None:
            owner = self.client.owners.get(mid)
            return KIT_LABEL if owner is not None and owner[0] == self.kit_id else None

        return who

    @property
    def receipts(self) -> list[AudioReceipt]:
        return self.listener.record(KIT_LABEL).audio_receipts

    async def hears_kit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for r in self.receipts[-50:] if r.played) < 25:
            if time.monotonic() > deadline:
                raise TimeoutError("the clinician does not hear the kit")
            await asyncio.sleep(0.2)  # polling the receiver's record

    async def image_added(self, timeout: float) -> dict[str, Any]:
        def added() -> dict[str, Any] | None:
            return next((e["image"] for e in self.client.events if e.get("type") == "image-added"), None)

        async with self.client.changed:
            await asyncio.wait_for(self.client.changed.wait_for(lambda: added() is not None), timeout)
        image = added()
        assert image is not None
        return image

    async def close(self) -> None:
        await self.listener.close()


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    settings: Settings
    start: float = field(default_factory=time.time)  # wall clock, as the audio receipts are
    outages: list[tuple[float, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    baseline: tuple[float, float] = (0.0, 0.0)
    upload_start: float | None = None  # when the photo was in the outbox
    image_at: float | None = None
    link_up: bool = True
    packets: list[tuple[Any, ...]] = field(default_factory=list)  # the clinician's record of the kit's audio packets

    def now(self) -> float:
        return time.time() - self.start


async def outage(link: PacketLink, run: Run, length: float) -> None:
    await link.cut()
    run.link_up = False
    begun = run.now()
    await asyncio.sleep(length)  # the outage itself
    await link.restore()
    run.link_up = True
    run.outages.append((begun, run.now()))


async def outages_after(link: PacketLink, run: Run, schedule: tuple[tuple[float, float], ...],
                        origin: float) -> None:
    """The outages of ``schedule`` (seconds after ``origin``, length), while the image has not arrived."""
    for at, length in schedule:
        await asyncio.sleep(max(0.0, origin + at - run.now()))  # until the outage is due
        if run.image_at is not None:
            return
        await outage(link, run, length)


async def sample(link: PacketLink, kit: KitProcess, clinician: Clinician, run: Run) -> None:
    """Every SAMPLE_INTERVAL: what the link carried and lost, the kit's upload socket, and what the
    clinician's receive path did with the kit's audio."""
    previous: LinkReading | None = None
    heard = clinician.playout_counters()
    origin = run.now()
    tick = 0
    while True:
        tick += 1
        await asyncio.sleep(max(0.0, origin + tick * SAMPLE_INTERVAL - run.now()))  # the sampling clock
        reading = await link.read()
        _, ss_output = await kit.in_namespace("ss", "-tin", "dst", ADDRESSING.server_address)
        row: dict[str, Any] = {"t": round(run.now(), 3), "link_up": run.link_up, "kit_state": kit.state()}
        if previous is not None:
            row.update(_rates(previous, reading))
        row.update(socket_stats(ss_output, ADDRESSING.server_address))
        uploader = ((await kit.page_status()).get("photos") or {}).get("uploader") or {}
        row.update({"upload_state": uploader.get("state"), "upload_rate_kbps": uploader.get("rate_kbps"),
                    "upload_queueing_ms": uploader.get("queueing_ms"), "upload_sent": uploader.get("sent"),
                    "upload_socket_queueing_ms": uploader.get("socket_queueing_ms"),
                    "upload_delivered_kbps": uploader.get("delivered_kbps"),
                    "uplink_thin": uploader.get("thin_uplink")})
        row["link_cpu_seconds"] = reading.cpu_seconds
        now_heard = clinician.playout_counters()
        for name in ("concealed", "late_dropped", "skipped", "resets", "duplicates", "nacked"):
            row[f"rx_{name}"] = now_heard.get(name, 0) - heard.get(name, 0)
        heard = now_heard
        run.samples.append(row)
        previous = reading


def _rates(before: LinkReading, after: LinkReading) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in ("uplink", "downlink"):
        a, b = getattr(before, name), getattr(after, name)
        short = "up" if name == "uplink" else "down"
        for protocol in ("tcp", "udp"):
            ta, tb = getattr(a, protocol), getattr(b, protocol)
            row[f"{short}_{protocol}_kbps"] = (tb.bytes - ta.bytes) * 8 / 1000 / SAMPLE_INTERVAL
            packets = tb.packets - ta.packets
            row[f"{short}_{protocol}_packets"] = packets  # what it is made of: the call's packets, or its repairs
            row[f"{short}_{protocol}_delay_ms"] = (1000 * (tb.delay_sum - ta.delay_sum) / packets) if packets else None
            row[f"{short}_{protocol}_delay_max_ms"] = 1000 * tb.delay_max if packets else None
        for kind in ("lost_random", "lost_queue", "lost_outage"):
            row[f"{short}_{kind}"] = getattr(b.link, kind) - getattr(a.link, kind)
    return row


async def put_photo(kit: KitProcess, config: Path, photo: Path) -> None:
    status, output = await kit.in_namespace(
        sys.executable, "-m", "nara.cli", "edge", "photo", "--config", str(config), "--file", str(photo),
        "--body-site", "sacrum", "--consent", "yes")
    if status != 0:
        raise RuntimeError(f"nara edge photo failed ({status}): {output.strip()}")


async def stored_image(url: str, room: str, token: str, image: dict[str, Any]) -> dict[str, Any]:
    """What the server holds: the listing's images of this photo, and the stored bytes' SHA-256."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{url}/api/consultations/{room}/images") as response:
            listing = (await response.json())["images"]
        async with http.get(f"{url}/api/images/{image['id']}", params={"consultation": room}) as response:
            data = await response.read()
    return {"listed": len([i for i in listing if i["sha256"] == image["sha256"]]), "images_listed": len(listing),
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@dataclass
class Testbed:
    server: NaraServer
    kit: KitProcess
    link: PacketLink
    clinician: Clinician
    room: str
    config: Path  # the kit's


@contextlib.asynccontextmanager
async def testbed(settings: Settings, r: Run, folder: Path, workdir: Path) -> AsyncIterator[Testbed]:
    """The server, the kit in its namespace behind the packet link, in a call with the clinician."""
    from mediaserver.aiortc_adapter import restrict_host_addresses

    from .edge import enrolled_kit

    restrict_host_addresses(["127.0.0.1"])  # the clinician's media stays on loopback, off the kit's link
    server = NaraServer(workdir / "server", ["--host", "0.0.0.0", "--media-address", "127.0.0.1",
                                             "--media-address", ADDRESSING.server_address])
    kit: KitProcess | None = None
    link: PacketLink | None = None
    clinician: Clinician | None = None
    try:
        kit_id, credential = await enrolled_kit(server, workdir)
        room = await server.consultation("Bench: wound photo over a thin link")
        await server.api("PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
        await server.api("POST", f"/api/consultations/{room}/call-kit")
        config = workdir / "edge.toml"
        config.write_text(kit_toml(f"http://{ADDRESSING.server_address}:{server.port}", credential,
                                   workdir / "kit-data", settings.upload_kbps))
        kit = await KitProcess.start(config, folder / "kit.log", r.now)
        status, output = await kit.in_namespace("sysctl", "-w", f"net.ipv4.tcp_congestion_control={settings.kit_tcp}")
        if status != 0:
            raise RuntimeError(f"the kit's TCP congestion control cannot be {settings.kit_tcp} (a namespace may "
                               f"only use those in net.ipv4.tcp_allowed_congestion_control): {output.strip()}")
        profile = settings.link()
        link = await PacketLink.start(kit.pid, profile, profile, seed=settings.seed, addressing=ADDRESSING)
        clinician = Clinician(kit_id, r.start)
        await clinician.join(server.url, room, await server.token(room, "Bench clinician", "clinician"))
        print(f"Waiting for the call: {settings.describe()}", flush=True)
        await clinician.hears_kit(90)
        yield Testbed(server, kit, link, clinician, room, config)
    finally:
        if clinician is not None:
            await clinician.close()
        if kit is not None:
            await kit.stop()
        if link is not None:
            await link.close()
        server.stop()


async def baseline_phase(bed: Testbed, r: Run) -> None:
    """The call alone, with one outage as long as the upload's first, a third of the way in."""
    s = r.settings
    begun = r.now()
    print(f"Baseline: {s.baseline_s:g} s of the call without an upload", flush=True)
    if s.outages:
        await outages_after(bed.link, r, ((s.baseline_s / 3, s.outages[0][1]),), begun)
    await asyncio.sleep(max(0.0, begun + s.baseline_s - r.now()))  # the rest of the baseline
    r.baseline = (begun, r.now())


async def upload_phase(bed: Testbed, r: Run, photo: Path) -> dict[str, Any]:
    """The photo into the kit's outbox, the outages at their times, until the server announces the image."""
    s = r.settings
    sent_sha = hashlib.sha256(await asyncio.to_thread(photo.read_bytes)).hexdigest()
    print(f"Upload: {s.image_bytes} bytes into the kit's outbox", flush=True)
    await put_photo(bed.kit, bed.config, photo)
    r.upload_start = r.now()
    outages = asyncio.ensure_future(outages_after(bed.link, r, s.outages, r.upload_start))
    try:
        image = await bed.clinician.image_added(s.timeout_s)
    except TimeoutError:
        return {"sent_sha256": sent_sha, "bytes": s.image_bytes, "intact": False,
                "error": f"not stored within {s.timeout_s:g} s"}
    finally:
        outages.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await outages
        if not r.link_up:
            await bed.link.restore()  # the image arrived during an outage (or the run gave up in one)
    r.image_at = r.now()
    print(f"  stored after {r.image_at - r.upload_start:.1f} s", flush=True)
    held = await stored_image(bed.server.url, bed.room, bed.clinician.token, image)
    return {"sent_sha256": sent_sha, "bytes": s.image_bytes, "id": image["id"], **held,
            "intact": held["sha256"] == sent_sha and held["listed"] == 1}


async def run(settings: Settings, folder: Path, workdir: Path, photo: Path) -> dict[str, Any]:
    """The whole run; ``workdir`` holds the server's and the kit's files, ``photo`` is the image to upload.
    Whatever happens, what was measured is written to ``folder``."""
    r = Run(settings)
    result: dict[str, Any] = {"settings": asdict(settings), "description": settings.describe()}
    receipts: list[AudioReceipt] = []
    try:
        async with testbed(settings, r, folder, workdir) as bed:
            receipts = bed.clinician.receipts  # the clinician's own list, still filling
            r.packets = bed.clinician.packets  # likewise
            sampler = asyncio.ensure_future(sample(bed.link, bed.kit, bed.clinician, r))
            try:
                await baseline_phase(bed, r)
                result["image"] = await upload_phase(bed, r, photo)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            result["clinician_playout"] = bed.clinician.playout_counters()
    except Exception as exc:  # reported with what was measured up to then
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    result.update(figures(r, receipts))
    await asyncio.to_thread(write_results, folder, result, r, receipts)
    return result


def figures(r: Run, receipts: list[AudioReceipt]) -> dict[str, Any]:
    s = r.settings
    upload_end = r.image_at if r.image_at is not None else r.now()
    upload_span = (upload_end if r.upload_start is None else r.upload_start, upload_end)
    baseline = phase_figures(receipts, r.baseline, r.outages)
    upload = phase_figures(receipts, upload_span, r.outages)
    delivered = r.image_at is not None
    share = goodput_share(s.image_bytes, upload_span, r.outages, s.rate_kbps * 1000) if delivered else None
    return {
        "total_s": upload_span[1] - upload_span[0] if delivered else None,
        "link_up_s": up_time(upload_span, r.outages),
        "goodput_kbps": None if share is None else share * s.rate_kbps,
        "goodput_share": share,
        "goodput_goal_met": share is not None and share >= GOODPUT_GOAL,
        "baseline": _phase(baseline),
        "upload": _phase(upload),
        "audio_gap_ratio": ratio(upload.audio_gap, baseline.audio_gap),
        "outages": r.outages,
        "link_cpu_seconds": r.samples[-1]["link_cpu_seconds"] if r.samples else None,
        "upload_tcp_kbps_per_10s": per_ten_seconds(r.samples, upload_span, "up_tcp_kbps"),
    }


def per_ten_seconds(samples: list[dict[str, Any]], span: tuple[float, float], key: str) -> list[float | None]:
    """The mean of ``key`` over each 10 s of ``span`` (None: the link was down all that time)."""
    means: list[float | None] = []
    start = span[0]
    while start < span[1]:
        values = [row[key] for row in samples
                  if start < row["t"] <= start + 10 and row.get(key) is not None and row["link_up"]]
        means.append(sum(values) / len(values) if values else None)
        start += 10
    return means


def _phase(p: PhaseFigures) -> dict[str, Any]:
    return {"span": p.span, "outages": p.outages, "judged_s": p.judged_seconds, "audio_gap": p.audio_gap,
            "recoveries_s": p.recoveries}


def write_results(folder: Path, result: dict[str, Any], r: Run, receipts: list[AudioReceipt]) -> None:
    for row in r.samples:
        row["phase"] = ("upload" if r.upload_start is not None and row["t"] >= r.upload_start else "baseline")
        gap = audio_gap(receipts, row["t"] - SAMPLE_INTERVAL, row["t"])
        row["audio_gap"] = None if gap is None else round(gap, 3)
    result["per_second"] = r.samples
    (folder / "summary.json").write_text(json.dumps(result, indent=2))
    columns = sorted({key for row in r.samples for key in row}, key=lambda k: (k != "t", k != "phase", k))
    with (folder / "per-second.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(r.samples)
    with (folder / "audio.csv").open("w", newline="") as out:
        frames = csv.writer(out)
        frames.writerow(["at", "pts", "rate", "duration", "played", "source"])
        frames.writerows((round(a.at, 4), a.pts, a.rate, a.duration, int(a.played), a.source) for a in receipts)
    with (folder / "packets.csv").open("w", newline="") as out:
        # Each of the kit's audio packets at the clinician: transit is arrival less media time (seconds, its own
        # origin), excess how much later than the fastest of the last seconds it came; the playout's delay and
        # target then, in ms behind those fastest.
        packets = csv.writer(out)
        packets.writerow(["at", "seq", "ts", "fate", "asked", "transit", "excess_ms", "delay_ms", "target_ms"])
        packets.writerows(r.packets)
    (folder / "table.txt").write_text(table(result))


def table(result: dict[str, Any]) -> str:
    image = result.get("image", {})
    baseline, upload = result["baseline"], result["upload"]
    share = result["goodput_share"]
    gap_ratio = result["audio_gap_ratio"]
    lines = [
        f"Images over a thin link: {result['description']}",
        "",
        f"delivered intact        {'yes' if image.get('intact') else 'NO'}"
        + (f" (stored SHA-256 {'matches' if image['sha256'] == image['sent_sha256'] else 'DIFFERS'}, "
           f"listed {image['listed']} time(s))" if "listed" in image else f" ({image.get('error', 'not stored')})"),
        "total time              " + ("-" if result["total_s"] is None else
                                     f"{result['total_s']:.1f} s (link up {result['link_up_s']:.1f} s)"),
        f"goodput                 {result['goodput_kbps'] or 0:.0f} kbit/s = {percent(share, 0)} of the link "
        f"(goal {percent(GOODPUT_GOAL, 0)}: {'met' if result['goodput_goal_met'] else 'missed'})",
        "",
        f"{'':24}{'baseline (no upload)':>24}{'during the upload':>24}",
        f"{'audio gap, call up':24}{percent(baseline['audio_gap'], 2):>24}{percent(upload['audio_gap'], 2):>24}"
        + ("" if gap_ratio is None else f"   ratio {gap_ratio:.2f}"),
        f"{'seconds judged':24}{baseline['judged_s']:>24.1f}{upload['judged_s']:>24.1f}",
        f"{'audio back after outage':24}{seconds_list(baseline['recoveries_s']):>24}"
        f"{seconds_list(upload['recoveries_s']):>24}",
    ]
    rates = result.get("upload_tcp_kbps_per_10s")
    if rates:
        lines += ["", "uplink TCP (the upload) in kbit/s, per 10 s from the photo: "
                  + " ".join("out" if v is None else f"{v:.0f}" for v in rates)]
    if result.get("error"):
        lines += ["", f"the run failed: {result['error']}"]
    if result.get("link_cpu_seconds") is not None:
        lines.append(f"{'link process CPU':24}{result['link_cpu_seconds']:>24.1f} s over the run")
    return "\n".join(lines) + "\n"


def settings_from(args: argparse.Namespace) -> Settings:
    outages = tuple((float(at), float(length)) for at, length in
                    (item.split(":") for item in args.outages.split(",") if item))
    return Settings(rate_kbps=args.rate_kbps, loss=args.loss / 100, loss_burst=args.loss_burst, rtt_ms=args.rtt_ms,
                    queue_ms=args.queue_ms, outages=outages, image_bytes=int(args.image_mb * 1_000_000),
                    baseline_s=args.baseline_seconds, upload_kbps=args.upload_kbps, kit_tcp=args.kit_tcp,
                    seed=args.seed)


def main(args: argparse.Namespace) -> int:
    if not in_private_namespace():
        if os.environ.get(NETNS_MARK) or os.geteuid() != 0 or not shutil.which("unshare"):
            print("nara bench upload needs root and a network namespace of its own (it makes TUN devices); "
                  "run it as root: it starts itself in one with unshare --net", file=sys.stderr)
            return 2
        os.environ[NETNS_MARK] = "1"
        command = [sys.executable, "-m", "nara.cli", *sys.argv[1:]]  # this same `nara bench upload ...`
        os.execvp("unshare", ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command])
    settings = settings_from(args)
    folder = Path(args.output or f"bench-results/upload-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nara-bench-upload-"))
    photo = workdir / "wound.jpg"
    photo.write_bytes(wound_photo(settings.image_bytes, settings.seed))
    try:
        result = asyncio.run(run(settings, folder, workdir, photo))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(result), end="")
    print(f"Results in {folder}/ (summary.json, table.txt, per-second.csv, audio.csv, packets.csv, kit.log)")
    return 0 if result.get("image", {}).get("intact") and result["goodput_goal_met"] else 1
