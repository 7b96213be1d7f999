"""Consultations, kept in SQLite."""

from __future__ import annotations

import re
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS consultation (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    scheduled_for REAL,
    status TEXT NOT NULL DEFAULT 'open',
    patient_ref TEXT  -- pseudonymous; images of the same patient are compared across consultations
);

-- Home kits (signalling/devices.py). Codes and secrets are kept only as SHA-256 hashes.
CREATE TABLE IF NOT EXISTS device (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    code_hash TEXT NOT NULL UNIQUE,
    code_expires_at REAL NOT NULL,
    code_used_at REAL,
    secret_hash TEXT,
    revoked_at REAL,
    last_seen REAL
);

-- Which kit a consultation uses (at most one), and whether the clinician has called it.
CREATE TABLE IF NOT EXISTS kit_assignment (
    consultation_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    called_at REAL
);
CREATE INDEX IF NOT EXISTS kit_assignment_device ON kit_assignment (device_id);

-- Every consultation a kit was ever assigned to, kept when the assignment ends: the kit
-- may still deliver the photos it took there (its outbox may hold them for days).
CREATE TABLE IF NOT EXISTS kit_history (
    device_id TEXT NOT NULL,
    consultation_id TEXT NOT NULL,
    first_assigned_at REAL NOT NULL,
    PRIMARY KEY (device_id, consultation_id)
);
"""


CONSULTATION_COLUMNS = "id, title, created_at, scheduled_for, status, patient_ref"


ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no look-alikes, never a leading '-'

PATIENT_REF = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A Swedish personal identity or coordination number (YYMMDD-NNNN, YYYYMMDDNNNN, ...): never a patient_ref.
PERSONAL_NUMBER = re.compile(r"^(\d{2})?\d{6}[-+]?\d{4}$")


def patient_ref_problem(value: object) -> str | None:
    """Why ``value`` cannot be a pseudonymous patient reference, or None when it can."""
    if not isinstance(value, str) or not PATIENT_REF.match(value):
        return "patient_ref must be 1 to 64 letters, digits, '-' or '_'."
    if PERSONAL_NUMBER.match(value):
        return "patient_ref looks like a personal identity number; use the pseudonymous reference instead."
    return None


def new_id(length: int = 16) -> str:
    """A consultation id: 80 random bits, safe in URLs and on command lines."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class Consultation:
    id: str
    title: str
    created_at: float
    scheduled_for: float | None
    status: str
    patient_ref: str | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


class ConsultationStore:
    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to this schema."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(consultation)")}
        if "patient_ref" not in columns:
            self._db.execute("ALTER TABLE consultation ADD COLUMN patient_ref TEXT")

    def create(
        self, title: str, scheduled_for: float | None = None, patient_ref: str | None = None,
        consultation_id: str | None = None,
    ) -> Consultation:
        """A new open consultation; ``consultation_id`` when another node of a cluster chose it."""
        consultation = Consultation(
            id=consultation_id or new_id(), title=title, created_at=time.time(),
            scheduled_for=scheduled_for, status="open", patient_ref=patient_ref,
        )
        self._db.execute(
            f"INSERT INTO consultation ({CONSULTATION_COLUMNS}) VALUES (?,?,?,?,?,?)",
            (consultation.id, consultation.title, consultation.created_at,
             consultation.scheduled_for, consultation.status, consultation.patient_ref),
        )
        return consultation

    def delete(self, consultation_id: str) -> None:
        """Forget a consultation that was never announced (its placement in a cluster failed)."""
        self._db.execute("DELETE FROM consultation WHERE id = ?", (consultation_id,))

    def count_open(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM consultation WHERE status = 'open'").fetchone()
        return int(count)

    def open_ids(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT id FROM consultation WHERE status = 'open'")]

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for other tables in the same file (devices.py)."""
        return self._db

    def get(self, consultation_id: str) -> Consultation | None:
        row = self._db.execute(
            f"SELECT {CONSULTATION_COLUMNS} FROM consultation WHERE id = ?",
            (consultation_id,),
        ).fetchone()
        return Consultation(*row) if row else None

    def list(self) -> list[Consultation]:
        rows = self._db.execute(
            f"SELECT {CONSULTATION_COLUMNS} FROM consultation ORDER BY created_at"
        ).fetchall()
        return [Consultation(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
