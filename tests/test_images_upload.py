"""Image uploads over tus on a real server: chunks, resume, checksums, idempotency, refusals, restarts."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import aiohttp
import cv2
import numpy as np

from signalling.images import IMAGES, upload_metadata
from signalling.imagestore import Person

from .conftest import RunningServer, start_server
from .image_helpers import TUS, TusClient, chunk_checksum, get, metadata, photo, sha256_hex

CHUNK = 256 * 1024


async def test_options_say_what_the_server_speaks(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.options(f"{server.url}/api/uploads") as r:
            assert r.status == 204
            assert r.headers["Tus-Resumable"] == "1.0.0"
            assert r.headers["Tus-Version"] == "1.0.0"
            assert set(r.headers["Tus-Extension"].split(",")) == {"creation", "checksum"}
            assert set(r.headers["Tus-Checksum-Algorithm"].split(",")) == {"sha256", "sha1"}
            assert int(r.headers["Tus-Max-Size"]) == 30 * 1024 * 1024
        room = server.consultation()
        data = photo()
        tus = TusClient(http, server.url, server.token(room, role="nurse"))
        headers = {"Authorization": f"Bearer {tus.token}", "Upload-Length": str(len(data))}
        async with http.post(f"{server.url}/api/uploads", headers=headers) as r:
            assert r.status == 412
            assert (await r.json())["error"]["code"] == "tus_version"
            assert r.headers["Tus-Version"] == "1.0.0"


async def test_a_photo_arrives_whole_in_chunks_and_resumes_after_head(server: RunningServer) -> None:
    room = server.consultation()
    data = photo()
    assert len(data) > 2 * CHUNK + CHUNK // 2
    meta = metadata(room, data, note="Rodnad, 2 cm", mm_per_pixel="0.12",
                    quality='{"sharpness": 412.0, "dark": 0.01, "bright": 0.0}', filename="IMG_0001.jpg")
    clinician = server.token(room, "Dr Berg", "clinician")
    async with aiohttp.ClientSession() as http:
        kit = TusClient(http, server.url, server.token(room, "Kit 7", "kit"))
        created = await kit.create(meta, len(data))
        assert created.status == 201 and created.offset == 0
        location = created.headers["Location"]
        assert location.startswith("/api/uploads/")
        for offset in (0, CHUNK):
            sent = await kit.patch(location, offset, data[offset : offset + CHUNK])
            assert sent.status == 204 and sent.offset == offset + CHUNK
            assert sent.headers["Tus-Resumable"] == "1.0.0"
        listing = await get(http, f"{server.url}/api/consultations/{room}/images", clinician)
        assert listing.body == {"images": []}, "nothing partial shows"

        # The link went away; a new session asks where it got to and goes on from there.
        head = await kit.head(location)
        assert head.status == 200 and head.offset == 2 * CHUNK
        assert int(head.headers["Upload-Length"]) == len(data)
        assert head.headers["Cache-Control"] == "no-store"
        offset = head.offset
        while offset < len(data):
            sent = await kit.patch(location, offset, data[offset : offset + CHUNK])
            assert sent.status == 204
            offset = sent.offset
        image_id = sent.headers["Nara-Image-Id"]

        listing = await get(http, f"{server.url}/api/consultations/{room}/images", clinician)
        [image] = listing.body["images"]
        assert image["id"] == image_id
        assert image["capture_id"] == meta["image_id"]
        assert (image["body_site"], image["body_site_label"]) == ("heel_left", {"sv": "Vänster häl", "en": "Left heel"})
        assert (image["width"], image["height"], image["bytes"]) == (1600, 1200, len(data))
        assert image["sha256"] == sha256_hex(data)
        assert image["uploaded_by"]["role"] == "kit" and image["uploaded_by"]["name"] == "Kit 7"
        assert image["note"] == "Rodnad, 2 cm" and image["mm_per_pixel"] == 0.12
        assert image["quality"] == {"sharpness": 412.0, "dark": 0.01, "bright": 0.0}
        assert image["consent"] == "yes" and image["content_type"] == "image/jpeg"

        full = await get(http, f"{server.url}{image['url']}", clinician)
        assert full.status == 200 and full.headers["Content-Type"] == "image/jpeg"
        assert full.body == data
        thumb = await get(http, f"{server.url}{image['thumbnail_url']}", clinician)
        assert thumb.headers["Content-Type"] == "image/jpeg"
        picture = cv2.imdecode(np.frombuffer(thumb.body, np.uint8), cv2.IMREAD_COLOR)
        assert picture.shape[:2] == (240, 320)
    stored = server.app[IMAGES].store.image_path(sha256_hex(data))
    assert stored == server.config.data_dir / "images" / sha256_hex(data)[:2] / sha256_hex(data)
    assert stored.read_bytes() == data
    assert list((server.config.data_dir / "uploads").iterdir()) == [], "the partial file is gone"


async def test_a_damaged_chunk_is_refused_and_its_resend_succeeds(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(800, 600)
    part = len(data) // 3
    async with aiohttp.ClientSession() as http:
        tus = TusClient(http, server.url, server.token(room, role="nurse"))
        location = (await tus.create(metadata(room, data), len(data))).headers["Location"]
        damaged = bytearray(data[:part])
        damaged[1000] ^= 0xFF
        refused = await tus.patch(location, 0, bytes(damaged), checksum=chunk_checksum(data[:part]))
        assert (refused.status, refused.code) == (460, "checksum_mismatch")
        assert (await tus.head(location)).offset == 0, "nothing of the damaged chunk counts"
        bad = await tus.patch(location, 0, data[:part], checksum="md5 AAAA")
        assert (bad.status, bad.code) == (400, "checksum_invalid")
        again = await tus.patch(location, 0, data[:part], checksum=chunk_checksum(data[:part], "sha1"))
        assert again.status == 204 and again.offset == part
        rest = await tus.patch(location, part, data[part:])
        assert rest.status == 204 and "Nara-Image-Id" in rest.headers
        stale = await tus.patch(location, 0, data[:part])
        assert (stale.status, stale.code, stale.offset) == (409, "offset_mismatch", len(data))


async def test_a_retried_creation_finds_the_same_upload_and_a_finished_image_is_not_stored_twice(
    server: RunningServer,
) -> None:
    room = server.consultation()
    data = photo(900, 700)
    part = len(data) // 3
    meta = metadata(room, data)
    clinician = server.token(room)
    async with aiohttp.ClientSession() as http:
        tus = TusClient(http, server.url, server.token(room, role="kit"))
        first = await tus.create(meta, len(data))
        await tus.patch(first.headers["Location"], 0, data[:part])
        retried = await tus.create(meta, len(data))
        assert retried.status == 201
        assert retried.headers["Location"] == first.headers["Location"]
        assert retried.offset == part
        finished = await tus.patch(first.headers["Location"], part, data[part:])
        image_id = finished.headers["Nara-Image-Id"]

        # The answer was lost; after a power cut the kit sends the whole capture again.
        again = await tus.create(meta, len(data))
        assert again.status == 201 and again.headers["Location"] == first.headers["Location"]
        assert again.offset == len(data) and again.headers["Nara-Image-Id"] == image_id
        last = await tus.patch(first.headers["Location"], len(data) - part // 2, data[-part // 2 :])
        assert last.status == 409 and last.offset == len(data)
        assert (await tus.patch(first.headers["Location"], len(data), b"")).status == 204

        other = photo(900, 700, seed=2)
        conflict = await tus.create({**meta, "sha256": sha256_hex(other)}, len(other))
        assert (conflict.status, conflict.code) == (409, "image_id_conflict")
        listing = await get(http, f"{server.url}/api/consultations/{room}/images", clinician)
        assert [i["id"] for i in listing.body["images"]] == [image_id]


async def test_uploads_that_may_not_be_made_are_refused_clearly(server: RunningServer) -> None:
    room, elsewhere = server.consultation(), server.consultation("Annan")
    data = photo(640, 480)
    big = 30 * 1024 * 1024 + 1
    async with aiohttp.ClientSession() as http:
        def client(token: str | None) -> TusClient:
            return TusClient(http, server.url, token)

        nurse = client(server.token(room, role="nurse"))
        cases = [
            (client(None), metadata(room, data), len(data), 401, "token_missing"),
            (client("not-a-jwt"), metadata(room, data), len(data), 401, "token_malformed"),
            (client(server.token(elsewhere, role="nurse")), metadata(room, data), len(data), 403,
             "wrong_consultation"),
            (client(server.token(room, role="relative")), metadata(room, data), len(data), 403,
             "upload_not_allowed"),
            (client(server.token(room, role="patient")), metadata(room, data), len(data), 403,
             "upload_not_allowed"),
            (client(server.token("nosuchroom", role="nurse")), metadata("nosuchroom", data), len(data), 404,
             "room_not_found"),
            (nurse, metadata(room, data), big, 413, "too_large"),
            (nurse, metadata(room, data, content_type="text/plain"), len(data), 415, "not_an_image"),
            (nurse, metadata(room, data, body_site="elbow"), len(data), 400, "metadata_invalid"),
            (nurse, metadata(room, data, captured_at="yesterday"), len(data), 400, "metadata_invalid"),
            (nurse, metadata(room, data, image_id="1"), len(data), 400, "metadata_invalid"),
            (nurse, metadata(room, data, consent="maybe"), len(data), 400, "metadata_invalid"),
        ]
        for tus, meta, length, status, code in cases:
            reply = await tus.create(meta, length)
            assert (reply.status, reply.code) == (status, code), (meta, reply)
            assert reply.headers["Tus-Resumable"] == "1.0.0"
            assert "Location" not in reply.headers
        zero = await nurse.create(metadata(room, data), 0)
        assert (zero.status, zero.code) == (400, "upload_length_invalid")
        async with http.post(f"{server.url}/api/uploads", headers=nurse.headers(**{
                "Upload-Length": "10", "Upload-Metadata": "consultation !!!"})) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "metadata_invalid"

        # Someone else's upload does not exist as far as they can tell.
        location = (await nurse.create(metadata(room, data), len(data))).headers["Location"]
        stranger = client(server.token(elsewhere, role="nurse"))
        assert (await stranger.head(location)).status == 404  # HEAD answers have no body: the status says it
        assert (await stranger.patch(location, 0, data[:100])).code == "upload_not_found"
        assert (await client(None).head(location)).status == 401
        relative = client(server.token(room, role="relative"))
        assert (await relative.patch(location, 0, data[:100])).code == "upload_not_allowed"
        too_long = await nurse.patch(location, 0, data + b"x")
        assert (too_long.status, too_long.code) == (413, "too_large")
        async with http.patch(f"{server.url}{location}", data=data[:10], headers=nurse.headers(**{
                "Upload-Offset": "0", "Content-Type": "application/octet-stream"})) as r:
            assert r.status == 415 and (await r.json())["error"]["code"] == "content_type_invalid"
        assert (await nurse.head(location)).offset == 0


async def test_bytes_that_are_not_an_image_are_discarded(server: RunningServer) -> None:
    room = server.consultation()
    clinician = server.token(room)
    fake = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 200  # a JPEG's first bytes, then nothing of one
    png = photo(320, 240, kind=".png")
    async with aiohttp.ClientSession() as http:
        tus = TusClient(http, server.url, server.token(room, role="kit"))
        for data, content_type in ((fake, "image/jpeg"), (png, "image/jpeg")):
            meta = metadata(room, data, content_type=content_type)
            refused = await tus.upload(data, meta)
            assert (refused.status, refused.code) == (415, "not_an_image"), refused
            location = (await tus.create(meta, len(data)))
            assert (location.status, location.code) == (415, "not_an_image"), "the capture stays refused"
        as_png = await tus.upload(png, metadata(room, png, content_type="image/png"))
        assert as_png.status == 204, "the same PNG named as a PNG is fine"
        listing = await get(http, f"{server.url}/api/consultations/{room}/images", clinician)
        assert [i["content_type"] for i in listing.body["images"]] == ["image/png"]


async def test_a_whole_image_that_does_not_match_its_sha256_starts_again(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(800, 600)
    async with aiohttp.ClientSession() as http:
        tus = TusClient(http, server.url, server.token(room, role="kit"))
        meta = metadata(room, data, sha256=sha256_hex(b"something else"))
        reply = await tus.upload(data, meta)
        assert (reply.status, reply.code, reply.offset) == (460, "image_checksum_mismatch", 0)
        location = (await tus.create(meta, len(data))).headers["Location"]
        assert (await tus.head(location)).offset == 0


async def test_a_restarted_server_resumes_from_the_last_acknowledged_byte(tmp_path: Path) -> None:
    data = photo(1600, 1200, seed=5)
    first, runner = await start_server(tmp_path)
    room = first.consultation()
    token = first.token(room, role="kit")
    meta = metadata(room, data)
    async with aiohttp.ClientSession() as http:
        tus = TusClient(http, first.url, token)
        location = (await tus.create(meta, len(data))).headers["Location"]
        for offset in (0, CHUNK):
            assert (await tus.patch(location, offset, data[offset : offset + CHUNK])).status == 204
    partial = first.config.data_dir / "uploads" / f"{location.rsplit('/', 1)[1]}.part"
    await runner.cleanup()
    with partial.open("ab") as f:  # a chunk written but never acknowledged when the power went
        f.write(b"\x00" * 5000)

    second, runner = await start_server(tmp_path)
    try:
        assert partial.stat().st_size == 2 * CHUNK, "cut back to the recorded offset at start-up"
        async with aiohttp.ClientSession() as http:
            tus = TusClient(http, second.url, token)
            head = await tus.head(location)
            assert head.offset == 2 * CHUNK
            reply = await tus.upload(data, meta)  # a kit that lost its own record: creation finds the upload
            assert reply.status == 204
            image = await get(http, f"{second.url}/api/images/{reply.headers['Nara-Image-Id']}"
                              f"?consultation={room}", second.token(room))
            assert hashlib.sha256(image.body).hexdigest() == meta["sha256"]
    finally:
        await runner.cleanup()


async def test_a_crash_after_the_last_byte_completes_the_image_at_start_up(tmp_path: Path) -> None:
    data = photo(640, 480, seed=6)
    first, runner = await start_server(tmp_path)
    room = first.consultation()
    meta = metadata(room, data)
    store = first.app[IMAGES].store
    consultation = first.hub.store.get(room)
    assert consultation is not None
    upload, _ = store.create_upload(upload_metadata(meta, consultation), len(data), Person("kit-7", "Kit 7", "kit"))
    store.partial_path(upload.id).write_bytes(data)
    store.record_offset(upload.id, len(data))  # every byte fsynced and recorded; then the power went
    orphan = store.partial_path("nosuchupload")  # an earlier crash's leftovers: no upload needs them
    orphan.write_bytes(b"x")
    half_written = store.images_dir / "ab" / ".abcd.tmp"
    half_written.parent.mkdir()
    half_written.write_bytes(b"x")
    await runner.cleanup()
    second, runner = await start_server(tmp_path)
    try:
        assert not orphan.exists() and not half_written.exists()
        assert not store.partial_path(upload.id).exists(), "completed at start-up"
        async with aiohttp.ClientSession() as http:
            listing = await get(http, f"{second.url}/api/consultations/{room}/images", second.token(room))
            [image] = listing.body["images"]
            assert image["sha256"] == sha256_hex(data)
            again = await TusClient(http, second.url, second.token(room, role="kit")).create(meta, len(data))
            assert again.offset == len(data) and again.headers["Nara-Image-Id"] == image["id"]
    finally:
        await runner.cleanup()


async def test_concurrent_patches_to_one_upload_take_turns(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(1600, 1200, seed=7)
    async with aiohttp.ClientSession() as http:
        tus = TusClient(http, server.url, server.token(room, role="kit"))
        location = (await tus.create(metadata(room, data), len(data))).headers["Location"]
        replies = await asyncio.gather(*(tus.patch(location, 0, data[: 2 * CHUNK]) for _ in range(3)))
        assert sorted(r.status for r in replies) == [204, 409, 409]
        assert {r.offset for r in replies} == {2 * CHUNK}
        last = await tus.patch(location, 2 * CHUNK, data[2 * CHUNK :])
        assert last.status == 204 and "Nara-Image-Id" in last.headers


async def test_unfinished_uploads_are_removed_after_seven_days(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(640, 480)
    async with aiohttp.ClientSession() as http:
        tus = TusClient(http, server.url, server.token(room, role="kit"))
        location = (await tus.create(metadata(room, data), len(data))).headers["Location"]
        assert (await tus.patch(location, 0, data[:10_000])).offset == 10_000
        store = server.app[IMAGES].store
        assert store.expire_uploads(now=time.time() + 6 * 24 * 3600) == 0
        assert store.expire_uploads(now=time.time() + 7 * 24 * 3600 + 60) == 1
        assert (await tus.head(location)).status == 404
        gone = await tus.patch(location, 10_000, data[10_000:])
        assert (gone.status, gone.code) == (404, "upload_not_found")
        assert list((server.config.data_dir / "uploads").iterdir()) == []
        fresh = await tus.create(metadata(room, data), len(data))
        assert fresh.status == 201 and fresh.offset == 0


async def test_a_kit_outside_a_call_gets_an_upload_token_with_its_credential(server: RunningServer) -> None:
    room, other = server.consultation(), server.consultation("Annan")
    kits = server.hub.devices
    assert kits is not None
    device, code = kits.store.create("Kit 7", time.time())
    _, secret = kits.store.enrol(code, time.time())
    url = f"{server.url}/api/devices/{device.id}/upload-token"
    data = photo(640, 480)
    async with aiohttp.ClientSession() as http:
        async def ask(credential: str, consultation: str) -> tuple[int, dict[str, object]]:
            async with http.post(url, json={"consultation": consultation},
                                 headers={"Authorization": credential, **TUS}) as r:
                return r.status, await r.json()

        assert await ask(f"Device {secret}", room) == (403, {"error": {
            "code": "kit_not_assigned", "message": "This home kit was never assigned to that consultation."}})
        kits.store.assign(room, device.id, time.time())
        status, body = await ask(f"Device {secret}", room)
        assert status == 200 and body["expires_at"] - time.time() <= 15 * 60
        assert (await ask(f"Bearer {secret}", room))[0] == 200
        assert (await ask(f"Device {secret}", other))[1]["error"]["code"] == "kit_not_assigned"  # type: ignore[index]
        assert (await ask("Device wrong", room))[1]["error"]["code"] == "device_credential_invalid"  # type: ignore[index]
        assert (await ask("", room))[0] == 401

        reply = await TusClient(http, server.url, str(body["token"])).upload(data, metadata(room, data))
        assert reply.status == 204
        # The assignment ends; a photo still in the kit's outbox must arrive all the same.
        kits.store.unassign(room)
        status, later = await ask(f"Device {secret}", room)
        assert status == 200, later
        second = photo(320, 240)
        late = await TusClient(http, server.url, str(later["token"])).upload(second, metadata(room, second))
        assert late.status == 204
        kits.store.revoke(device.id, time.time())
        assert (await ask(f"Device {secret}", room))[1]["error"]["code"] == "device_revoked"  # type: ignore[index]
        refused = await TusClient(http, server.url, str(body["token"])).create(metadata(room, data), len(data))
        assert (refused.status, refused.code) == (403, "device_revoked")


async def raw_patch(server: RunningServer, location: str, token: str, offset: int, declared: int, body: bytes,
                    checksum: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A PATCH that promises ``declared`` bytes and sends only ``body``, on a connection the test controls."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
    lines = [f"PATCH {location} HTTP/1.1", "Host: 127.0.0.1", "Tus-Resumable: 1.0.0", f"Authorization: Bearer {token}",
             "Content-Type: application/offset+octet-stream", f"Upload-Offset: {offset}", f"Content-Length: {declared}"]
    if checksum is not None:
        lines.append(f"Upload-Checksum: {checksum}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    return reader, writer


async def test_a_chunk_cut_off_midway_counts_whole_or_not_at_all(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(1600, 1200, seed=8)
    token = server.token(room, role="kit")
    tus = server.app[IMAGES].tus
    async with aiohttp.ClientSession() as http:
        client = TusClient(http, server.url, token)
        location = (await client.create(metadata(room, data), len(data))).headers["Location"]
        upload_id = location.rsplit("/", 1)[1]

        # With a checksum: the link dies after 100 kB of a 256 kB chunk; nothing of it counts.
        _, writer = await raw_patch(server, location, token, 0, CHUNK, data[:100_000], chunk_checksum(data[:CHUNK]))
        await tus.locks.until_held(upload_id)
        writer.close()
        after = await client.patch(location, 0, data[:CHUNK])  # waits for the cut one to be dealt with
        assert after.status == 204 and after.offset == CHUNK

        # Without a checksum: what the server took in before the break counts, as tus core says.
        _, writer = await raw_patch(server, location, token, CHUNK, CHUNK, data[CHUNK : CHUNK + 100_000], None)
        await tus.locks.until_held(upload_id)
        writer.close()
        probe = await client.patch(location, CHUNK, b"", checksum=None)  # an empty PATCH: where are we now?
        offset = probe.offset
        assert probe.status in (204, 409) and CHUNK <= offset <= CHUNK + 100_000
        while offset < len(data):
            reply = await client.patch(location, offset, data[offset : offset + CHUNK])
            offset = reply.offset
        image = await get(http, f"{server.url}/api/images/{reply.headers['Nara-Image-Id']}?consultation={room}",
                          server.token(room))
        assert image.body == data


async def test_a_retry_waits_for_a_stalled_chunk_and_then_goes_on(server: RunningServer) -> None:
    room = server.consultation()
    data = photo(800, 600, seed=9)
    token = server.token(room, role="kit")
    tus = server.app[IMAGES].tus
    tus.read_idle_timeout = 0.5  # the server gives up on a silent body after this long
    async with aiohttp.ClientSession() as http:
        client = TusClient(http, server.url, token)
        location = (await client.create(metadata(room, data), len(data))).headers["Location"]
        part = len(data) // 2
        reader, writer = await raw_patch(server, location, token, 0, part, data[:1000], chunk_checksum(data[:part]))
        await tus.locks.until_held(upload_id=location.rsplit("/", 1)[1])
        retry = await client.patch(location, 0, data[:part])  # the link came back on a new connection
        assert retry.status == 204 and retry.offset == part
        status_line = await reader.readline()
        assert status_line.split()[1] == b"400", "the stalled one was told it broke off"
        assert b"upload_interrupted" in await reader.read(4096)
        writer.close()
        last = await client.patch(location, part, data[part:])
        assert last.status == 204 and "Nara-Image-Id" in last.headers


async def test_a_retry_after_an_outage_ends_the_silent_chunk_it_waits_for_within_seconds(server: RunningServer) -> None:
    """A kit back after an outage retries on a new connection; the old one has been silent since the outage
    began, and the server would take it as broken off only after 30 s: with a retry waiting, a silence of
    ``supersede_idle`` is enough."""
    room = server.consultation()
    data = photo(800, 600, seed=10)
    token = server.token(room, role="kit")
    tus = server.app[IMAGES].tus
    assert tus.read_idle_timeout == 30.0
    tus.supersede_idle = 0.5
    async with aiohttp.ClientSession() as http:
        client = TusClient(http, server.url, token)
        location = (await client.create(metadata(room, data), len(data))).headers["Location"]
        part = len(data) // 2
        reader, writer = await raw_patch(server, location, token, 0, part, data[:1000], chunk_checksum(data[:part]))
        await tus.locks.until_held(upload_id=location.rsplit("/", 1)[1])
        retry = await asyncio.wait_for(client.patch(location, 0, data[:part]), 10.0)  # not the 30 s
        assert retry.status == 204 and retry.offset == part
        assert b"upload_interrupted" in await reader.read(4096)
        writer.close()
