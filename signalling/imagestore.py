"""Wound and symptom images on disk and in SQLite: uploads under way, stored images, and the access log.

Files live in the server's data directory::

    uploads/<upload id>.part       bytes received so far (never longer than the recorded offset after start-up)
    images/ab/abcdef...            each image once, named by its SHA-256
    thumbnails/ab/abcdef....jpg    its thumbnail

The tables share the consultations' SQLite file (WAL, synchronous=FULL), so a
recorded offset or a stored image survives a power cut. An image's file is
written to a temporary name, fsynced, renamed and its directory fsynced before
the image's row is inserted; a crash in between leaves an upload whose bytes
are all there, which start-up completes (``ready_to_finish``).

The access log (``image_access``) only grows: SQLite triggers refuse UPDATE and
DELETE, so neither the API nor a bug can rewrite who saw what.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .store import new_id

UPLOAD_EXPIRY = 7 * 24 * 3600  # unfinished uploads are removed after this many seconds

SCHEMA = """
CREATE TABLE IF NOT EXISTS image_upload (
    id TEXT PRIMARY KEY,
    consultation_id TEXT NOT NULL,
    capture_id TEXT NOT NULL,             -- the device's image_id: the idempotency key
    length INTEGER NOT NULL,
    upload_offset INTEGER NOT NULL DEFAULT 0,  -- bytes fsynced in uploads/<id>.part
    metadata TEXT NOT NULL,               -- UploadMetadata as JSON
    uploader TEXT NOT NULL,               -- {"id", "name", "role"} as JSON
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'open',   -- open, complete, discarded
    image_id TEXT,                        -- the stored image, once complete
    UNIQUE (consultation_id, capture_id)
);

CREATE TABLE IF NOT EXISTS image (
    id TEXT PRIMARY KEY,
    consultation_id TEXT NOT NULL,
    capture_id TEXT NOT NULL,
    patient_ref TEXT NOT NULL,            -- '' when there is none: no comparison then
    body_site TEXT NOT NULL,
    note TEXT NOT NULL,
    consent TEXT NOT NULL,
    captured_at TEXT NOT NULL,            -- ISO 8601 with offset, as the device said
    captured_ts REAL NOT NULL,            -- the same moment in Unix seconds, for ordering
    received_at REAL NOT NULL,
    device TEXT NOT NULL,
    uploader TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    content_type TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    mm_per_pixel REAL,
    quality TEXT,                         -- JSON object, or NULL
    filename TEXT NOT NULL,
    UNIQUE (consultation_id, capture_id)
);
CREATE INDEX IF NOT EXISTS image_by_consultation ON image (consultation_id, captured_ts);
CREATE INDEX IF NOT EXISTS image_by_patient_site ON image (patient_ref, body_site, captured_ts);

CREATE TABLE IF NOT EXISTS image_access (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor_id TEXT,
    actor_name TEXT,
    actor_role TEXT,
    action TEXT NOT NULL,
    image_id TEXT,
    patient_ref TEXT,
    consultation_id TEXT,
    outcome TEXT NOT NULL,                -- allowed or refused
    code TEXT,                            -- the refusal's code
    remote TEXT,
    user_agent TEXT
);
CREATE INDEX IF NOT EXISTS image_access_by_time ON image_access (at);
CREATE TRIGGER IF NOT EXISTS image_access_no_update BEFORE UPDATE ON image_access
BEGIN SELECT RAISE(ABORT, 'the image access log cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS image_access_no_delete BEFORE DELETE ON image_access
BEGIN SELECT RAISE(ABORT, 'the image access log cannot be changed'); END;
"""


@dataclass(frozen=True)
class UploadMetadata:
    """An upload's validated ``Upload-Metadata`` (docs/images.md, "Creation")."""

    consultation: str
    image_id: str
    sha256: str
    content_type: str
    body_site: str
    captured_at: str
    consent: str
    device: str = ""
    patient_ref: str = ""
    note: str = ""
    mm_per_pixel: float | None = None
    quality: dict[str, Any] | None = None
    filename: str = ""


@dataclass(frozen=True)
class Person:
    """Who did something: a participant of a consultation, or IT staff with the admin key."""

    id: str
    name: str
    role: str

    def public(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "role": self.role}


@dataclass(frozen=True)
class Upload:
    id: str
    consultation_id: str
    length: int
    offset: int
    metadata: UploadMetadata
    uploader: Person
    created_at: float
    state: str
    image_id: str | None

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def discarded(self) -> bool:
        return self.state == "discarded"


@dataclass(frozen=True)
class StoredImage:
    id: str
    consultation_id: str
    capture_id: str
    patient_ref: str
    body_site: str
    note: str
    consent: str
    captured_at: str
    captured_ts: float
    received_at: float
    device: str
    uploader: Person
    sha256: str
    sha1: str
    content_type: str
    bytes: int
    width: int
    height: int
    mm_per_pixel: float | None
    quality: dict[str, Any] | None
    filename: str


@dataclass(frozen=True)
class AccessEntry:
    """One row of the access log, before it is written."""

    action: str  # list, history, view, thumbnail, fhir, upload, audit
    outcome: str  # allowed or refused
    actor: Person | None = None
    code: str | None = None
    image_id: str | None = None
    patient_ref: str | None = None
    consultation_id: str | None = None
    remote: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True)
class AccessRecord:
    id: int
    at: float
    actor_id: str | None
    actor_name: str | None
    actor_role: str | None
    action: str
    image_id: str | None
    patient_ref: str | None
    consultation_id: str | None
    outcome: str
    code: str | None
    remote: str | None
    user_agent: str | None

    def public(self) -> dict[str, Any]:
        return {"time": iso_utc(self.at), **asdict(self)}


ACCESS_COLUMNS = (
    "id, at, actor_id, actor_name, actor_role, action, image_id, patient_ref, consultation_id, outcome, code, "
    "remote, user_agent"
)
UPLOAD_COLUMNS = "id, consultation_id, length, upload_offset, metadata, uploader, created_at, state, image_id"
IMAGE_COLUMNS = (
    "id, consultation_id, capture_id, patient_ref, body_site, note, consent, captured_at, captured_ts, "
    "received_at, device, uploader, sha256, sha1, content_type, bytes, width, height, mm_per_pixel, quality, "
    "filename"
)


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _person(raw: str) -> Person:
    data = json.loads(raw)
    return Person(data["id"], data["name"], data["role"])


def _upload(row: tuple[Any, ...]) -> Upload:
    upload_id, consultation_id, length, offset, metadata, uploader, created_at, state, image_id = row
    return Upload(upload_id, consultation_id, length, offset, UploadMetadata(**json.loads(metadata)),
                  _person(uploader), created_at, state, image_id)


def _image(row: tuple[Any, ...]) -> StoredImage:
    values = list(row)
    values[11] = _person(values[11])
    values[19] = json.loads(values[19]) if values[19] is not None else None
    return StoredImage(*values)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that after a crash it is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{new_id(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


class ImageStore:
    def __init__(self, db: sqlite3.Connection, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self.clock = clock
        self.uploads_dir = data_dir / "uploads"
        self.images_dir = data_dir / "images"
        self.thumbnails_dir = data_dir / "thumbnails"
        for directory in (self.uploads_dir, self.images_dir, self.thumbnails_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db.executescript(SCHEMA)

    # --- uploads under way --------------------------------------------------------------

    def partial_path(self, upload_id: str) -> Path:
        return self.uploads_dir / f"{upload_id}.part"

    def create_upload(self, metadata: UploadMetadata, length: int, uploader: Person) -> tuple[Upload, bool]:
        """The upload of this capture, made now or found from an earlier request: (upload, made now)."""
        now = self.clock()
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO image_upload (id, consultation_id, capture_id, length, metadata, uploader, "
            "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (new_id(24), metadata.consultation, metadata.image_id, length, json.dumps(asdict(metadata)),
             json.dumps(uploader.public()), now, now),
        )
        upload = self.upload_of(metadata.consultation, metadata.image_id)
        assert upload is not None
        if cursor.rowcount == 1:
            self.partial_path(upload.id).touch(mode=0o600)
            fsync_directory(self.uploads_dir)  # so the file's first fsynced chunk cannot lose its name
        return upload, cursor.rowcount == 1

    def upload(self, upload_id: str) -> Upload | None:
        row = self._db.execute(f"SELECT {UPLOAD_COLUMNS} FROM image_upload WHERE id = ?", (upload_id,)).fetchone()
        return _upload(row) if row else None

    def upload_of(self, consultation_id: str, capture_id: str) -> Upload | None:
        row = self._db.execute(
            f"SELECT {UPLOAD_COLUMNS} FROM image_upload WHERE consultation_id = ? AND capture_id = ?",
            (consultation_id, capture_id),
        ).fetchone()
        return _upload(row) if row else None

    def record_offset(self, upload_id: str, offset: int) -> None:
        """The bytes up to ``offset`` are fsynced in the partial file: make them count."""
        self._db.execute(
            "UPDATE image_upload SET upload_offset = ?, updated_at = ? WHERE id = ? AND state = 'open'",
            (offset, self.clock(), upload_id),
        )

    def restart_upload(self, upload_id: str) -> None:
        """Start the upload again from byte 0 (the whole image did not match its checksum)."""
        self.record_offset(upload_id, 0)
        with open(self.partial_path(upload_id), "r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())

    def discard_upload(self, upload_id: str) -> None:
        """The bytes are not an image: keep the row (to answer 410) but not the bytes."""
        self._db.execute(
            "UPDATE image_upload SET state = 'discarded', updated_at = ? WHERE id = ?", (self.clock(), upload_id)
        )
        self.partial_path(upload_id).unlink(missing_ok=True)

    def expire_uploads(self, now: float | None = None) -> int:
        """Remove uploads unfinished (or discarded) for UPLOAD_EXPIRY seconds; how many."""
        cutoff = (self.clock() if now is None else now) - UPLOAD_EXPIRY
        rows = self._db.execute(
            "SELECT id FROM image_upload WHERE state != 'complete' AND updated_at < ?", (cutoff,)
        ).fetchall()
        for (upload_id,) in rows:
            self._db.execute("DELETE FROM image_upload WHERE id = ? AND state != 'complete'", (upload_id,))
            self.partial_path(upload_id).unlink(missing_ok=True)
        return len(rows)

    def recover(self) -> list[Upload]:
        """After a crash or restart: cut every partial file back to its recorded offset (bytes written
        but never recorded may be incomplete), remove files no upload needs any more (a crash between
        an image's row and the removal of its partial file, or in the middle of a durable write), and
        return the uploads whose bytes are all there but that were never completed."""
        ready = []
        rows = self._db.execute(f"SELECT {UPLOAD_COLUMNS} FROM image_upload WHERE state = 'open'").fetchall()
        open_uploads = [_upload(row) for row in rows]
        wanted = {self.partial_path(upload.id) for upload in open_uploads}
        for leftover in [*self.uploads_dir.glob("*.part"), *self.images_dir.glob("*/.*.tmp"),
                         *self.thumbnails_dir.glob("*/.*.tmp")]:
            if leftover not in wanted:
                leftover.unlink(missing_ok=True)
        for upload in open_uploads:
            path = self.partial_path(upload.id)
            size = path.stat().st_size if path.exists() else 0
            if size < upload.offset:  # cannot happen with fsync before record; start again rather than guess
                path.touch(mode=0o600)
                self.restart_upload(upload.id)
                continue
            if size > upload.offset:
                with open(path, "r+b") as f:
                    f.truncate(upload.offset)
                    os.fsync(f.fileno())
            if upload.offset == upload.length:
                ready.append(upload)
        return ready

    # --- stored images ---------------------------------------------------------------------

    def image_path(self, sha256: str) -> Path:
        return self.images_dir / sha256[:2] / sha256

    def thumbnail_path(self, sha256: str) -> Path:
        return self.thumbnails_dir / sha256[:2] / f"{sha256}.jpg"

    def store_files(self, sha256: str, data: bytes, thumbnail: bytes) -> None:
        """Keep the image and its thumbnail, content-addressed (blocking: run it in a thread)."""
        if not self.image_path(sha256).exists():
            write_durably(self.image_path(sha256), data)
        if not self.thumbnail_path(sha256).exists():
            write_durably(self.thumbnail_path(sha256), thumbnail)

    def complete_upload(self, upload: Upload, image: StoredImage) -> StoredImage:
        """Insert the image and mark its upload complete, in one transaction; then drop the partial file.

        Idempotent: an upload completed already answers the image stored then."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            current = self.upload(upload.id)
            if current is not None and current.complete and current.image_id is not None:
                self._db.execute("ROLLBACK")
                stored = self.image(current.image_id)
                assert stored is not None
                return stored
            self._db.execute(
                f"INSERT INTO image ({IMAGE_COLUMNS}) VALUES ({', '.join('?' * 21)})",
                (image.id, image.consultation_id, image.capture_id, image.patient_ref, image.body_site, image.note,
                 image.consent, image.captured_at, image.captured_ts, image.received_at, image.device,
                 json.dumps(image.uploader.public()), image.sha256, image.sha1, image.content_type, image.bytes,
                 image.width, image.height, image.mm_per_pixel,
                 json.dumps(image.quality) if image.quality is not None else None, image.filename),
            )
            self._db.execute(
                "UPDATE image_upload SET state = 'complete', image_id = ?, upload_offset = length, updated_at = ? "
                "WHERE id = ?",
                (image.id, self.clock(), upload.id),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self.partial_path(upload.id).unlink(missing_ok=True)
        return image

    def image(self, image_id: str) -> StoredImage | None:
        row = self._db.execute(f"SELECT {IMAGE_COLUMNS} FROM image WHERE id = ?", (image_id,)).fetchone()
        return _image(row) if row else None

    def images_of(self, consultation_id: str) -> list[StoredImage]:
        """A consultation's images, newest first."""
        rows = self._db.execute(
            f"SELECT {IMAGE_COLUMNS} FROM image WHERE consultation_id = ? ORDER BY captured_ts DESC, received_at DESC",
            (consultation_id,),
        ).fetchall()
        return [_image(row) for row in rows]

    def history(self, patient_ref: str, body_site: str) -> list[StoredImage]:
        """Every image of this body site for this patient reference, from every consultation, newest first."""
        if not patient_ref:
            return []
        rows = self._db.execute(
            f"SELECT {IMAGE_COLUMNS} FROM image WHERE patient_ref = ? AND body_site = ? "
            "ORDER BY captured_ts DESC, received_at DESC",
            (patient_ref, body_site),
        ).fetchall()
        return [_image(row) for row in rows]

    def totals(self) -> tuple[dict[str, int], int, int]:
        """For IT staff's metrics: uploads by state (open, complete, discarded), images stored and their bytes."""
        uploads = {state: count for state, count in self._db.execute(
            "SELECT state, count(*) FROM image_upload GROUP BY state")}
        images, size = self._db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM image").fetchone()
        return uploads, int(images), int(size)

    # --- access log -----------------------------------------------------------------------------

    def log_access(self, entry: AccessEntry) -> None:
        actor = entry.actor
        self._db.execute(
            "INSERT INTO image_access (at, actor_id, actor_name, actor_role, action, image_id, patient_ref, "
            "consultation_id, outcome, code, remote, user_agent) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (self.clock(), actor.id if actor else None, actor.name if actor else None, actor.role if actor else None,
             entry.action, entry.image_id, entry.patient_ref or None, entry.consultation_id, entry.outcome,
             entry.code, entry.remote, (entry.user_agent or "")[:300] or None),
        )

    def access_log(self, since: float | None = None, until: float | None = None) -> list[AccessRecord]:
        """The access log between ``since`` (inclusive) and ``until`` (exclusive), oldest first."""
        rows = self._db.execute(
            f"SELECT {ACCESS_COLUMNS} FROM image_access WHERE at >= ? AND at < ? ORDER BY id",
            (since if since is not None else float("-inf"), until if until is not None else float("inf")),
        ).fetchall()
        return [AccessRecord(*row) for row in rows]


CSV_COLUMNS = ("id", "time", "actor_id", "actor_name", "actor_role", "action", "image_id", "patient_ref",
               "consultation_id", "outcome", "code", "remote", "user_agent")


def _csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # A cell a spreadsheet would run as a formula (a user agent is the sender's to choose) is quoted as text.
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def access_log_csv(records: Iterable[AccessRecord]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        row = record.public()
        writer.writerow([_csv_cell(row[column]) for column in CSV_COLUMNS])
    return out.getvalue()


def access_log_json(records: Iterable[AccessRecord]) -> dict[str, Any]:
    return {"entries": [record.public() for record in records]}

