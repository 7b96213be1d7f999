"""Who may see wound images, the access log that records every look and refusal, history and FHIR export."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from signalling.bodysites import BODY_SITES
from signalling.store import ConsultationStore

from .conftest import RunningServer
from .image_helpers import TusClient, get, metadata, photo

FHIR_DATETIME = re.compile(
    r"^([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)"
    r"(\.[0-9]{1,9})?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$"
)
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


async def consultation(server: RunningServer, title: str, patient_ref: str | None = None) -> str:
    body: dict[str, Any] = {"title": title}
    if patient_ref is not None:
        body["patient_ref"] = patient_ref
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
        async with http.post(f"{server.url}/api/consultations", json=body) as r:
            assert r.status == 201, await r.text()
            created = await r.json()
            assert created["patient_ref"] == patient_ref
            return str(created["id"])


async def add_image(server: RunningServer, room: str, seed: int, **meta: str) -> tuple[str, bytes]:
    data = photo(640, 480, seed=seed)
    async with aiohttp.ClientSession() as http:
        reply = await TusClient(http, server.url, server.token(room, "Kit 7", "kit")).upload(
            data, metadata(room, data, **meta))
        assert reply.status == 204, reply
        return reply.headers["Nara-Image-Id"], data


async def access_log(server: RunningServer, **query: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
        async with http.get(f"{server.url}/api/audit/image-access", params=query) as r:
            assert r.status == 200
            entries: list[dict[str, Any]] = (await r.json())["entries"]
            return entries


async def test_only_the_care_team_sees_images_and_every_refusal_is_logged(server: RunningServer) -> None:
    room = await consultation(server, "Hemsjukvård", "P-1001")
    other = await consultation(server, "Annan patient", "P-2002")
    image_id, _ = await add_image(server, room, 1)
    own = f"{server.url}/api/images/{image_id}?consultation={room}"
    async with aiohttp.ClientSession() as http:
        for role in ("relative", "patient", "observer", "kit"):
            token = server.token(room, f"A {role}", role)
            for url in (own, own.replace("?", "/thumbnail?"), own.replace("?", "/fhir?"),
                        f"{server.url}/api/consultations/{room}/images"):
                reply = await get(http, url, token)
                assert (reply.status, reply.code) == (403, "not_care_team"), (role, url)
                assert reply.body != photo(640, 480, seed=1)
        stranger = server.token(other, "Dr Annan", "clinician")
        refused = await get(http, f"{server.url}/api/images/{image_id}?consultation={other}", stranger)
        assert (refused.status, refused.code) == (403, "not_care_team"), "another patient's clinician"
        borrowed = await get(http, own, stranger)
        assert (borrowed.status, borrowed.code) == (403, "not_care_team"), "naming a consultation not its own"
        assert (await get(http, own, None)).code == "token_missing"
        assert (await get(http, f"{server.url}/api/images/{image_id}", server.token(room))).code == \
            "consultation_missing"
        unknown = await get(http, f"{server.url}/api/images/nosuchimage?consultation={room}", server.token(room))
        assert (unknown.status, unknown.code) == (404, "image_not_found")
        listing = await get(http, f"{server.url}/api/consultations/{other}/images", stranger)
        assert listing.body == {"images": []}

    refusals = [e for e in await access_log(server) if e["outcome"] == "refused"]
    roles = [e["actor_role"] for e in refusals if e["code"] == "not_care_team"]
    assert sorted(set(roles)) == ["clinician", "kit", "observer", "patient", "relative"]
    assert len([r for r in roles if r != "clinician"]) == 16
    assert {e["action"] for e in refusals} >= {"view", "thumbnail", "fhir", "list"}
    stranger_entry = next(e for e in refusals if e["actor_name"] == "Dr Annan" and e["image_id"] == image_id)
    assert stranger_entry["patient_ref"] == "P-1001" and stranger_entry["consultation_id"] == other
    assert any(e["code"] == "token_missing" and e["actor_id"] is None for e in refusals)
    assert any(e["code"] == "image_not_found" for e in refusals)
    assert all(e["remote"] == "127.0.0.1" for e in refusals)


async def test_every_look_is_logged_and_the_log_cannot_be_changed(server: RunningServer) -> None:
    room = await consultation(server, "Hemsjukvård", "P-1001")
    started = time.time()
    image_id, _ = await add_image(server, room, 1)
    nurse = server.token(room, "Sjuksköterska Ek", "nurse", participant_id="nurse-ek")
    async with aiohttp.ClientSession(headers={"User-Agent": "=cmd|' /C calc'!A0"}) as http:
        base = f"{server.url}/api/images/{image_id}"
        for url in (f"{server.url}/api/consultations/{room}/images", f"{base}?consultation={room}",
                    f"{base}/thumbnail?consultation={room}", f"{base}/fhir?consultation={room}",
                    f"{server.url}/api/consultations/{room}/images?body_site=heel_left&history=1"):
            assert (await get(http, url, nurse)).status == 200

    entries = await access_log(server, since=str(started - 1))
    upload = entries[0]
    assert (upload["action"], upload["actor_role"], upload["image_id"], upload["outcome"]) == \
        ("upload", "kit", image_id, "allowed")
    looks = [(e["action"], e["actor_id"], e["image_id"], e["patient_ref"], e["consultation_id"], e["outcome"])
             for e in entries[1:]]
    assert looks == [
        ("list", "nurse-ek", None, "P-1001", room, "allowed"),
        ("view", "nurse-ek", image_id, "P-1001", room, "allowed"),
        ("thumbnail", "nurse-ek", image_id, "P-1001", room, "allowed"),
        ("fhir", "nurse-ek", image_id, "P-1001", room, "allowed"),
        ("history", "nurse-ek", None, "P-1001", room, "allowed"),
    ]
    assert all(FHIR_DATETIME.match(e["time"]) for e in entries)
    assert await access_log(server, since=str(time.time() + 60)) == []
    assert len(await access_log(server, until=str(started - 1))) == 0

    async with aiohttp.ClientSession() as http:
        url = f"{server.url}/api/audit/image-access?format=csv"
        async with http.get(url) as r:
            assert r.status == 401, "the access log is for IT staff with the admin key"
        async with http.get(url, headers={"Authorization": f"Bearer {server.admin_key}"}) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            rows = list(csv.DictReader(io.StringIO(await r.text())))
    views = [row for row in rows if row["action"] == "view"]
    assert [(v["actor_name"], v["image_id"], v["outcome"]) for v in views] == [("Sjuksköterska Ek", image_id,
                                                                                 "allowed")]
    assert views[0]["user_agent"].startswith("'="), "a spreadsheet shows a sender's formula as text"
    assert rows[-1]["action"] == "audit" and rows[-1]["actor_id"] == "admin"

    db = sqlite3.connect(server.config.data_dir / "nara.sqlite3")
    try:
        with pytest.raises(sqlite3.DatabaseError, match="cannot be changed"):
            db.execute("UPDATE image_access SET outcome = 'refused'")
        with pytest.raises(sqlite3.DatabaseError, match="cannot be changed"):
            db.execute("DELETE FROM image_access")
    finally:
        db.close()
    assert len(await access_log(server)) == len(rows) + 1


async def test_history_compares_a_body_site_across_consultations_of_the_same_patient(server: RunningServer) -> None:
    last_week = await consultation(server, "Förra veckan", "P-1001")
    today = await consultation(server, "Idag", "P-1001")
    someone_else = await consultation(server, "Annan", "P-2002")
    unnamed = await consultation(server, "Utan referens")
    old, _ = await add_image(server, last_week, 1, captured_at="2025-03-01T09:00:00+01:00")
    new, _ = await add_image(server, today, 2, captured_at="2025-03-08T09:30:00+01:00")
    sacrum, _ = await add_image(server, today, 3, body_site="sacrum", captured_at="2025-03-08T09:35:00+01:00")
    theirs, _ = await add_image(server, someone_else, 4, captured_at="2025-03-08T10:00:00+01:00")
    device_named, _ = await add_image(server, unnamed, 5, patient_ref="P-1001")
    clinician = server.token(today, "Dr Berg", "clinician")
    async with aiohttp.ClientSession() as http:
        history = await get(http, f"{server.url}/api/consultations/{today}/images?body_site=heel_left&history=1",
                            clinician)
        # A device naming a patient cannot put a photo into that patient's history: only the
        # reference staff set on a consultation links it.
        assert [i["id"] for i in history.body["images"]] == [new, old]
        assert {i["consultation"] for i in history.body["images"]} == {last_week, today}
        assert device_named not in {i["id"] for i in history.body["images"]}
        assert all(i["url"].endswith(f"?consultation={today}") for i in history.body["images"])
        earlier = await get(http, f"{server.url}{history.body['images'][-1]['url']}", clinician)
        assert earlier.status == 200, "an earlier image of the same patient, under today's token"
        listing = await get(http, f"{server.url}/api/consultations/{today}/images", clinician)
        assert [i["id"] for i in listing.body["images"]] == [sacrum, new], "newest first"
        filtered = await get(http, f"{server.url}/api/consultations/{today}/images?body_site=sacrum", clinician)
        assert [i["id"] for i in filtered.body["images"]] == [sacrum]
        refused = await get(http, f"{server.url}/api/images/{theirs}?consultation={today}", clinician)
        assert refused.code == "not_care_team"
        mismatch = await TusClient(http, server.url, server.token(today, role="kit")).create(
            metadata(today, b"x", patient_ref="P-2002"), 100)
        assert (mismatch.status, mismatch.code) == (422, "patient_mismatch")
        bad = await get(http, f"{server.url}/api/consultations/{today}/images?body_site=elbow", clinician)
        assert bad.code == "body_site_invalid"


async def test_patient_refs_are_pseudonyms(server: RunningServer, tmp_path: Path) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_key}"}) as http:
        for bad in ("19121212-1212", "121212-1212", "x y", "", "a" * 65, 42):
            async with http.post(f"{server.url}/api/consultations", json={"title": "T", "patient_ref": bad}) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "patient_ref_invalid", bad
    old = tmp_path / "old.sqlite3"  # a database from before patient references
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE consultation (id TEXT PRIMARY KEY, title TEXT NOT NULL, created_at REAL NOT NULL, "
               "scheduled_for REAL, status TEXT NOT NULL DEFAULT 'open')")
    db.execute("INSERT INTO consultation VALUES ('abc', 'Gammal', 1.0, NULL, 'open')")
    db.commit()
    db.close()
    store = ConsultationStore(old)
    try:
        kept = store.get("abc")
        assert kept is not None and (kept.title, kept.patient_ref) == ("Gammal", None)
        assert store.create("Ny", patient_ref="P-3").patient_ref == "P-3"
    finally:
        store.close()


async def test_fhir_export_is_an_r4_media_resource(server: RunningServer) -> None:
    room = await consultation(server, "Hemsjukvård", "P-1001")
    image_id, data = await add_image(server, room, 9, body_site="heel_right", note="Sår, 2 x 3 cm")
    nurse = server.token(room, role="nurse")
    async with aiohttp.ClientSession() as http:
        by_url = await get(http, f"{server.url}/api/images/{image_id}/fhir?consultation={room}", nurse)
        assert by_url.headers["Content-Type"].startswith("application/fhir+json")
        with_data = await get(http, f"{server.url}/api/images/{image_id}/fhir?consultation={room}&attachment=data",
                              nurse)
    for resource in (by_url.body, with_data.body):
        assert resource["resourceType"] == "Media"
        assert FHIR_ID.match(resource["id"])
        assert resource["status"] == "completed"  # required, from the event-status value set
        assert resource["type"]["coding"] == [{"system": "http://terminology.hl7.org/CodeSystem/media-type",
                                               "code": "image", "display": "Image"}]
        assert resource["subject"] == {"identifier": {"system": "urn:nara:patient-ref", "value": "P-1001"}}
        assert resource["identifier"] == [{"system": "urn:nara:image", "value": image_id}]
        assert FHIR_DATETIME.match(resource["createdDateTime"])
        assert resource["createdDateTime"] == "2025-03-04T10:15:00+01:00"
        assert FHIR_DATETIME.match(resource["issued"])  # an instant: seconds and a zone
        assert resource["bodySite"] == {"coding": [{"system": "http://snomed.info/sct", "code": "76853006"}],
                                        "text": "Right heel"}
        assert resource["device"] == {"display": "Kit 7"}
        assert (resource["width"], resource["height"]) == (640, 480)
        assert all(isinstance(resource[k], int) and resource[k] > 0 for k in ("width", "height"))
        assert resource["note"] == [{"text": "Sår, 2 x 3 cm"}]
        content = resource["content"]  # required Attachment
        assert content["contentType"] == "image/jpeg"
        assert isinstance(content["size"], int) and content["size"] == len(data)
        assert base64.b64decode(content["hash"], validate=True) == hashlib.sha1(data).digest()
        assert FHIR_DATETIME.match(content["creation"])
        assert isinstance(content["title"], str) and content["title"]
        assert not {k for k, v in resource.items() if v in (None, "", [], {})}, "FHIR has no empty elements"
    assert by_url.body["content"]["url"] == f"{server.url}/api/images/{image_id}?consultation={room}"
    assert "data" not in by_url.body["content"]
    assert base64.b64decode(with_data.body["content"]["data"], validate=True) == data
    assert "url" not in with_data.body["content"]


def test_every_body_site_has_both_labels_and_a_code_but_other() -> None:
    assert len(BODY_SITES) == 19
    for key, site in BODY_SITES.items():
        assert site.sv and site.en and site.key == key
        assert (site.snomed is None) == (key == "other")
        assert site.snomed is None or site.snomed.isdigit()
