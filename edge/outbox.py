"""The kit's durable outbox: every photo it captured, until the server has it.

A folder in the kit's data directory holds ``outbox.db`` (SQLite in WAL mode,
``synchronous=FULL``) and one file per image, named by its ``image_id``.
Adding an image writes its bytes to a temporary file in the folder, fsyncs
it, renames it to its final name, fsyncs the folder, and only then inserts
its row (metadata, SHA-256, size, state ``queued``) in one transaction. An
image is captured — the kit's screen may say "Sparad" — only once ``add``
returns; a power cut before that leaves no row, and the next ``open`` removes
what is left of it.

On ``open``, temporary files and image files without a row are removed, as
are the files of images already delivered (a cut between the receipt and the
deletion). A row whose file is missing, or whose file's SHA-256 no longer
matches, is marked ``damaged``: logged and shown on the page, never dropped.

States: ``queued`` (waiting), ``uploading`` (the server knows of it: its tus
upload address is recorded, with the bytes it has acknowledged),
``delivered`` (the server stored it; the file is deleted, the row stays as the
receipt, with the server's image id), ``refused`` (the server refused it for
good, with the code; the file stays), ``damaged``.

Another process may add to the same outbox at the same time (``nara edge
photo``): SQLite's WAL takes care of the rows, and a shared lock on
``.lock`` held during each ``add`` keeps an opening process from removing
the file of an image another process is about to insert.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATABASE = "outbox.db"
LOCK = ".lock"
TEMPORARY_PREFIX = ".adding-"
CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")
MAX_NOTE = 2000
MAX_DEVICE = 128
_IMAGE_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_READ_SIZE = 1 << 20

QUEUED, UPLOADING, DELIVERED, REFUSED, DAMAGED = "queued", "uploading", "delivered", "refused", "damaged"
STATES = (QUEUED, UPLOADING, DELIVERED, REFUSED, DAMAGED)
PENDING_STATES = (QUEUED, UPLOADING)
_HAS_FILE = (QUEUED, UPLOADING, REFUSED)  # states whose image file must be there

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    added_at REAL NOT NULL,
    metadata TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,
    location TEXT,
    sent INTEGER NOT NULL DEFAULT 0,
    image_ref TEXT,
    error TEXT,
    message TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS facts (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class OutboxError(Exception):
    """An image could not be stored (the disk is full, the folder is not writable): nothing was captured."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PhotoMetadata:
    """What the server is told about a photo: the docs/images.md metadata keys."""

    consultation: str
    body_site: str
    consent: bool
    captured_at: datetime
    device: str
    patient_ref: str = ""
    note: str = ""
    mm_per_pixel: float | None = None
    quality: dict[str, Any] = field(default_factory=dict)  # the kit's checks: measures and flags (JSON)
    content_type: str = "image/jpeg"
    filename: str = ""

    def __post_init__(self) -> None:
        if not self.consultation:
            raise ValueError("consultation: a photo belongs to a consultation")
        if not self.body_site:
            raise ValueError("body_site: say where on the body the photo was taken")
        if self.captured_at.utcoffset() is None:
            raise ValueError("captured_at: the capture time needs its time zone")
        if self.content_type not in CONTENT_TYPES:
            raise ValueError(f"content_type: must be one of {', '.join(CONTENT_TYPES)}, not {self.content_type!r}")
        if len(self.note) > MAX_NOTE:
            raise ValueError(f"note: at most {MAX_NOTE} characters")
        if len(self.device) > MAX_DEVICE:
            raise ValueError(f"device: at most {MAX_DEVICE} characters")
        if self.mm_per_pixel is not None and not self.mm_per_pixel > 0:
            raise ValueError("mm_per_pixel: must be a positive number")

    def as_json(self) -> dict[str, Any]:
        return {
            "consultation": self.consultation, "body_site": self.body_site, "consent": self.consent,
            "captured_at": self.captured_at.isoformat(), "device": self.device, "patient_ref": self.patient_ref,
            "note": self.note, "mm_per_pixel": self.mm_per_pixel, "quality": dict(self.quality),
            "content_type": self.content_type, "filename": self.filename,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhotoMetadata:
        mm = data.get("mm_per_pixel")
        return cls(
            consultation=str(data["consultation"]), body_site=str(data["body_site"]), consent=bool(data["consent"]),
            captured_at=datetime.fromisoformat(str(data["captured_at"])), device=str(data.get("device", "")),
            patient_ref=str(data.get("patient_ref", "")), note=str(data.get("note", "")),
            mm_per_pixel=float(mm) if mm is not None else None,
            quality={str(k): v for k, v in dict(data.get("quality") or {}).items()},
            content_type=str(data.get("content_type", "image/jpeg")), filename=str(data.get("filename", "")),
        )


@dataclass(frozen=True)
class OutboxItem:
    id: str  # the image_id: chosen here, the server's idempotency key
    metadata: PhotoMetadata
    state: str
    size: int
    sha256: str  # lowercase hex, of the whole image
    sent: int  # bytes the server has acknowledged
    added_at: float  # time.time() when captured into the outbox
    location: str | None = None  # the tus upload's address on the server
    image_ref: str | None = None  # the server's id of the stored image, once delivered
    error: str | None = None  # the refusal's or the damage's code
    message: str | None = None  # and its explanation

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES

    def public(self) -> dict[str, Any]:
        """What the kit's page shows of it (no upload address)."""
        return {
            "id": self.id, "state": self.state, "body_site": self.metadata.body_site,
            "captured_at": self.metadata.captured_at.isoformat(), "consultation": self.metadata.consultation,
            "size": self.size, "sent": self.sent, "image_ref": self.image_ref, "error": self.error,
            "message": self.message,
        }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """The outbox in ``folder``; thread-safe (``add`` may run in a worker thread).

    ``on_change`` is called after every change this process makes, and by
    ``refresh()`` when another process changed the outbox; it is called in the
    thread that made the change.
    """

    def __init__(self, folder: Path, db: sqlite3.Connection) -> None:
        self.folder = folder
        self.on_change: Callable[[], None] | None = None
        self._db = db
        self._lock = threading.RLock()
        self._seen_version = self._data_version()

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path, *, verify: bool = True) -> Outbox:
        """Open (creating if need be) the outbox in ``folder`` and clean up after any crash.

        ``verify`` checks each waiting image's SHA-256 against its row (the agent
        does; a one-off ``nara edge photo`` need not read every image).
        """
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(folder / DATABASE, isolation_level=None, check_same_thread=False, timeout=30.0)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError("outbox_unavailable", f"cannot open the photo outbox in {folder}: {exc}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            db.close()
            raise OutboxError("outbox_unavailable", f"cannot use the photo outbox {folder / DATABASE}: {exc}") from None
        outbox = cls(folder, db)
        outbox._clean_up()
        outbox._check_files(verify)
        return outbox

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _clean_up(self) -> None:
        """Remove temporary files, files without a row, and files of delivered images."""
        with self._exclusive(), self._lock:
            keep = {row[0] for row in self._db.execute(
                f"SELECT id FROM images WHERE state IN ({_marks(_HAS_FILE)}) OR state = ?", (*_HAS_FILE, DAMAGED))}
            removed = []
            for path in self.folder.iterdir():
                name = path.name
                if name.startswith(TEMPORARY_PREFIX) or (_IMAGE_NAME.fullmatch(name) and name not in keep):
                    path.unlink(missing_ok=True)
                    removed.append(name)
            if removed:
                _fsync_folder(self.folder)
                logger.info("outbox: removed %d file(s) left by an interrupted capture or delivery", len(removed))

    def _check_files(self, verify: bool) -> None:
        damaged = 0
        for item in self.items():
            if item.state not in _HAS_FILE:
                continue
            path = self.path_of(item)
            if not path.exists():
                damaged += self._mark_damaged(item, "file_missing", "the image's file is missing from the outbox")
            elif verify and (path.stat().st_size != item.size or sha256_of(path) != item.sha256):
                damaged += self._mark_damaged(item, "checksum_mismatch",
                                              "the image's file no longer matches what was captured")
        if damaged:
            self._changed()

    def _mark_damaged(self, item: OutboxItem, code: str, message: str) -> int:
        """Damaged, unless its state changed meanwhile (another process delivered it and deleted the file)."""
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE images SET state = ?, error = ?, message = ?, updated_at = ? "
                f"WHERE id = ? AND state IN ({_marks(_HAS_FILE)})",
                (DAMAGED, code, message, time.time(), item.id, *_HAS_FILE))
        if cursor.rowcount:
            logger.error("outbox: image %s (%s, captured %s) is damaged: %s", item.id, item.metadata.body_site,
                         item.metadata.captured_at.isoformat(), message)
        return cursor.rowcount

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._flock(fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def _flock(self, operation: int) -> Iterator[None]:
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # releases the lock, as a crash would

    # --- capturing --------------------------------------------------------------------------------

    def add(self, image: bytes, metadata: PhotoMetadata) -> OutboxItem:
        """Store ``image`` durably; once this returns, the photo is captured and will be delivered."""
        if not image:
            raise ValueError("image: no bytes")
        image_id = str(uuid.uuid4())
        digest = hashlib.sha256(image).hexdigest()
        final = self.folder / image_id
        now = time.time()
        try:
            with self._flock(fcntl.LOCK_SH):
                temporary = self.folder / f"{TEMPORARY_PREFIX}{image_id}"
                try:
                    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        view = memoryview(image)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.rename(temporary, final)
                except BaseException:
                    temporary.unlink(missing_ok=True)
                    raise
                _fsync_folder(self.folder)
                with self._lock:
                    self._db.execute(
                        "INSERT INTO images (id, added_at, metadata, sha256, size, state, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (image_id, now, json.dumps(metadata.as_json(), ensure_ascii=False), digest, len(image),
                         QUEUED, now))
        except OSError as exc:
            final.unlink(missing_ok=True)
            code = "disk_full" if exc.errno == 28 else "outbox_unwritable"
            raise OutboxError(code, f"the photo could not be saved in {self.folder}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            final.unlink(missing_ok=True)
            raise OutboxError("outbox_unwritable", f"the photo could not be recorded: {exc}") from None
        logger.info("outbox: captured %s (%s, %d bytes, consultation %s)", image_id, metadata.body_site,
                    len(image), metadata.consultation)
        self._changed()
        return OutboxItem(image_id, metadata, QUEUED, len(image), digest, 0, now)

    # --- reading ----------------------------------------------------------------------------------

    def items(self) -> list[OutboxItem]:
        """Every image, oldest first, whatever its state."""
        return self._select("1 = 1", ())

    def pending(self) -> list[OutboxItem]:
        """The images still to be delivered, oldest first."""
        return self._select(f"state IN ({_marks(PENDING_STATES)})", PENDING_STATES)

    def get(self, image_id: str) -> OutboxItem | None:
        found = self._select("id = ?", (image_id,))
        return found[0] if found else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM images GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {str(state): int(n) for state, n in rows}

    def path_of(self, item: OutboxItem) -> Path:
        return self.folder / item.id

    def _select(self, where: str, parameters: tuple[Any, ...]) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, metadata, state, size, sha256, sent, added_at, location, image_ref, error, message "
                f"FROM images WHERE {where} ORDER BY seq", parameters).fetchall()
        return [OutboxItem(row[0], PhotoMetadata.from_json(json.loads(row[1])), *row[2:]) for row in rows]

    # --- what the uploader records ------------------------------------------------------------------

    def record_location(self, image_id: str, location: str, offset: int) -> None:
        """The server created (or found again) the image's upload at ``location``, with ``offset`` bytes."""
        self._update(image_id, "state = ?, location = ?, sent = ?", (UPLOADING, location, offset))

    def record_offset(self, image_id: str, offset: int) -> None:
        """The server acknowledged ``offset`` bytes."""
        self._update(image_id, "sent = ?", (offset,))

    def forget_location(self, image_id: str) -> None:
        """The server no longer has the upload (expired): it is created again."""
        self._update(image_id, "state = ?, location = NULL, sent = 0", (QUEUED,))

    def delivered(self, image_id: str, image_ref: str) -> None:
        """The server stored the image as ``image_ref``: keep the row as the receipt, delete the file."""
        item = self.get(image_id)
        if item is None or item.state not in PENDING_STATES:
            return
        self._update(image_id, "state = ?, image_ref = ?, sent = size, error = NULL, message = NULL",
                     (DELIVERED, image_ref))
        with self._flock(fcntl.LOCK_SH):
            self.path_of(item).unlink(missing_ok=True)
            _fsync_folder(self.folder)
        logger.info("outbox: %s delivered as %s", image_id, image_ref)

    def refused(self, image_id: str, code: str, message: str) -> None:
        """The server refused the image for good; the file stays, the page shows why."""
        self._update(image_id, "state = ?, error = ?, message = ?", (REFUSED, code, message))
        logger.error("outbox: the server refused %s for good: %s: %s", image_id, code, message)

    def damaged(self, image_id: str, code: str, message: str) -> None:
        item = self.get(image_id)
        if item is not None and self._mark_damaged(item, code, message):
            self._changed()

    def requeue(self, image_id: str) -> bool:
        """Try a refused image again (after the cause was fixed, e.g. the kit assigned again)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE images SET state = ?, location = NULL, sent = 0, error = NULL, message = NULL, "
                "updated_at = ? WHERE id = ? AND state = ?", (QUEUED, time.time(), image_id, REFUSED))
        if cursor.rowcount:
            self._changed()
        return bool(cursor.rowcount)

    def _update(self, image_id: str, assignments: str, parameters: tuple[Any, ...]) -> None:
        with self._lock:
            self._db.execute(f"UPDATE images SET {assignments}, updated_at = ? WHERE id = ?",
                             (*parameters, time.time(), image_id))
        self._changed()

    # --- the kit's facts ------------------------------------------------------------------------

    def remember_consultation(self, consultation_id: str) -> None:
        """The consultation the kit was last assigned to: a photo taken outside a call belongs to it."""
        with self._lock:
            self._db.execute("INSERT INTO facts (key, value) VALUES ('consultation', ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (consultation_id,))

    def last_consultation(self) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM facts WHERE key = 'consultation'").fetchone()
        return str(row[0]) if row else None

    # --- telling others --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Whether another process changed the outbox since last asked (then ``on_change`` is called)."""
        version = self._data_version()
        if version == self._seen_version:
            return False
        self._seen_version = version
        if self.on_change is not None:
            self.on_change()
        return True

    def _data_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" * len(values))
