"""The kit's photo outbox: what was captured survives restarts and crashes, and damage is shown, never hidden."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from bench.process import PROJECT
from edge.outbox import DAMAGED, DELIVERED, QUEUED, REFUSED, UPLOADING, Outbox, OutboxError, PhotoMetadata
from tests.outbox_driver import photo_bytes, photo_metadata

DRIVER = [sys.executable, "-m", "tests.outbox_driver"]
ENV = {**os.environ, "PYTHONPATH": str(PROJECT)}


def image_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(("outbox.db", ".lock"))}


def test_an_added_photo_is_there_after_reopening_with_its_metadata(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    outbox = Outbox.open(folder)
    metadata = PhotoMetadata(
        consultation="c1", body_site="heel_left", consent=True,
        captured_at=datetime(2025, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=1))), device="Kit 7",
        patient_ref="p-17", note="Rodnad, ingen öppen sår", mm_per_pixel=0.08,
        quality={"sharpness": 412.0, "dark": 0.01}, filename="häl.jpg")
    image = photo_bytes("a")
    added = outbox.add(image, metadata)
    outbox.close()

    again = Outbox.open(folder)
    [item] = again.items()
    assert item == added
    assert (item.state, item.size, item.sent) == (QUEUED, len(image), 0)
    assert item.sha256 == hashlib.sha256(image).hexdigest()
    assert item.metadata == metadata
    assert again.path_of(item).read_bytes() == image
    assert [p.id for p in again.pending()] == [item.id]
    assert uuid.UUID(item.id).version == 4


def test_photos_wait_oldest_first_and_delivery_keeps_the_receipt_but_not_the_file(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    first, second, third = (outbox.add(photo_bytes(t), photo_metadata("c1", t)) for t in "abc")
    assert [i.id for i in outbox.pending()] == [first.id, second.id, third.id]
    outbox.record_location(first.id, "/api/uploads/u1", 0)
    outbox.record_offset(first.id, 16384)
    outbox.delivered(first.id, "img-1")
    outbox.refused(second.id, "patient_mismatch", "The consultation is for another patient.")
    assert [i.id for i in outbox.pending()] == [third.id]
    receipt, refused = outbox.get(first.id), outbox.get(second.id)
    assert receipt is not None and (receipt.state, receipt.image_ref, receipt.sent) == (DELIVERED, "img-1", first.size)
    assert not outbox.path_of(first).exists()
    assert refused is not None and (refused.state, refused.error) == (REFUSED, "patient_mismatch")
    assert outbox.path_of(second).read_bytes() == photo_bytes("b")  # kept: nothing captured is thrown away
    assert outbox.requeue(second.id) and [i.id for i in outbox.pending()] == [second.id, third.id]
    assert outbox.counts() == {QUEUED: 2, UPLOADING: 0, DELIVERED: 1, REFUSED: 0, DAMAGED: 0}


def test_the_upload_address_and_offset_survive_a_restart(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    item = outbox.add(photo_bytes("a"), photo_metadata("c1", "a"))
    outbox.record_location(item.id, "/api/uploads/u1", 0)
    outbox.record_offset(item.id, 32768)
    outbox.close()
    [again] = Outbox.open(tmp_path).pending()
    assert (again.state, again.location, again.sent) == (UPLOADING, "/api/uploads/u1", 32768)


def test_leftovers_of_an_interrupted_capture_or_delivery_are_removed_on_open(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    kept = outbox.add(photo_bytes("a"), photo_metadata("c1", "a"))
    delivered = outbox.add(photo_bytes("b"), photo_metadata("c1", "b"))
    outbox.delivered(delivered.id, "img-2")
    outbox.close()
    orphan = str(uuid.uuid4())  # renamed into place, then the power went before its row was written
    (tmp_path / orphan).write_bytes(photo_bytes("c"))
    (tmp_path / f".adding-{uuid.uuid4()}").write_bytes(b"\xff\xd8 half a photo")  # cut while writing
    (tmp_path / delivered.id).write_bytes(photo_bytes("b"))  # cut between the receipt and the deletion

    again = Outbox.open(tmp_path)
    assert image_files(tmp_path) == {kept.id}
    assert [i.id for i in again.pending()] == [kept.id]


def test_a_missing_or_changed_file_is_marked_damaged_and_logged(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox.open(tmp_path)
    lost, changed, fine = (outbox.add(photo_bytes(t), photo_metadata("c1", t)) for t in "abc")
    outbox.close()
    (tmp_path / lost.id).unlink()
    data = bytearray((tmp_path / changed.id).read_bytes())
    data[5000] ^= 0xFF
    (tmp_path / changed.id).write_bytes(bytes(data))
    changes: list[int] = []

    with caplog.at_level(logging.ERROR, logger="edge.outbox"):
        again = Outbox.open(tmp_path)
    again.on_change = lambda: changes.append(1)
    states = {i.id: (i.state, i.error) for i in again.items()}
    assert states == {lost.id: (DAMAGED, "file_missing"), changed.id: (DAMAGED, "checksum_mismatch"),
                      fine.id: (QUEUED, None)}
    assert [i.id for i in again.pending()] == [fine.id]
    assert lost.id in caplog.text and changed.id in caplog.text
    assert (tmp_path / changed.id).exists()  # kept for whoever looks into it
    public = {i.id: i.public() for i in again.items()}
    assert public[lost.id]["state"] == "damaged" and "missing" in str(public[lost.id]["message"])


def test_a_photo_must_say_when_where_and_for_which_consultation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="time zone"):
        PhotoMetadata("c1", "sacrum", True, datetime(2025, 1, 1, 12, 0), "Kit 7")
    with pytest.raises(ValueError, match="consultation"):
        PhotoMetadata("", "sacrum", True, datetime.now(UTC), "Kit 7")
    with pytest.raises(ValueError, match="content_type"):
        PhotoMetadata("c1", "sacrum", True, datetime.now(UTC), "Kit 7", content_type="image/gif")
    with pytest.raises(ValueError, match="no bytes"):
        Outbox.open(tmp_path).add(b"", photo_metadata("c1", "a"))


def test_an_outbox_that_cannot_be_created_says_where_and_why(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutboxError) as raised:
        Outbox.open(blocker / "outbox")
    assert raised.value.code == "outbox_unavailable" and str(blocker) in raised.value.message


def test_the_last_consultation_is_remembered(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    assert outbox.last_consultation() is None
    outbox.remember_consultation("c1")
    outbox.remember_consultation("c2")
    outbox.close()
    assert Outbox.open(tmp_path).last_consultation() == "c2"


def test_another_process_adds_while_this_one_adds_and_reopens(tmp_path: Path) -> None:
    outbox = Outbox.open(tmp_path)
    seen: list[int] = []
    outbox.on_change = lambda: seen.append(1)
    adder = subprocess.Popen([*DRIVER, "add", str(tmp_path), "--count", "25", "--tag", "other"], env=ENV)
    opener = subprocess.Popen([*DRIVER, "reopen", str(tmp_path), "--count", "60"], env=ENV)
    mine = [outbox.add(photo_bytes(f"mine-{n}"), photo_metadata("c1", f"mine-{n}")) for n in range(25)]
    assert adder.wait(timeout=60) == 0 and opener.wait(timeout=60) == 0

    assert outbox.refresh() and len(seen) > 25  # the other process's photos were noticed
    again = Outbox.open(tmp_path)  # verifies every file against its row
    items = again.items()
    assert len(items) == 50 and {i.state for i in items} == {QUEUED}
    assert {i.metadata.note for i in items} == {f"mine-{n}" for n in range(25)} | {f"other-{n}" for n in range(25)}
    assert {i.id for i in mine} <= {i.id for i in items}
    assert image_files(tmp_path) == {i.id for i in items}
    for item in items:
        assert again.path_of(item).read_bytes() == photo_bytes(item.metadata.note)


def nara_edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nara.cli", "edge", *args], capture_output=True, text=True,
                          timeout=60, env=ENV)


def test_nara_edge_photo_puts_a_checked_photo_in_the_outbox(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(f'server = "http://127.0.0.1:9"\ncredential = "credential.json"\ndata_dir = "{tmp_path}/d"\n')
    photo = tmp_path / "wound.jpg"
    photo.write_bytes(photo_bytes("cli"))
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    base = ["photo", "--config", str(config), "--body-site", "sacrum", "--consent", "yes"]

    nobody = nara_edge(*base, "--file", str(photo))
    assert nobody.returncode == 2 and "--consultation" in nobody.stdout  # no consultation known yet
    Outbox.open(tmp_path / "d" / "outbox").remember_consultation("c-last")  # as the agent does
    saved = nara_edge(*base, "--file", str(photo), "--note", "Rodnad")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    refused = nara_edge(*base, "--file", str(not_a_photo))
    assert refused.returncode == 2 and "does not decode" in refused.stdout
    elbow = nara_edge(*base[:-4], "--body-site", "elbow", "--consent", "yes", "--file", str(photo))
    assert elbow.returncode == 2 and "heel_left" in elbow.stdout
    elsewhere = nara_edge(*base, "--file", str(photo), "--consultation", "c-other")
    assert elsewhere.returncode == 0

    items = Outbox.open(tmp_path / "d" / "outbox").items()
    assert [(i.metadata.consultation, i.metadata.note) for i in items] == [("c-last", "Rodnad"), ("c-other", "")]
    assert all(i.metadata.body_site == "sacrum" and i.metadata.consent and i.size == len(photo_bytes("cli"))
               and i.metadata.filename == "wound.jpg" and i.metadata.content_type == "image/jpeg" for i in items)
    assert items[0].id in saved.stdout
