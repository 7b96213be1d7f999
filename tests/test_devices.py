"""Home kits on the server: enrolment, the device credential, revocation, assignment and "call now"."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from signalling.client import ConsultationClient, JoinRefused
from signalling.config import DATABASE_FILE
from signalling.devices import DUE_AHEAD, Assignment, HomeKits, where_now
from signalling.store import SCHEMA, Consultation, ConsultationStore

from .conftest import RunningServer, start_server


def kits_of(server: RunningServer) -> HomeKits:
    kits = server.hub.devices
    assert kits is not None
    return kits


class Api:
    """The REST calls IT staff, a clinician's page and a kit make."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.admin = {"Authorization": f"Bearer {server.admin_key}"}

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.request(method, f"{self.server.url}{path}", json=body, headers=headers) as r:
            return r.status, await r.json()

    async def create_device(self, name: str = "Kit 7") -> dict[str, Any]:
        status, body = await self.call("POST", "/api/devices", {"name": name}, self.admin)
        assert status == 201, body
        return body

    async def enrol(self, code: str) -> tuple[int, dict[str, Any]]:
        return await self.call("POST", "/api/devices/enrol", {"code": code})

    async def enrolled_kit(self, name: str = "Kit 7") -> tuple[str, str]:
        """A new device, enrolled: its id and secret."""
        status, body = await self.enrol((await self.create_device(name))["enrolment_code"])
        assert status == 200, body
        return body["device_id"], body["secret"]

    async def session(self, device_id: str, secret: str, wait: float = 0) -> tuple[int, dict[str, Any]]:
        return await self.call("POST", f"/api/devices/{device_id}/session?wait={wait}", None,
                               {"Authorization": f"Device {secret}"})

    async def assign(self, room: str, device_id: str, bearer: str | None = None) -> tuple[int, dict[str, Any]]:
        auth = {"Authorization": f"Bearer {bearer}"} if bearer else self.admin
        return await self.call("PUT", f"/api/consultations/{room}/kit", {"device_id": device_id}, auth)

    async def call_kit(self, room: str, bearer: str) -> tuple[int, dict[str, Any]]:
        return await self.call("POST", f"/api/consultations/{room}/call-kit", None,
                               {"Authorization": f"Bearer {bearer}"})

    async def consultation(self, room: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/api/consultations/{room}", None, self.admin)
        assert status == 200, body
        return body

    async def devices(self) -> dict[str, dict[str, Any]]:
        status, body = await self.call("GET", "/api/devices", None, self.admin)
        assert status == 200, body
        return {d["device_id"]: d for d in body["devices"]}


@pytest.fixture
async def api(server: RunningServer) -> Any:
    async with aiohttp.ClientSession() as http:
        yield Api(server, http)


async def test_a_code_enrols_one_kit_once_and_every_refusal_has_its_code(server: RunningServer, api: Api) -> None:
    created = await api.create_device("Kit 7")
    code = created["enrolment_code"]
    assert len(code) == 9 and code[4] == "-" and code.replace("-", "").isalnum()
    assert created["code_expires_at"] == pytest.approx(time.time() + 24 * 3600, abs=60)
    assert (await api.devices())[created["device_id"]]["enrolled"] is False

    # Typed in lower case and without the dash, as a nurse might.
    status, enrolled = await api.enrol(code.replace("-", "").lower())
    assert status == 200, enrolled
    assert enrolled["device_id"] == created["device_id"] and enrolled["name"] == "Kit 7"
    assert len(enrolled["secret"]) >= 43
    assert (await api.devices())[created["device_id"]]["enrolled"] is True

    status, body = await api.enrol(code)
    assert (status, body["error"]["code"]) == (410, "code_used")
    for malformed in ("ABCD", "ABCD-EFG0", "", 12345678):
        status, body = await api.enrol(malformed)  # type: ignore[arg-type]
        assert (status, body["error"]["code"]) == (400, "code_invalid"), malformed
    status, body = await api.enrol("ZZZZ-ZZZZ" if code != "ZZZZ-ZZZZ" else "YYYY-YYYY")
    assert (status, body["error"]["code"]) == (400, "code_invalid")

    late = await api.create_device("Kit 8")
    kits_of(server).clock = lambda: time.time() + 24 * 3600 + 1  # a day and a second later
    status, body = await api.enrol(late["enrolment_code"])
    assert (status, body["error"]["code"]) == (410, "code_expired")
    assert "IT staff" in body["error"]["message"]


async def test_a_revoked_device_cannot_enrol(api: Api) -> None:
    created = await api.create_device()
    status, body = await api.call("POST", f"/api/devices/{created['device_id']}/revoke", None, api.admin)
    assert (status, body) == (200, {"device_id": created["device_id"], "revoked": True})
    status, body = await api.enrol(created["enrolment_code"])
    assert (status, body["error"]["code"]) == (403, "device_revoked")
    assert (await api.devices())[created["device_id"]]["revoked"] is True


async def test_enrolment_attempts_are_rate_limited_per_address(api: Api) -> None:
    statuses = [(await api.enrol("AAAA-AAAA"))[0] for _ in range(10)]
    assert statuses == [400] * 10
    async with api.http.post(f"{api.server.url}/api/devices/enrol", json={"code": "AAAA-AAAA"}) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) > 0
    # Other admin work goes on.
    await api.create_device()


async def test_admin_routes_need_the_admin_key(api: Api) -> None:
    created = await api.create_device()
    for method, path in (("GET", "/api/devices"), ("POST", f"/api/devices/{created['device_id']}/revoke")):
        status, body = await api.call(method, path)
        assert (status, body["error"]["code"]) == (401, "admin_key_missing")
    status, body = await api.call("POST", "/api/devices", {"name": ""}, api.admin)
    assert (status, body["error"]["code"]) == (400, "name_invalid")
    status, body = await api.call("POST", "/api/devices/kit-nope/revoke", None, api.admin)
    assert (status, body["error"]["code"]) == (404, "device_unknown")


async def test_the_session_needs_the_device_credential(server: RunningServer, api: Api) -> None:
    device_id, secret = await api.enrolled_kit()
    status, body = await api.call("POST", f"/api/devices/{device_id}/session")
    assert (status, body["error"]["code"]) == (401, "device_credential_missing")
    status, body = await api.session(device_id, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert (status, body["error"]["code"]) == (401, "device_credential_invalid")
    status, body = await api.session("kit-unknown", secret)
    assert (status, body["error"]["code"]) == (404, "device_unknown")
    status, body = await api.session(device_id, secret, wait=26)
    assert (status, body["error"]["code"]) == (400, "wait_invalid")

    assert (await api.devices())[device_id]["last_seen"] is None
    status, body = await api.session(device_id, secret)
    assert (status, body) == (200, {"state": "idle", "next": None})
    assert (await api.devices())[device_id]["last_seen"] == pytest.approx(time.time(), abs=5)


async def test_an_assigned_kit_gets_a_token_that_joins_as_a_kit_and_replaces_its_old_connection(
    server: RunningServer, api: Api
) -> None:
    device_id, secret = await api.enrolled_kit("Kit 7")
    status, body = await api.call("POST", "/api/consultations",
                                  {"title": "Hemsjukvård Pajala", "scheduled_for": time.time() + 300}, api.admin)
    room = body["id"]
    status, body = await api.assign(room, device_id)
    assert status == 200 and body["kit"] == {"device_id": device_id, "name": "Kit 7", "online": False,
                                             "called": False}
    status, session = await api.session(device_id, secret)
    assert status == 200
    assert session["state"] == "assigned"
    assert (session["consultation_id"], session["title"]) == (room, "Hemsjukvård Pajala")
    assert (session["participant_id"], session["name"]) == (device_id, "Kit 7")
    assert session["expires_at"] == pytest.approx(time.time() + 600, abs=10)
    assert (await api.devices())[device_id]["assigned_to"] == [room]

    first = ConsultationClient(server.url, room, session["token"], publish=False)
    second: ConsultationClient | None = None
    try:
        joined = await first.join()
        assert joined["participant"] == {"id": device_id, "name": "Kit 7", "role": "kit"}
        seen = (await api.consultation(room))["participants"]
        assert [(p["id"], p["role"]) for p in seen] == [(device_id, "kit")]
        assert (await api.consultation(room))["kit"]["online"] is True

        # The kit comes back over a new connection (say, after its link dropped): it replaces the old one.
        _, again = await api.session(device_id, secret)
        second = ConsultationClient(server.url, room, again["token"], publish=False)
        await second.join()
        await first.wait_for(lambda: any(e["code"] == "replaced" for e in first.errors))
        seen = (await api.consultation(room))["participants"]
        assert [(p["id"], p["role"]) for p in seen] == [(device_id, "kit")]
    finally:
        await first.close()
        if second is not None:
            await second.close()


async def test_a_waiting_kit_is_answered_at_once_when_the_clinician_calls(server: RunningServer, api: Api) -> None:
    device_id, secret = await api.enrolled_kit()
    room = server.consultation("Samtal utan tid")  # not scheduled: only "call now" brings the kit
    doctor = server.token(room, "Dr Berg", "clinician")
    status, body = await api.call_kit(room, doctor)
    assert (status, body["error"]["code"]) == (409, "no_kit_assigned")
    status, _ = await api.assign(room, device_id, bearer=doctor)
    assert status == 200

    poll = asyncio.ensure_future(api.session(device_id, secret, wait=25))
    await kits_of(server).until_waiting(device_id)
    assert not poll.done()
    status, body = await api.call_kit(room, doctor)
    assert status == 200 and body["kit"]["called"] is True
    called_at = time.monotonic()
    status, answer = await asyncio.wait_for(poll, 5)
    assert time.monotonic() - called_at < 2
    assert status == 200 and answer["state"] == "assigned" and answer["consultation_id"] == room
    assert (await api.consultation(room))["kit"] == {"device_id": device_id, "name": "Kit 7", "online": True,
                                                     "called": True}

    # Unassigned, the kit is idle again.
    status, body = await api.call("DELETE", f"/api/consultations/{room}/kit", None,
                                  {"Authorization": f"Bearer {doctor}"})
    assert (status, body) == (200, {"kit": None})
    assert (await api.session(device_id, secret))[1]["state"] == "idle"


async def test_a_revoked_kit_is_refused_and_its_call_is_closed(server: RunningServer, api: Api) -> None:
    device_id, secret = await api.enrolled_kit()
    room = server.consultation()
    await api.assign(room, device_id)
    await api.call_kit(room, api.server.admin_key)
    _, session = await api.session(device_id, secret)
    kit = ConsultationClient(server.url, room, session["token"], publish=False)
    other_device, other_secret = await api.enrolled_kit("Kit 8")
    poll = asyncio.ensure_future(api.session(other_device, other_secret, wait=25))
    try:
        await kit.join()
        await kits_of(server).until_waiting(other_device)
        for revoked in (device_id, other_device):
            status, _ = await api.call("POST", f"/api/devices/{revoked}/revoke", None, api.admin)
            assert status == 200
        # The live call ends at once with the reason ...
        await kit.wait_for(lambda: any(e["code"] == "device_revoked" for e in kit.errors))
        await kit.wait_for(lambda: kit._ws is not None and kit._ws.closed)
        assert kit._ws is not None and kit._ws.close_code == 4403
        # ... a waiting question is answered with it ...
        status, body = await asyncio.wait_for(poll, 5)
        assert (status, body["error"]["code"]) == (403, "device_revoked")
        # ... and from now on the credential and the still-valid join token are refused.
        status, body = await api.session(device_id, secret)
        assert (status, body["error"]["code"]) == (403, "device_revoked")
        assert "revoked" in body["error"]["message"] and "enrolled again" in body["error"]["message"]
        rejoin = ConsultationClient(server.url, room, session["token"], publish=False)
        try:
            with pytest.raises(JoinRefused) as refused:
                await rejoin.join()
            assert refused.value.code == "device_revoked"
        finally:
            await rejoin.close()
        assert (await api.consultation(room))["kit"] is None
        status, body = await api.assign(room, device_id)
        assert (status, body["error"]["code"]) == (409, "device_revoked")
    finally:
        poll.cancel()
        await kit.close()


async def test_only_this_consultations_clinician_or_nurse_may_assign_or_call(
    server: RunningServer, api: Api
) -> None:
    device_id, _ = await api.enrolled_kit()
    room, other = server.consultation(), server.consultation()
    someone_elses_doctor = server.token(other, "Dr Annan", "clinician")
    relative = server.token(room, "Anna", "relative")
    for bearer, code in ((someone_elses_doctor, "token_wrong_room"), (relative, "role_not_allowed"),
                         ("not-a-token", "token_malformed")):
        status, body = await api.assign(room, device_id, bearer=bearer)
        assert (status, body["error"]["code"]) == (403, code)
        status, body = await api.call_kit(room, bearer)
        assert (status, body["error"]["code"]) == (403, code)
        status, body = await api.call("GET", f"/api/consultations/{room}/kit", None,
                                      {"Authorization": f"Bearer {bearer}"})
        assert status == 403
    status, body = await api.call("PUT", f"/api/consultations/{room}/kit", {"device_id": device_id})
    assert (status, body["error"]["code"]) == (401, "credential_missing")
    assert (await api.consultation(room))["kit"] is None

    nurse = server.token(room, "Sara", "nurse")
    status, body = await api.assign(room, "kit-unknown", bearer=nurse)
    assert (status, body["error"]["code"]) == (404, "device_unknown")
    status, body = await api.assign("nope", device_id, bearer=nurse)
    assert (status, body["error"]["code"]) == (404, "consultation_not_found")
    status, body = await api.assign(room, device_id, bearer=nurse)
    assert status == 200 and body["kit"]["device_id"] == device_id
    status, body = await api.call_kit(room, nurse)
    assert status == 200 and body["kit"]["called"] is True


async def test_secrets_codes_and_tokens_never_reach_the_logs(
    server: RunningServer, api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await api.create_device()
    code = created["enrolment_code"]
    _, enrolled = await api.enrol(code)
    secret = enrolled["secret"]
    room = server.consultation()
    await api.assign(room, created["device_id"])
    await api.call_kit(room, server.admin_key)
    _, session = await api.session(created["device_id"], secret)
    await api.session(created["device_id"], secret[::-1])  # a wrong secret is not logged either
    await api.call("POST", f"/api/devices/{created['device_id']}/revoke", None, api.admin)
    await api.session(created["device_id"], secret)
    logged = caplog.text
    assert created["device_id"] in logged, "the log does say what happened to which kit"
    assert "POST /api/devices/enrol" in logged, "access log lines are in what was captured"
    for value in (secret, secret[::-1], code, code.replace("-", ""), session["token"], server.admin_key):
        assert value not in logged


async def test_the_database_keeps_only_hashes_of_codes_and_secrets(server: RunningServer, api: Api) -> None:
    created = await api.create_device()
    code = created["enrolment_code"]
    _, enrolled = await api.enrol(code)
    secret = enrolled["secret"]
    database = server.config.data_dir / DATABASE_FILE
    files = [path for path in (database, Path(f"{database}-wal")) if path.exists()]
    raw = b"".join(path.read_bytes() for path in files)
    for value in (secret, code, code.replace("-", "")):
        assert value.encode() not in raw
    with sqlite3.connect(database) as db:
        stored = db.execute("SELECT secret_hash FROM device WHERE id = ?", (created["device_id"],)).fetchone()[0]
        dump = "\n".join(db.iterdump())
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in dump and code.replace("-", "") not in dump


async def test_a_database_from_before_home_kits_opens_with_its_consultations(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    old_schema = SCHEMA.split("-- Home kits")[0]
    with sqlite3.connect(data / DATABASE_FILE) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO consultation (id, title, created_at) VALUES ('oldroom', 'Från förr', 1.0)")
    server, runner = await start_server(tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(server, http)
            assert (await api.consultation("oldroom"))["title"] == "Från förr"
            device_id, _ = await api.enrolled_kit()
            status, _ = await api.assign("oldroom", device_id)
            assert status == 200
    finally:
        await runner.cleanup()


def consultation(cid: str, scheduled_for: float | None, status: str = "open") -> Consultation:
    return Consultation(cid, cid, 0.0, scheduled_for, status)


def assigned(cid: str, called_at: float | None = None) -> Assignment:
    return Assignment(cid, "kit-x", 0.0, called_at)


@pytest.mark.parametrize(
    ("rows", "due", "upcoming", "changes_at"),
    [
        ([], None, None, None),
        ([(None, None)], None, None, None),  # no time and not called: never by itself
        ([(1000 + DUE_AHEAD, None)], "c0", None, None),  # starts in exactly ten minutes
        ([(1000 + DUE_AHEAD + 1, None)], None, "c0", 1001.0),
        ([(500, None), (900, None)], "c1", None, None),  # the latest of those that are due
        ([(900, None), (None, 50.0)], "c1", None, None),  # called beats scheduled
        ([(None, 50.0), (None, 60.0)], "c1", None, None),  # the latest call wins
        ([(5000, None), (3000, None)], None, "c1", 3000.0 - DUE_AHEAD),
    ],
)
def test_where_a_kit_belongs(
    rows: list[tuple[float | None, float | None]], due: str | None, upcoming: str | None, changes_at: float | None
) -> None:
    assigned_rows = [(assigned(f"c{i}", called), consultation(f"c{i}", when)) for i, (when, called) in enumerate(rows)]
    place = where_now(assigned_rows, now=1000.0)
    assert (place.due.id if place.due else None) == due
    assert (place.next.id if place.next else None) == upcoming
    assert place.changes_at == changes_at


def test_closed_consultations_never_call_a_kit() -> None:
    place = where_now([(assigned("c", 10.0), consultation("c", 900.0, status="closed"))], now=1000.0)
    assert (place.due, place.next) == (None, None)


async def test_a_scheduled_consultation_in_the_store_wakes_nothing_early(tmp_path: Path) -> None:
    store = ConsultationStore(tmp_path / "db.sqlite3")
    try:
        later = store.create("Senare", scheduled_for=time.time() + 3600)
        from signalling.tokens import TokenAuthority, TokenKeys

        kits = HomeKits(store, TokenAuthority(TokenKeys.shared_secret(b"k" * 32)))
        device, _ = kits.store.create("Kit 7", time.time())
        kits.store.assign(later.id, device.id, time.time())
        place = kits.whereabouts(device.id)
        assert place.due is None and place.next == later
        kits.clock = lambda: later.scheduled_for - 60  # type: ignore[operator]
        assert kits.whereabouts(device.id).due == later
    finally:
        store.close()


async def nara(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nara.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(), err.decode()


async def test_it_staff_create_list_and_revoke_kits_with_the_nara_command(server: RunningServer, api: Api) -> None:
    where = ("--server", server.url, "--data-dir", str(server.config.data_dir))
    code, out, err = await nara("device", "create", "--name", "Kit 9", *where)
    assert code == 0, err
    enrolment = re.search(r"Enrolment code: ([A-Z0-9]{4}-[A-Z0-9]{4})", out)
    device_id = re.search(r"Created (kit-\w+) \(Kit 9\)", out)
    assert enrolment and device_id, out
    status, enrolled = await api.enrol(enrolment.group(1))
    assert status == 200 and enrolled["device_id"] == device_id.group(1)

    code, out, err = await nara("device", "list", *where)
    assert code == 0, err
    assert device_id.group(1) in out and "Kit 9" in out and "enrolled" in out
    assert enrolled["secret"] not in out

    code, out, err = await nara("device", "revoke", device_id.group(1), *where)
    assert code == 0 and "Revoked" in out, err
    assert (await api.devices())[device_id.group(1)]["revoked"] is True

    code, out, err = await nara("device", "revoke", "kit-nope", *where)
    assert code == 1 and "device_unknown" in err
    elsewhere = str(server.config.data_dir / "elsewhere")
    code, out, err = await nara("device", "list", "--server", server.url, "--data-dir", elsewhere)
    assert code == 1 and "admin key" in err


async def test_a_waiting_kit_is_answered_when_assigned_to_a_consultation_under_way(
    server: RunningServer, api: Api
) -> None:
    device_id, secret = await api.enrolled_kit()
    started = server.hub.store.create("Pågår", scheduled_for=time.time() - 120).id
    poll = asyncio.ensure_future(api.session(device_id, secret, wait=25))
    await kits_of(server).until_waiting(device_id)
    await api.assign(started, device_id)
    status, answer = await asyncio.wait_for(poll, 5)
    assert status == 200 and (answer["state"], answer["consultation_id"]) == ("assigned", started)


async def test_a_stopping_server_answers_waiting_kits_instead_of_holding_them(tmp_path: Path) -> None:
    server, runner = await start_server(tmp_path)
    async with aiohttp.ClientSession() as http:
        api = Api(server, http)
        device_id, secret = await api.enrolled_kit()
        later = server.hub.store.create("Senare", scheduled_for=time.time() + 7200).id
        await api.assign(later, device_id)
        poll = asyncio.ensure_future(api.session(device_id, secret, wait=25))
        await kits_of(server).until_waiting(device_id)
        stopping = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - stopping < 5
        status, answer = await asyncio.wait_for(poll, 5)
    assert (status, answer) == (200, {"state": "idle", "next": {"consultation_id": later,
                                                                "scheduled_for": pytest.approx(time.time() + 7200,
                                                                                               abs=60)}})


async def test_a_consultation_created_with_a_kit_has_it_assigned_and_a_bad_kit_creates_nothing(api: Api) -> None:
    device_id, _ = await api.enrolled_kit()
    status, body = await api.call("POST", "/api/consultations", {"title": "Hembesök", "device_id": device_id},
                                  api.admin)
    assert status == 201, body
    assert body["kit"]["device_id"] == device_id
    assert (await api.consultation(body["id"]))["kit"]["device_id"] == device_id
    status, before = await api.call("GET", "/api/consultations", None, api.admin)
    for bad, code in (("kit-nosuchkit", "device_unknown"), (7, "device_id_invalid")):
        status, body = await api.call("POST", "/api/consultations", {"device_id": bad}, api.admin)
        assert body["error"]["code"] == code, body
    status, after = await api.call("GET", "/api/consultations", None, api.admin)
    assert len(after["consultations"]) == len(before["consultations"]), "nothing created for a bad kit"
