"""The kit's uploader against a real server: photos arrive whole, once, with their metadata, whatever the link does."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.tcp_proxy import TcpProxy
from edge.agent import KitAgent
from edge.outbox import DELIVERED, QUEUED, REFUSED, Outbox
from edge.pacing import MIN_CHUNK
from edge.reconnect import State
from edge.uploader import (
    SO_MAX_PACING_RATE,
    TOS_CS1,
    WIRE_OVERHEAD,
    Uploader,
    UploadSettings,
    UploadsStopped,
    _low_priority_socket,
)
from mediaserver.aiortc_adapter import THIN_FEEDBACK_INTERVAL, dtls_transport
from signalling.images import IMAGES
from tests.outbox_driver import photo_bytes, photo_metadata

from .conftest import RunningServer
from .edge_helpers import KitWatcher, admin, kit_config
from .upload_helpers import AnswerLosingProxy, AssignedKit, Changes, assigned_kit, stored_images


def uploader_for(outbox: Outbox, server_url: str, kit: AssignedKit, **settings: object) -> tuple[Uploader, Changes]:
    chosen = {"max_chunk": MIN_CHUNK, "max_stream": MIN_CHUNK, "idle_check": 0.05, **settings}
    uploader = Uploader(outbox, server_url, kit.credential, settings=UploadSettings(**chosen))  # type: ignore[arg-type]
    changes = Changes()
    uploader.on_change = outbox.on_change = changes
    return uploader, changes


async def test_a_photo_in_many_chunks_arrives_whole_with_its_metadata(server: RunningServer, tmp_path: Path) -> None:
    room = server.consultation("Hembesök")
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    outbox = Outbox.open(tmp_path / "outbox")
    image = photo_bytes("heel")
    metadata = photo_metadata(room, "heel")
    item = outbox.add(image, metadata)
    uploader, _ = uploader_for(outbox, server.url, kit, ceiling_kbps=100_000)

    await asyncio.wait_for(uploader.run_until_empty(), 30)

    receipt = outbox.get(item.id)
    assert receipt is not None and receipt.state == DELIVERED and receipt.image_ref
    assert not outbox.path_of(item).exists()  # the row is the receipt; the bytes are on the server
    [stored] = await stored_images(server.url, room, server.token(room, "Dr A", "clinician"))
    assert stored["id"] == receipt.image_ref
    assert stored["data"] == image and stored["sha256"] == hashlib.sha256(image).hexdigest()
    assert len(image) > 10 * MIN_CHUNK  # it took many PATCHes
    assert (stored["body_site"], stored["note"], stored["consent"], stored["device"], stored["filename"]) == (
        metadata.body_site, "heel", "yes", "Kit 7", "heel.jpg")
    assert stored["quality"] == metadata.quality and stored["mm_per_pixel"] == metadata.mm_per_pixel
    assert stored["captured_at"].replace("Z", "+00:00") == metadata.captured_at.isoformat()
    assert stored["uploaded_by"]["role"] == "kit"
    assert uploader.status()["state"] == "idle" and uploader.status()["delivered"] == 1


async def test_lost_answers_to_patches_do_not_lose_or_repeat_bytes(server: RunningServer, tmp_path: Path) -> None:
    room = server.consultation()
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    proxy = AnswerLosingProxy(server.url, lose={2, 5, 13})  # 13: the last chunk, whose answer names the image
    await proxy.start()
    try:
        outbox = Outbox.open(tmp_path / "outbox")
        image = photo_bytes("sacrum")
        item = outbox.add(image, photo_metadata(room, "sacrum"))
        uploader, _ = uploader_for(outbox, proxy.url, kit, ceiling_kbps=100_000,
                                   backoff=_quick_backoff())
        await asyncio.wait_for(uploader.run_until_empty(), 30)
    finally:
        await proxy.close()

    assert proxy.lost == 3
    assert uploader.bytes_sent == len(image)  # every chunk the server kept was known to be kept: none sent twice
    receipt = outbox.get(item.id)
    assert receipt is not None and receipt.state == DELIVERED
    [stored] = await stored_images(server.url, room, server.token(room, "Dr A", "clinician"))
    assert stored["data"] == image and stored["id"] == receipt.image_ref


@dataclass
class ProxiedUpload:
    """A photo in a kit's outbox, its uploader running at 200 kbit/s through a TCP proxy that can be cut."""

    room: str
    proxy: TcpProxy
    outbox: Outbox
    image: bytes
    item_id: str
    uploader: Uploader
    changes: Changes


@contextlib.asynccontextmanager
async def upload_through_a_proxy(server: RunningServer, tmp_path: Path, stall_timeout: float,
                                 **settings: object) -> AsyncIterator[ProxiedUpload]:
    room = server.consultation()
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    proxy = TcpProxy("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    await proxy.start()
    outbox = Outbox.open(tmp_path / "outbox")
    image = photo_bytes("hip", small=True)
    item = outbox.add(image, photo_metadata(room, "hip"))
    # 200 kbit/s: each 16 KiB chunk takes two thirds of a second on the wire, so a cut lands inside one.
    uploader, changes = uploader_for(outbox, proxy.url, kit, **{"ceiling_kbps": 200, "stall_timeout": stall_timeout,
                                                                "backoff": _quick_backoff(), **settings})
    running = asyncio.ensure_future(uploader.run())
    try:
        yield ProxiedUpload(room, proxy, outbox, image, item.id, uploader, changes)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await proxy.close()


async def test_a_connection_cut_in_the_middle_of_a_patch_resumes_where_the_server_is(
        server: RunningServer, tmp_path: Path) -> None:
    async with upload_through_a_proxy(server, tmp_path, stall_timeout=1.0) as up:
        outbox, uploader, item_id = up.outbox, up.uploader, up.item_id
        await up.changes.until(lambda: _sent(outbox, item_id) >= 2 * MIN_CHUNK
                               and uploader.sent - _sent(outbox, item_id) >= MIN_CHUNK // 4)
        up.proxy.cut()  # a quarter or more of the next chunk is on its way
        await up.changes.until(lambda: uploader.status()["state"] == "waiting")  # it noticed the stall
        assert uploader.status()["detail"] and "stalled" in uploader.status()["detail"]
        up.proxy.restore()
        uploader.network_back()
        await up.changes.until(lambda: _state(outbox, item_id) == DELIVERED, 30)
    [stored] = await stored_images(server.url, up.room, server.token(up.room, "Dr A", "clinician"))
    assert stored["data"] == up.image
    assert uploader.bytes_sent <= len(up.image) + MIN_CHUNK  # at most the chunk the cut broke was sent again


async def test_a_long_patch_cut_by_an_outage_keeps_the_blocks_the_server_verified(
        server: RunningServer, tmp_path: Path) -> None:
    """One PATCH carries the whole photo in blocks; the link dies half way: what the server verified before the
    cut counts, and only the rest is sent again."""
    async with upload_through_a_proxy(server, tmp_path, stall_timeout=1.0, max_stream=1024 * 1024) as up:
        outbox, uploader, item_id = up.outbox, up.uploader, up.item_id
        await up.changes.until(lambda: uploader.sent >= len(up.image) // 2)
        sent_at_cut = uploader.sent
        up.proxy.cut()
        await up.changes.until(lambda: uploader.status()["state"] == "waiting")
        assert _sent(outbox, item_id) == 0, "no PATCH was answered: the photo went as one"
        item = outbox.get(item_id)
        assert item is not None and item.location is not None
        kept = server.app[IMAGES].tus.store.upload(item.location.rsplit("/", 1)[1]).offset
        block = 200_000 // 8 // 2  # half a second of bytes at 200 kbit/s
        assert sent_at_cut - 2 * block <= kept < len(up.image), "the blocks verified before the cut count"
        sent_before = uploader.bytes_sent
        up.proxy.restore()
        uploader.network_back()
        await up.changes.until(lambda: _state(outbox, item_id) == DELIVERED, 30)
    assert uploader.bytes_sent - sent_before == len(up.image) - kept, "only what the server lacked went again"
    [stored] = await stored_images(server.url, up.room, server.token(up.room, "Dr A", "clinician"))
    assert stored["data"] == up.image


async def test_the_agent_seeing_the_server_again_as_a_stalled_request_expires_harms_nothing(
        server: RunningServer, tmp_path: Path) -> None:
    """The agent tells the uploader the server answers again (``network_back``) at any moment, also in the
    instant between a stalled request's deadline passing and the request giving up: that once stopped
    the whole kit agent (an expiring deadline cannot be moved)."""
    async with upload_through_a_proxy(server, tmp_path, stall_timeout=1.2) as up:
        outbox, uploader, item_id = up.outbox, up.uploader, up.item_id

        async def telling_on_every_turn_of_the_loop() -> None:
            while uploader.status()["state"] != "waiting":
                uploader.network_back()
                await asyncio.sleep(0)  # the next turn of the event loop: no moment of the expiry is missed

        await up.changes.until(lambda: _sent(outbox, item_id) >= MIN_CHUNK)
        up.proxy.cut()
        await asyncio.wait_for(telling_on_every_turn_of_the_loop(), 30)  # raised here before
        up.proxy.restore()
        uploader.network_back()
        await up.changes.until(lambda: _state(outbox, item_id) == DELIVERED, 30)
    [stored] = await stored_images(server.url, up.room, server.token(up.room, "Dr A", "clinician"))
    assert stored["data"] == up.image


async def test_a_refusal_is_final_shown_and_the_next_photo_goes(server: RunningServer, tmp_path: Path) -> None:
    room, elsewhere = server.consultation(), server.consultation()
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    outbox = Outbox.open(tmp_path / "outbox")
    bad_site = outbox.add(photo_bytes("a"), _with(photo_metadata(room, "a"), body_site="elbow"))
    not_assigned = outbox.add(photo_bytes("b"), photo_metadata(elsewhere, "b"))
    fine = outbox.add(photo_bytes("c"), photo_metadata(room, "c"))
    uploader, _ = uploader_for(outbox, server.url, kit, ceiling_kbps=100_000)

    await asyncio.wait_for(uploader.run_until_empty(), 30)

    shown = {i["id"]: i for i in (item.public() for item in outbox.items())}
    assert (shown[bad_site.id]["state"], shown[bad_site.id]["error"]) == (REFUSED, "metadata_invalid")
    assert "body_site" in str(shown[bad_site.id]["message"])
    assert (shown[not_assigned.id]["state"], shown[not_assigned.id]["error"]) == (REFUSED, "kit_not_assigned")
    assert shown[fine.id]["state"] == DELIVERED
    assert outbox.path_of(bad_site).exists()  # refused photos are kept on the kit
    # Nothing is tried again: another round finds nothing to do.
    await asyncio.wait_for(uploader.run_until_empty(), 5)
    assert [i.id for i in outbox.pending()] == []
    stored = await stored_images(server.url, room, server.token(room, "Dr A", "clinician"))
    assert [s["id"] for s in stored] == [shown[fine.id]["image_ref"]]


async def test_a_revoked_kit_stops_uploading_and_keeps_its_photos(server: RunningServer, tmp_path: Path) -> None:
    room = server.consultation()
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    await admin(server.url, server.admin_key, "POST", f"/api/devices/{kit.credential.device_id}/revoke")
    outbox = Outbox.open(tmp_path / "outbox")
    item = outbox.add(photo_bytes("a"), photo_metadata(room, "a"))
    uploader, _ = uploader_for(outbox, server.url, kit)
    with pytest.raises(UploadsStopped, match="device_revoked"):
        await asyncio.wait_for(uploader.run_until_empty(), 30)
    assert _state(outbox, item.id) == QUEUED


async def test_the_upload_keeps_under_its_ceiling(server: RunningServer, tmp_path: Path) -> None:
    room = server.consultation()
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    outbox = Outbox.open(tmp_path / "outbox")
    image = photo_bytes("cap")
    outbox.add(image, photo_metadata(room, "cap"))
    ceiling_kbps = 800  # 100 kB/s: the 200 kB photo needs about two seconds
    uploader, changes = uploader_for(outbox, server.url, kit, ceiling_kbps=ceiling_kbps)
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        samples.append((time.monotonic(), uploader.sent))
        changes()

    uploader.on_change = sample
    started = time.monotonic()
    await asyncio.wait_for(uploader.run_until_empty(), 30)
    took = time.monotonic() - started

    rate_kbps = len(image) * 8 / 1000 / took
    print(f"{len(image)} bytes in {took:.2f} s: {rate_kbps:.0f} kbit/s under a ceiling of {ceiling_kbps}")
    assert 0.5 * ceiling_kbps < rate_kbps <= 1.05 * ceiling_kbps
    # No second of it went much over the ceiling either (a burst of a few kB is allowed).
    for at, sent in samples:
        before = [s for t, s in samples if at - t >= 1.0]
        if before:
            assert (sent - before[-1]) * 8 / 1000 <= ceiling_kbps * 1.25 + 64


async def test_a_running_kit_delivers_a_photo_taken_in_its_call_beside_the_call(
        server: RunningServer, tmp_path: Path) -> None:
    room = server.consultation("Hembesök")
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    await admin(server.url, server.admin_key, "POST", f"/api/consultations/{room}/call-kit")
    agent = KitAgent(kit_config(server.url, kit.credential_path))
    running = asyncio.ensure_future(agent.run())
    clinician = await KitWatcher.join(server.url, room, server.token(room, "Dr A", "clinician"),
                                      kit.credential.device_id)
    try:
        await agent.wait_for(lambda: agent.state is State.CONNECTED and agent.uploader is not None, 20)
        assert agent.outbox is not None and agent.uploader is not None
        image = photo_bytes("in-call")
        item = await asyncio.get_running_loop().run_in_executor(  # as the page's save does: off the loop
            None, agent.outbox.add, image, photo_metadata(room, "in-call"))
        outbox = agent.outbox
        await agent.wait_for(lambda: _state(outbox, item.id) == DELIVERED, 30)
        status = agent.uploader.status()
        assert status["in_call"] and status["delivered"] == 1
        assert agent.uploader.scavenger.base is not None and agent.uploader.scavenger.base < 0.2  # RTT seen
        shown = agent.status()["photos"]
        assert shown["uploader"]["delivered"] == 1
        await clinician.wait_for(lambda: clinician.hears_kit(), 10)  # the call went on
        # Judged thin, the uplink gets the call's transport feedback a quarter of a second apart, then back.
        call, on_thin = agent.call, agent.uploader.on_thin_uplink
        assert call is not None and call._pc is not None and on_thin is not None
        on_thin(True)
        assert dtls_transport(call._pc).nara_feedback_interval == THIN_FEEDBACK_INTERVAL
        on_thin(False)
        assert dtls_transport(call._pc).nara_feedback_interval is None
    finally:
        await clinician.close()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    [stored] = await stored_images(server.url, room, server.token(room, "Dr A", "clinician"))
    assert stored["data"] == image


def test_upload_sockets_are_marked_low_priority() -> None:
    address = socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)[0]
    with _low_priority_socket(65536)(address) as sock:
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == TOS_CS1


def _quick_backoff():  # type: ignore[no-untyped-def]
    from edge.reconnect import Backoff

    return Backoff(base=0.05, cap=0.2)


def _with(metadata, **changes):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(metadata, **changes)


def _sent(outbox: Outbox, image_id: str) -> int:
    item = outbox.get(image_id)
    assert item is not None
    return item.sent


def _state(outbox: Outbox, image_id: str) -> str:
    item = outbox.get(image_id)
    assert item is not None
    return item.state


async def test_the_kernel_paces_the_uploads_packets_at_its_rate(server: RunningServer, tmp_path: Path) -> None:
    room = server.consultation()
    kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
    outbox = Outbox.open(tmp_path / "outbox")
    outbox.add(photo_bytes("paced"), photo_metadata(room, "paced"))
    uploader, changes = uploader_for(outbox, server.url, kit, ceiling_kbps=800)
    paced: set[int] = set()

    def sample() -> None:
        for sock in list(uploader._sockets):
            with contextlib.suppress(OSError):
                paced.add(sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE))
        changes()

    uploader.on_change = sample
    await asyncio.wait_for(uploader.run_until_empty(), 30)
    # 800 kbit/s of photo is 100 kB/s, and its packets' headers on top: on the wire, not only into the socket.
    assert paced == {int(100_000 * WIRE_OVERHEAD)}


async def test_while_a_dropped_call_is_rebuilt_the_upload_still_yields_to_it(tmp_path: Path) -> None:
    from edge.device_api import Assignment
    from edge.pacing import RttSample
    from edge.reconnect import Failure

    agent = KitAgent(kit_config("http://127.0.0.1:9", tmp_path / "credential.json"))
    agent.assignment = Assignment("room", "Hembesök", "token", 0.0, "kit-1", "Kit 7")
    agent.machine.assigned(0.0)
    agent._last_rtt = RttSample(0.120, 1.0)  # the round trip the call had when it dropped
    agent.machine.failed(2.0, Failure.HEARTBEAT)
    assert agent.machine.state is State.RECONNECTING
    signal = agent.call_signal()
    assert signal.in_call and signal.rtt == RttSample(0.120, 1.0)  # soon old: the upload's rate holds
    agent.assignment = None
    agent.machine.idle(3.0)
    assert not agent.call_signal().in_call


async def test_a_given_up_connection_is_reset_so_nothing_it_held_is_sent_after_the_outage(tmp_path: Path) -> None:
    """A stalled PATCH's connection still held tens of kB unsent; closed gracefully, the kernel sent them
    once the link was back, beside the new connection and in front of the call's audio."""
    from edge.device_api import DeviceCredential

    uploader = Uploader(Outbox.open(tmp_path / "outbox"), "http://127.0.0.1:9",
                        DeviceCredential("http://127.0.0.1:9", "kit", "secret", "Kit"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = socket.getaddrinfo("127.0.0.1", listener.getsockname()[1], type=socket.SOCK_STREAM)[0]
        sock = _low_priority_socket(65536, uploader._opened)(address)
        sock.connect(address[4])
        server_side, _ = listener.accept()
        with server_side:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # the far end reads nothing: the connection fills up with unsent bytes
                    sock.send(b"x" * 65536)
            uploader._abort_connections()
            sock.close()
            server_side.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while server_side.recv(65536):  # a graceful close would hand over every byte, then the end
                    pass
