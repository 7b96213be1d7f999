"""Image events on the signalling WebSocket: a new image reaches the team and the kit; a photo can be asked for."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from signalling.client import ConsultationClient

from .conftest import RunningServer
from .image_helpers import TusClient, metadata, photo


@pytest.fixture
async def room_with_people(server: RunningServer) -> AsyncIterator[tuple[str, dict[str, ConsultationClient]]]:
    room = server.consultation()
    people = {
        role: ConsultationClient(server.url, room, server.token(room, f"The {role}", role, participant_id=role),
                                 publish=False)
        for role in ("clinician", "nurse", "kit", "relative")
    }
    for client in people.values():
        await client.join()
    yield room, people
    for client in people.values():
        await client.close()


def of_type(client: ConsultationClient, kind: str) -> list[dict[str, object]]:
    return [e for e in client.events if e.get("type") == kind]


async def test_a_stored_image_reaches_the_care_team_and_the_kit_in_the_room(
    server: RunningServer, room_with_people: tuple[str, dict[str, ConsultationClient]]
) -> None:
    room, people = room_with_people
    data = photo(640, 480)
    async with aiohttp.ClientSession() as http:
        reply = await TusClient(http, server.url, server.token(room, "Kit 7", "kit")).upload(
            data, metadata(room, data, body_site="sacrum"))
    assert reply.status == 204
    for role in ("clinician", "nurse", "kit"):
        client = people[role]
        await client.wait_for(lambda c=client: bool(of_type(c, "image-added")))
        [event] = of_type(client, "image-added")
        image = event["image"]
        assert isinstance(image, dict)
        assert image["id"] == reply.headers["Nara-Image-Id"]
        assert image["body_site"] == "sacrum" and image["consultation"] == room
        assert image["thumbnail_url"] == f"/api/images/{image['id']}/thumbnail?consultation={room}"
    # The event went out before the upload's answer. The relative's next message is answered after anything
    # the server sent it before: its refusal arrives, and no image-added before it.
    relative = people["relative"]
    await relative.send({"type": "request-photo", "body_site": "sacrum"})
    await relative.wait_for(lambda: bool(relative.errors))
    assert [e["code"] for e in relative.errors] == ["photo_not_allowed"]
    assert of_type(relative, "image-added") == []
    assert of_type(relative, "photo-requested") == []


async def test_the_team_asks_for_a_photo_and_everyone_in_the_room_hears_it(
    room_with_people: tuple[str, dict[str, ConsultationClient]]
) -> None:
    _, people = room_with_people
    nurse = people["nurse"]
    await nurse.send({"type": "request-photo", "body_site": "elbow"})
    await nurse.wait_for(lambda: bool(nurse.errors))
    assert [e["code"] for e in nurse.errors] == ["message_invalid"]
    await nurse.send({"type": "request-photo", "body_site": "heel_left", "note": "Vänster häl, nära"})
    for client in people.values():
        await client.wait_for(lambda c=client: bool(of_type(c, "photo-requested")))
        assert of_type(client, "photo-requested") == [{
            "type": "photo-requested",
            "by": {"id": "nurse", "name": "The nurse", "role": "nurse"},
            "body_site": "heel_left",
            "note": "Vänster häl, nära",
        }]
    kit = people["kit"]
    await kit.send({"type": "request-photo"})
    await kit.wait_for(lambda: bool(kit.errors))
    assert kit.errors[0]["code"] == "photo_not_allowed"
    clinician = people["clinician"]
    await clinician.send({"type": "request-photo"})
    await clinician.wait_for(lambda: len(of_type(clinician, "photo-requested")) == 2)
    assert of_type(clinician, "photo-requested")[1]["body_site"] is None
