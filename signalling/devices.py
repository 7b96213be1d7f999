"""Home kits: enrolment, device credentials, revocation, assignment and "call now".

IT staff create a device and hand its one-time enrolment code (``ABCD-EFGH``,
valid 24 hours) to whoever sets the kit up. The kit exchanges the code, once,
for a secret of its own and from then on asks the server "where should I be
now?" with it. The answer is a short-lived join token for the consultation the
kit is assigned to when that consultation is due (the clinician pressed "call
the home kit", or it is scheduled to start within ten minutes or has started),
or "idle"; the question waits (long-polls) up to 25 s for that to change.
Revoking a kit refuses its secret and closes its WebSocket at once.

Codes and secrets are stored only as SHA-256 hashes and never logged.
See docs/protocol.md, "Home kits".
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mediaserver.errors import CodedError

from .ratelimit import TokenBucket
from .rest import ADMIN_KEY, api_error, json_body
from .store import Consultation, ConsultationStore, new_id
from .tokens import TokenAuthority, TokenError
from .ws import CLOSE_REVOKED, HUB

logger = logging.getLogger(__name__)

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I/L to misread
CODE_LENGTH = 8
CODE_TTL = 24 * 3600
SECRET_BYTES = 32  # 43 characters of URL-safe base64
DEVICE_ID_LENGTH = 10
KIT_TOKEN_TTL = 10 * 60
DUE_AHEAD = 10 * 60  # a scheduled consultation is due this long before it starts
ONLINE_WITHIN = 40.0  # a kit heard from this recently counts as online
MAX_WAIT = 25.0
ENROL_RATE = 1 / 6  # enrolment attempts per second and client address, after a burst of
ENROL_BURST = 10.0
MAX_NAME = 100
CALLER_ROLES = frozenset({"clinician", "nurse"})

REVOKED_MESSAGE = "IT staff revoked this home kit; it must be enrolled again with a new code before it can be used."

# HTTP status of each refusal.
STATUS = {
    "code_invalid": 400,
    "code_expired": 410,
    "code_used": 410,
    "device_revoked": 403,
    "device_unknown": 404,
    "device_credential_missing": 401,
    "device_credential_invalid": 401,
    "no_kit_assigned": 409,
}


class DeviceError(CodedError):
    """A kit's enrolment or credential was refused."""


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def format_code(code: str) -> str:
    half = CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def normalise_code(supplied: Any) -> str:
    """The code as stored: upper case, without dash or spaces; DeviceError when it cannot be one."""
    if not isinstance(supplied, str) or len(supplied) > 32:
        raise DeviceError("code_invalid", "The enrolment code is not valid; it looks like ABCD-EFGH.")
    code = re.sub(r"[\s-]", "", supplied).upper()
    if len(code) != CODE_LENGTH or any(ch not in CODE_ALPHABET for ch in code):
        raise DeviceError("code_invalid", "The enrolment code is not valid; it looks like ABCD-EFGH.")
    return code


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    created_at: float
    code_expires_at: float
    code_used_at: float | None
    enrolled: bool
    revoked_at: float | None
    last_seen: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Assignment:
    consultation_id: str
    device_id: str
    assigned_at: float
    called_at: float | None

    @property
    def called(self) -> bool:
        return self.called_at is not None


@dataclass(frozen=True)
class Whereabouts:
    """Where a kit should be now, and when that changes by itself."""

    due: Consultation | None
    next: Consultation | None
    changes_at: float | None  # when ``next`` becomes due


def where_now(assigned: Iterable[tuple[Assignment, Consultation]], now: float) -> Whereabouts:
    """The consultation a kit belongs in: the one it was called to last, else the latest scheduled one
    that is due (starts within DUE_AHEAD or has started); only open consultations count."""
    candidates = [(a, c) for a, c in assigned if c.status == "open"]
    called = [(a.called_at, c) for a, c in candidates if a.called_at is not None]
    if called:
        return Whereabouts(max(called, key=lambda pair: pair[0])[1], None, None)
    scheduled = sorted(
        (c for _, c in candidates if c.scheduled_for is not None), key=lambda c: c.scheduled_for or 0.0
    )
    due = [c for c in scheduled if (c.scheduled_for or 0.0) <= now + DUE_AHEAD]
    if due:
        return Whereabouts(due[-1], None, None)
    upcoming = scheduled[0] if scheduled else None
    changes_at = upcoming.scheduled_for - DUE_AHEAD if upcoming and upcoming.scheduled_for else None
    return Whereabouts(None, upcoming, changes_at)


DEVICE_COLUMNS = (
    "id, name, created_at, code_expires_at, code_used_at, secret_hash IS NOT NULL, revoked_at, last_seen"
)
ASSIGNMENT_COLUMNS = "consultation_id, device_id, assigned_at, called_at"


def _device(row: tuple[Any, ...]) -> Device:
    device_id, name, created_at, code_expires_at, code_used_at, enrolled, revoked_at, last_seen = row
    return Device(device_id, name, created_at, code_expires_at, code_used_at, bool(enrolled), revoked_at, last_seen)


class DeviceStore:
    """Devices and kit assignments, in the consultations' SQLite file (tables in store.SCHEMA)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def create(self, name: str, now: float) -> tuple[Device, str]:
        """A new device and its enrolment code (shown once; only its hash is kept)."""
        while True:
            device_id, code = f"kit-{new_id(DEVICE_ID_LENGTH)}", new_code()
            try:
                self._db.execute(
                    "INSERT INTO device (id, name, created_at, code_hash, code_expires_at) VALUES (?,?,?,?,?)",
                    (device_id, name, now, _hash(code), now + CODE_TTL),
                )
            except sqlite3.IntegrityError:
                continue  # an id or code already taken: draw again
            device = self.get(device_id)
            assert device is not None
            return device, format_code(code)

    def get(self, device_id: str) -> Device | None:
        row = self._db.execute(f"SELECT {DEVICE_COLUMNS} FROM device WHERE id = ?", (device_id,)).fetchone()
        return _device(row) if row else None

    def devices(self) -> list[Device]:
        rows = self._db.execute(f"SELECT {DEVICE_COLUMNS} FROM device ORDER BY created_at").fetchall()
        return [_device(row) for row in rows]

    def enrol(self, supplied_code: Any, now: float) -> tuple[Device, str]:
        """Exchange an enrolment code for the device's secret; a code works once."""
        code = normalise_code(supplied_code)
        row = self._db.execute(
            "SELECT id, code_expires_at, code_used_at, revoked_at FROM device WHERE code_hash = ?", (_hash(code),)
        ).fetchone()
        if row is None:
            raise DeviceError("code_invalid", "This enrolment code is unknown; check it or ask IT staff for a new one.")
        device_id, expires_at, used_at, revoked_at = row
        if revoked_at is not None:
            raise DeviceError("device_revoked", REVOKED_MESSAGE)
        if used_at is not None:
            raise DeviceError("code_used", "This enrolment code has been used already; ask IT staff for a new one.")
        if now >= expires_at:
            raise DeviceError("code_expired", "This enrolment code has expired; ask IT staff for a new one.")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        updated = self._db.execute(
            "UPDATE device SET code_used_at = ?, secret_hash = ? WHERE id = ? AND code_used_at IS NULL",
            (now, _hash(secret), device_id),
        )
        if updated.rowcount != 1:
            raise DeviceError("code_used", "This enrolment code has been used already; ask IT staff for a new one.")
        device = self.get(device_id)
        assert device is not None
        return device, secret

    def authenticate(self, device_id: str, secret: str) -> Device:
        """The device whose secret this is (revoked or not), or DeviceError."""
        row = self._db.execute("SELECT secret_hash FROM device WHERE id = ?", (device_id,)).fetchone()
        if row is None:
            raise DeviceError("device_unknown", "There is no home kit with this id; enrol the kit again.")
        stored = row[0] or ""
        if not hmac.compare_digest(_hash(secret), stored):
            raise DeviceError("device_credential_invalid", "The home kit's credential is not valid.")
        device = self.get(device_id)
        assert device is not None
        return device

    def touch(self, device_id: str, now: float) -> None:
        self._db.execute("UPDATE device SET last_seen = ? WHERE id = ?", (now, device_id))

    def revoke(self, device_id: str, now: float) -> Device:
        """Refuse the device's secret from now on and take it off every consultation."""
        self._db.execute(
            "UPDATE device SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (now, device_id)
        )
        self._db.execute("DELETE FROM kit_assignment WHERE device_id = ?", (device_id,))
        device = self.get(device_id)
        if device is None:
            raise DeviceError("device_unknown", "There is no home kit with this id.")
        return device

    def assign(self, consultation_id: str, device_id: str, now: float) -> Assignment:
        self._db.execute(
            "INSERT OR REPLACE INTO kit_assignment (consultation_id, device_id, assigned_at, called_at) "
            "VALUES (?,?,?,NULL)",
            (consultation_id, device_id, now),
        )
        self._db.execute(
            "INSERT OR IGNORE INTO kit_history (device_id, consultation_id, first_assigned_at) VALUES (?,?,?)",
            (device_id, consultation_id, now),
        )
        assignment = self.assignment(consultation_id)
        assert assignment is not None
        return assignment

    def unassign(self, consultation_id: str) -> Assignment | None:
        assignment = self.assignment(consultation_id)
        self._db.execute("DELETE FROM kit_assignment WHERE consultation_id = ?", (consultation_id,))
        return assignment

    def call(self, consultation_id: str, now: float) -> Assignment:
        self._db.execute("UPDATE kit_assignment SET called_at = ? WHERE consultation_id = ?", (now, consultation_id))
        assignment = self.assignment(consultation_id)
        if assignment is None:
            raise DeviceError("no_kit_assigned", "No home kit is assigned to this consultation.")
        return assignment

    def assignment(self, consultation_id: str) -> Assignment | None:
        row = self._db.execute(
            f"SELECT {ASSIGNMENT_COLUMNS} FROM kit_assignment WHERE consultation_id = ?", (consultation_id,)
        ).fetchone()
        return Assignment(*row) if row else None

    def ever_assigned(self, device_id: str, consultation_id: str) -> bool:
        """Whether the kit was assigned to the consultation at some time (now, or before)."""
        row = self._db.execute(
            "SELECT 1 FROM kit_history WHERE device_id = ? AND consultation_id = ?", (device_id, consultation_id)
        ).fetchone()
        return row is not None or any(a.consultation_id == consultation_id for a in self.assignments_of(device_id))

    def assignments_of(self, device_id: str) -> list[Assignment]:
        rows = self._db.execute(
            f"SELECT {ASSIGNMENT_COLUMNS} FROM kit_assignment WHERE device_id = ? ORDER BY assigned_at",
            (device_id,),
        ).fetchall()
        return [Assignment(*row) for row in rows]


class HomeKits:
    """The server's kits: their store, the kits waiting for an answer, and the enrolment rate limit."""

    def __init__(
        self, consultations: ConsultationStore, authority: TokenAuthority, clock: Callable[[], float] = time.time
    ) -> None:
        self.consultations = consultations
        self.store = DeviceStore(consultations.db)
        self.authority = authority
        self.clock = clock
        self.closing = False
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._waiting_changed = asyncio.Condition()
        self._enrol_buckets: dict[str, TokenBucket] = {}

    def whereabouts(self, device_id: str) -> Whereabouts:
        assigned = []
        for assignment in self.store.assignments_of(device_id):
            consultation = self.consultations.get(assignment.consultation_id)
            if consultation is not None:
                assigned.append((assignment, consultation))
        return where_now(assigned, self.clock())

    def wake(self, device_id: str) -> None:
        """Something about this kit changed: answer its waiting questions again."""
        for event in self._waiting.get(device_id, ()):
            event.set()

    async def changed(self, device_id: str, timeout: float) -> None:
        """Wait until ``wake(device_id)`` or ``timeout`` seconds, whichever is first."""
        event = asyncio.Event()
        waiting = self._waiting.setdefault(device_id, set())
        waiting.add(event)
        try:
            async with self._waiting_changed:
                self._waiting_changed.notify_all()
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiting.discard(event)
            if not waiting:
                self._waiting.pop(device_id, None)

    def waiting(self, device_id: str) -> int:
        """How many of this kit's questions are waiting for an answer."""
        return len(self._waiting.get(device_id, ()))

    async def until_waiting(self, device_id: str, timeout: float = 10.0) -> None:
        """Return once the kit has a question waiting (for monitoring and tests)."""
        async with self._waiting_changed:
            await asyncio.wait_for(self._waiting_changed.wait_for(lambda: self.waiting(device_id) > 0), timeout)

    def close(self) -> None:
        """The server is stopping: every waiting question is answered now."""
        self.closing = True
        for device_id in list(self._waiting):
            self.wake(device_id)

    def may_enrol(self, address: str) -> bool:
        if len(self._enrol_buckets) > 10_000:  # forget addresses quiet long enough to have a full bucket again
            now = time.monotonic()
            for key, bucket in list(self._enrol_buckets.items()):
                if bucket.tokens + (now - bucket.updated) * bucket.rate >= bucket.burst:
                    del self._enrol_buckets[key]
        bucket = self._enrol_buckets.setdefault(address, TokenBucket(ENROL_RATE, ENROL_BURST))
        return bucket.take()

    def assignable(self, device_id: Any) -> Device:
        """The kit a consultation may be given: one held here and not revoked; a clear refusal otherwise."""
        device = self.store.get(device_id) if isinstance(device_id, str) else None
        if device is None:
            raise api_error(404, "device_unknown", "There is no home kit with this device_id.")
        if device.revoked:
            raise api_error(409, "device_revoked", "This home kit was revoked by IT staff; enrol a kit first.")
        return device

    def assign(self, consultation_id: str, device_id: Any) -> None:
        """Give a consultation this kit (replacing its other kit, if any) and tell the kits."""
        device = self.assignable(device_id)
        previous = self.store.assignment(consultation_id)
        self.store.assign(consultation_id, device.id, self.clock())
        for changed in {device.id, previous.device_id if previous else device.id}:
            self.wake(changed)
        logger.info("device %s assigned to %s", device.id, consultation_id)

    def check_not_revoked(self, device_id: str) -> None:
        """DeviceError when this participant id is a kit IT staff revoked."""
        device = self.store.get(device_id)
        if device is not None and device.revoked:
            raise DeviceError("device_revoked", REVOKED_MESSAGE)

    def kit_status(self, consultation_id: str, connected: Callable[[str], bool]) -> dict[str, Any] | None:
        """The kit of a consultation as the clinician's page shows it."""
        assignment = self.store.assignment(consultation_id)
        device = self.store.get(assignment.device_id) if assignment else None
        if assignment is None or device is None:
            return None
        heard = device.last_seen is not None and self.clock() - device.last_seen < ONLINE_WITHIN
        return {
            "device_id": device.id,
            "name": device.name,
            "online": heard or connected(device.id),
            "called": assignment.called,
        }


# --- HTTP -------------------------------------------------------------------------------


def _refuse(exc: DeviceError) -> Exception:
    return api_error(STATUS.get(exc.code, 400), exc.code, exc.message)


def _kits(request: web.Request) -> HomeKits:
    kits = request.app[HUB].devices
    assert kits is not None
    return kits


def _device_json(kits: HomeKits, device: Device) -> dict[str, Any]:
    return {
        "device_id": device.id,
        "name": device.name,
        "enrolled": device.enrolled,
        "revoked": device.revoked,
        "last_seen": device.last_seen,
        "assigned_to": [a.consultation_id for a in kits.store.assignments_of(device.id)],
    }


async def create_device(request: web.Request) -> web.Response:
    kits = _kits(request)
    name = (await json_body(request)).get("name")
    if not isinstance(name, str) or not 0 < len(name.strip()) <= MAX_NAME:
        raise api_error(400, "name_invalid", f"name must be text of 1 to {MAX_NAME} characters, e.g. 'Kit 7'.")
    device, code = kits.store.create(name.strip(), kits.clock())
    logger.info("device %s (%s) created; its enrolment code is valid for 24 h", device.id, device.name)
    if (cluster := request.app[HUB].cluster) is not None:
        await cluster.register_device(device.id)  # so a consultation for it is placed here
    return web.json_response(
        {
            "device_id": device.id,
            "name": device.name,
            "enrolment_code": code,
            "code_expires_at": int(device.code_expires_at),
        },
        status=201,
    )


async def list_devices(request: web.Request) -> web.Response:
    kits = _kits(request)
    return web.json_response({"devices": [_device_json(kits, d) for d in kits.store.devices()]})


async def enrol_device(request: web.Request) -> web.Response:
    kits = _kits(request)
    if not kits.may_enrol(request.remote or ""):
        response = web.json_response(
            {"error": {"code": "rate_limited", "message": "Too many enrolment attempts; wait a minute and try again."}},
            status=429,
        )
        response.headers["Retry-After"] = str(round(1 / ENROL_RATE))
        return response
    try:
        device, secret = kits.store.enrol((await json_body(request)).get("code"), kits.clock())
    except DeviceError as exc:
        logger.info("enrolment refused from %s: %s", request.remote, exc.code)
        raise _refuse(exc) from None
    logger.info("device %s (%s) enrolled from %s", device.id, device.name, request.remote)
    return web.json_response({"device_id": device.id, "name": device.name, "secret": secret})


def _wait_seconds(request: web.Request) -> float:
    raw = request.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:
        raise api_error(400, "wait_invalid", f"wait must be a number of seconds from 0 to {MAX_WAIT:g}.")
    return wait


def _authenticated_device(request: web.Request, kits: HomeKits) -> Device:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "device" or not secret.strip():
        raise api_error(401, "device_credential_missing", "Send the kit's secret as 'Authorization: Device <secret>'.")
    try:
        device = kits.store.authenticate(request.match_info["device_id"], secret.strip())
    except DeviceError as exc:
        raise _refuse(exc) from None
    if device.revoked:
        raise api_error(403, "device_revoked", REVOKED_MESSAGE)
    return device


async def device_session(request: web.Request) -> web.Response:
    """The kit asks where it should be now; waits up to ``wait`` seconds for a reason to join."""
    hub = request.app[HUB]
    kits = _kits(request)
    wait = _wait_seconds(request)
    device = _authenticated_device(request, kits)
    deadline = kits.clock() + wait
    while True:
        kits.store.touch(device.id, kits.clock())
        current = kits.store.get(device.id)
        if current is None or current.revoked:
            raise api_error(403, "device_revoked", REVOKED_MESSAGE)
        place = kits.whereabouts(device.id)
        remaining = deadline - kits.clock()
        if place.due is not None or remaining <= 0 or kits.closing:
            break
        if place.changes_at is not None:
            remaining = min(remaining, max(0.0, place.changes_at - kits.clock()))
        await kits.changed(device.id, remaining)
    if place.due is None:
        upcoming = place.next
        return web.json_response({
            "state": "idle",
            "next": {"consultation_id": upcoming.id, "scheduled_for": upcoming.scheduled_for} if upcoming else None,
        })
    token, claims = hub.authority.mint(place.due.id, current.name, "kit", KIT_TOKEN_TTL, current.id)
    return web.json_response({
        "state": "assigned",
        "consultation_id": place.due.id,
        "title": place.due.title,
        "token": token,
        "expires_at": claims.expires_at,
        "participant_id": claims.participant_id,
        "name": claims.name,
    })


async def revoke_device(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    kits = _kits(request)
    try:
        device = kits.store.revoke(request.match_info["device_id"], kits.clock())
    except DeviceError as exc:
        raise _refuse(exc) from None
    kits.wake(device.id)
    if hub.cluster is not None:
        await hub.cluster.forget_device(device.id)
    closed = await hub.disconnect(device.id, "kit", "device_revoked", REVOKED_MESSAGE, CLOSE_REVOKED)
    logger.info("device %s (%s) revoked; %d live connection(s) closed", device.id, device.name, closed)
    return web.json_response({"device_id": device.id, "revoked": True})


def _authorise_caller(request: web.Request, consultation_id: str) -> None:
    """The admin key, or a clinician's or nurse's join token for this very consultation."""
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        raise api_error(
            401, "credential_missing",
            "Send the admin key or a clinician's join token as 'Authorization: Bearer <key or token>'.",
        )
    if hmac.compare_digest(supplied.encode(), request.app[ADMIN_KEY].encode()):
        return
    try:
        claims = request.app[HUB].authority.verify(supplied, consultation_id)
    except TokenError as exc:
        raise api_error(403, exc.code, exc.message) from None
    if claims.role not in CALLER_ROLES:
        raise api_error(403, "role_not_allowed", "Only a clinician or nurse of this consultation may do this.")


def _consultation(request: web.Request) -> Consultation:
    consultation = request.app[HUB].store.get(request.match_info["id"])
    if consultation is None:
        raise api_error(404, "consultation_not_found", "There is no consultation with this id.")
    _authorise_caller(request, consultation.id)
    return consultation


def _kit_response(request: web.Request, consultation_id: str) -> web.Response:
    hub = request.app[HUB]
    return web.json_response({"kit": _kits(request).kit_status(consultation_id, hub.connected)})


async def get_kit(request: web.Request) -> web.Response:
    return _kit_response(request, _consultation(request).id)


async def assign_kit(request: web.Request) -> web.Response:
    kits = _kits(request)
    cluster = request.app[HUB].cluster
    if cluster is not None and request.app[HUB].store.get(request.match_info["id"]) is None:
        return await _assign_elsewhere(request)
    consultation = _consultation(request)
    device_id = (await json_body(request)).get("device_id")
    if cluster is not None and isinstance(device_id, str) and kits.store.get(device_id) is None:
        if (node_id := await cluster.device_node(device_id)) is not None:  # it would never join here
            raise kit_on_other_node(device_id, node_id, consultation.id, cluster.id)
    kits.assign(consultation.id, device_id)
    return _kit_response(request, consultation.id)


def kit_on_other_node(device_id: str, device_node: str, consultation_id: str, consultation_node: str) -> Exception:
    return api_error(409, "kit_on_other_node",
                     f"Home kit {device_id} is enrolled on server {device_node} and consultation {consultation_id} "
                     f"lives on {consultation_node}: a kit joins only consultations of its own server. Create the "
                     "consultation with this device_id, so it is placed on the kit's server.")


async def _assign_elsewhere(request: web.Request) -> web.Response:
    """In a cluster, a kit for a consultation another node holds: sent on to that node when the kit lives
    there too; refused (``kit_on_other_node``) when it lives elsewhere."""
    hub = request.app[HUB]
    cluster = hub.cluster
    assert cluster is not None
    consultation_id = request.match_info["id"]
    _authorise_caller(request, consultation_id)  # only the caller learns where things live
    body = await json_body(request)
    owner = await cluster.owner(consultation_id)
    if owner is None:
        raise api_error(404, "consultation_not_found", "There is no consultation with this id.")
    device_id = body.get("device_id")
    device_node = await cluster.device_node(device_id) if isinstance(device_id, str) else None
    if device_node is not None and device_node != owner.id:
        raise kit_on_other_node(str(device_id), device_node, consultation_id, owner.id)
    status, answer = await cluster.ask_owner(owner, request.path, body, request.headers.get("Authorization", ""),
                                             method="PUT")
    return web.json_response(answer, status=status)


async def unassign_kit(request: web.Request) -> web.Response:
    kits = _kits(request)
    consultation = _consultation(request)
    previous = kits.store.unassign(consultation.id)
    if previous is not None:
        kits.wake(previous.device_id)
        logger.info("device %s unassigned from %s", previous.device_id, consultation.id)
    return _kit_response(request, consultation.id)


async def call_kit(request: web.Request) -> web.Response:
    kits = _kits(request)
    consultation = _consultation(request)
    try:
        assignment = kits.store.call(consultation.id, kits.clock())
    except DeviceError as exc:
        raise _refuse(exc) from None
    kits.wake(assignment.device_id)
    logger.info("device %s called to %s", assignment.device_id, consultation.id)
    return _kit_response(request, consultation.id)


def add_routes(app: web.Application) -> None:
    """Routes named in rest.SELF_AUTHENTICATED check their own credentials; the rest need the admin key."""
    app.router.add_post("/api/devices", create_device)
    app.router.add_get("/api/devices", list_devices)
    app.router.add_post("/api/devices/enrol", enrol_device, name="device-enrol")
    app.router.add_post("/api/devices/{device_id}/session", device_session, name="device-session")
    app.router.add_post("/api/devices/{device_id}/revoke", revoke_device)
    app.router.add_get("/api/consultations/{id}/kit", get_kit, name="kit-get")
    app.router.add_put("/api/consultations/{id}/kit", assign_kit, name="kit-put")
    app.router.add_delete("/api/consultations/{id}/kit", unassign_kit, name="kit-delete")
    app.router.add_post("/api/consultations/{id}/call-kit", call_kit, name="kit-call")
