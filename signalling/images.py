"""Wound and symptom images: uploads, the care team's gallery and history, FHIR export, the access log.

Who may do what (docs/images.md):

- the kit, a nurse or a clinician uploads, with its join token for the
  consultation (a kit outside a call gets a 15-minute upload token with its
  device credential: ``POST /api/devices/{id}/upload-token``);
- the care team (clinician, nurse) of a consultation lists and views its
  images, and earlier images of the same ``patient_ref`` from other
  consultations; the image routes name the consultation whose token the
  request carries in ``?consultation=``;
- nobody else: patients, relatives, observers and kits are refused, and every
  view and every refusal is a row in the access log that IT staff export with
  the admin key.

Uploads are tus (tus.py); this module is their ``UploadPolicy``: it checks the
token and metadata, and with the last byte checks the whole image's SHA-256,
that it decodes as its type, stores it content-addressed with a thumbnail, and
announces ``image-added`` to the care team and kits in the room.
Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import jwt
from aiohttp import web

from . import fhir
from .bodysites import BODY_SITES, BodySite
from .devices import STATUS as DEVICE_STATUS
from .devices import DeviceError
from .imageformat import CONTENT_TYPES, NotAnImage, decode
from .imagestore import (
    AccessEntry,
    ImageStore,
    Person,
    StoredImage,
    Upload,
    UploadMetadata,
    access_log_csv,
    access_log_json,
    iso_utc,
)
from .rest import ApiError, api_error, json_body
from .store import Consultation, new_id, patient_ref_problem
from .tokens import JoinClaims, TokenError
from .tus import TusServer
from .ws import HUB, SignallingHub

__all__ = ["BODY_SITES", "IMAGES", "ImageService", "add_routes"]

logger = logging.getLogger(__name__)

CARE_TEAM = frozenset({"clinician", "nurse"})
UPLOADERS = frozenset({"clinician", "nurse", "kit"})
ANNOUNCED_TO = frozenset({"clinician", "nurse", "kit"})  # who in the room hears of a new image
UPLOAD_TOKEN_TTL = 15 * 60
CLEANUP_INTERVAL = 3600.0
CAPTURE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_DEVICE = 128
MAX_NOTE = 2000
MAX_QUALITY = 2000
MAX_FILENAME = 200
ADMIN = Person("admin", "IT staff (admin key)", "admin")

# Routes that check a join token or device credential themselves (see rest.SELF_AUTHENTICATED).
ROUTE_NAMES = {
    "options": "upload-options",
    "create": "upload-create",
    "head": "upload-head",
    "patch": "upload-patch",
}


def _metadata_error(key: str, message: str) -> ApiError:
    return api_error(400, "metadata_invalid", f"Upload-Metadata '{key}': {message}")


def _text(raw: dict[str, str], key: str, limit: int) -> str:
    value = raw.get(key, "").strip()
    if len(value) > limit:
        raise _metadata_error(key, f"at most {limit} characters.")
    return value


def _required(raw: dict[str, str], key: str) -> str:
    value = raw.get(key, "").strip()
    if not value:
        raise _metadata_error(key, "required.")
    return value


def parse_captured_at(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _metadata_error("captured_at", "not an ISO 8601 time.") from None
    if moment.tzinfo is None:
        raise _metadata_error("captured_at", "needs an offset or Z (e.g. 2025-03-01T10:15:00+01:00).")
    return moment


def upload_metadata(raw: dict[str, str], consultation: Consultation) -> UploadMetadata:
    """Validate an upload's metadata against its consultation (ApiError with the key at fault)."""
    capture_id = _required(raw, "image_id").lower()
    if not CAPTURE_ID.match(capture_id):
        raise _metadata_error("image_id", "must be a UUID (36 characters), chosen on the device.")
    sha256 = _required(raw, "sha256").lower()
    if not SHA256_HEX.match(sha256):
        raise _metadata_error("sha256", "must be the image's SHA-256 in hex (64 characters).")
    content_type = _required(raw, "content_type").lower()
    if content_type not in CONTENT_TYPES:
        raise api_error(415, "not_an_image", f"content_type must be one of {', '.join(CONTENT_TYPES)}.")
    body_site = _required(raw, "body_site")
    if body_site not in BODY_SITES:
        raise _metadata_error("body_site", "not one of the body sites in docs/images.md.")
    captured_at = parse_captured_at(_required(raw, "captured_at"))
    consent = _required(raw, "consent")
    if consent not in ("yes", "no"):
        raise _metadata_error("consent", "must be 'yes' or 'no'.")
    patient_ref = _text(raw, "patient_ref", 64)
    if patient_ref and (problem := patient_ref_problem(patient_ref)):
        raise _metadata_error("patient_ref", problem)
    if consultation.patient_ref and patient_ref and patient_ref != consultation.patient_ref:
        raise api_error(422, "patient_mismatch", "The upload names another patient than its consultation's.")
    mm_per_pixel: float | None = None
    if raw.get("mm_per_pixel", "").strip():
        try:
            mm_per_pixel = float(raw["mm_per_pixel"])
        except ValueError:
            mm_per_pixel = math.nan
        if not math.isfinite(mm_per_pixel) or not 0 < mm_per_pixel < 100:
            raise _metadata_error("mm_per_pixel", "a decimal number of millimetres per pixel, above 0.")
    quality: dict[str, Any] | None = None
    if raw.get("quality", "").strip():
        try:
            quality = json.loads(_text(raw, "quality", MAX_QUALITY))
        except ValueError:
            quality = None
        if not isinstance(quality, dict):
            raise _metadata_error("quality", "a JSON object of the device's quality checks.")
    filename = PurePosixPath(_text(raw, "filename", MAX_FILENAME).replace("\\", "/")).name
    return UploadMetadata(
        consultation=consultation.id,
        image_id=capture_id,
        sha256=sha256,
        content_type=content_type,
        body_site=body_site,
        captured_at=captured_at.isoformat(),
        consent=consent,
        device=_text(raw, "device", MAX_DEVICE),
        # Only the reference staff set on the consultation links images into a patient's
        # history: a device cannot put a photo into another patient's comparison.
        patient_ref=consultation.patient_ref or "",
        note=_text(raw, "note", MAX_NOTE),
        mm_per_pixel=mm_per_pixel,
        quality=quality,
        filename="".join(ch for ch in filename if ch.isprintable()),
    )


def bearer(request: web.Request) -> str | None:
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return supplied.strip() or None


def image_json(image: StoredImage, viewer: str) -> dict[str, Any]:
    """An image as the care team of consultation ``viewer`` sees it (its URLs name that consultation)."""
    site = BODY_SITES[image.body_site]
    return {
        "id": image.id,
        "capture_id": image.capture_id,
        "consultation": image.consultation_id,
        "patient_ref": image.patient_ref or None,
        "body_site": image.body_site,
        "body_site_label": site.label(),
        "note": image.note,
        "consent": image.consent,
        "captured_at": image.captured_at,
        "received_at": iso_utc(image.received_at),
        "device": image.device,
        "uploaded_by": image.uploader.public(),
        "sha256": image.sha256,
        "content_type": image.content_type,
        "bytes": image.bytes,
        "width": image.width,
        "height": image.height,
        "mm_per_pixel": image.mm_per_pixel,
        "quality": image.quality,
        "filename": image.filename,
        "url": f"/api/images/{image.id}?consultation={viewer}",
        "thumbnail_url": f"/api/images/{image.id}/thumbnail?consultation={viewer}",
    }


def _digests(data: bytes) -> tuple[str, str]:
    return hashlib.sha256(data).hexdigest(), hashlib.sha1(data).hexdigest()


@dataclass(frozen=True)
class Viewer:
    claims: JoinClaims
    consultation: Consultation

    @property
    def person(self) -> Person:
        return Person(self.claims.participant_id, self.claims.name, self.claims.role)


class ImageService:
    """The image routes' shared state, and the tus uploads' policy."""

    def __init__(self, hub: SignallingHub, store: ImageStore, max_size: int) -> None:
        self.hub = hub
        self.store = store
        self.max_size = max_size
        self.tus = TusServer(store, self)
        self._decoding = asyncio.Semaphore(1)  # one image in memory at a time
        self._cleanup: asyncio.Task[None] | None = None

    # --- the access log --------------------------------------------------------------------

    def log(self, request: web.Request | None, action: str, *, actor: Person | None = None, code: str | None = None,
            image: StoredImage | None = None, consultation_id: str | None = None,
            patient_ref: str | None = None) -> None:
        self.store.log_access(AccessEntry(
            action=action,
            outcome="refused" if code else "allowed",
            actor=actor,
            code=code,
            image_id=image.id if image else None,
            patient_ref=image.patient_ref if image else patient_ref,
            consultation_id=consultation_id,
            remote=request.remote if request is not None else None,
            user_agent=request.headers.get("User-Agent") if request is not None else None,
        ))

    def refuse(self, request: web.Request, action: str, status: int, code: str, message: str, *,
               actor: Person | None = None, image: StoredImage | None = None, consultation_id: str | None = None,
               patient_ref: str | None = None) -> ApiError:
        """Log a refusal and return the error to raise."""
        self.log(request, action, actor=actor, code=code, image=image, consultation_id=consultation_id,
                 patient_ref=patient_ref)
        logger.info("image %s refused from %s: %s", action, request.remote, code)
        return api_error(status, code, message)

    # --- who is asking ----------------------------------------------------------------------

    def _claims(
        self, request: web.Request, consultation_id: str, action: str, wrong_room: tuple[int, str]
    ) -> JoinClaims:
        token = bearer(request)
        if token is None:
            raise self.refuse(request, action, 401, "token_missing",
                              "Send the join token as 'Authorization: Bearer <token>'.",
                              consultation_id=consultation_id)
        try:
            claims = self.hub.authority.verify(token, consultation_id)
        except TokenError as exc:
            status, code = wrong_room if exc.code == "token_wrong_room" else (401, exc.code)
            actor = self._identify(token) if exc.code == "token_wrong_room" else None
            raise self.refuse(request, action, status, code, exc.message, actor=actor,
                              consultation_id=consultation_id) from None
        if claims.role == "kit" and self.hub.devices is not None:
            try:
                self.hub.devices.check_not_revoked(claims.participant_id)
            except DeviceError as exc:
                actor = Person(claims.participant_id, claims.name, claims.role)
                raise self.refuse(request, action, 403, exc.code, exc.message, actor=actor,
                                  consultation_id=consultation_id) from None
        return claims

    def _identify(self, token: str) -> Person | None:
        """Who a valid token for another consultation belongs to, for the access log."""
        try:
            room = str(jwt.decode(token, options={"verify_signature": False}).get("room", ""))
            claims = self.hub.authority.verify(token, room)
        except (jwt.PyJWTError, TokenError):
            return None
        return Person(claims.participant_id, claims.name, claims.role)

    def viewer(self, request: web.Request, action: str, consultation_id: str | None) -> Viewer:
        """The care team member of ``consultation_id`` this request comes from, or a logged refusal."""
        if not consultation_id:
            raise self.refuse(request, action, 400, "consultation_missing",
                              "Name the consultation whose token this is: ?consultation=<id>.")
        claims = self._claims(request, consultation_id, action, (403, "not_care_team"))
        person = Person(claims.participant_id, claims.name, claims.role)
        consultation = self.hub.store.get(consultation_id)
        if consultation is None:
            raise self.refuse(request, action, 404, "room_not_found", "There is no consultation with this id.",
                              actor=person, consultation_id=consultation_id)
        if claims.role not in CARE_TEAM:
            raise self.refuse(request, action, 403, "not_care_team",
                              "Only the consultation's clinicians and nurses may see its images.",
                              actor=person, consultation_id=consultation_id, patient_ref=consultation.patient_ref)
        return Viewer(claims, consultation)

    def may_see(self, viewer: Viewer, image: StoredImage) -> bool:
        if image.consultation_id == viewer.consultation.id:
            return True
        patient_ref = viewer.consultation.patient_ref
        return bool(patient_ref) and image.patient_ref == patient_ref

    def viewed_image(self, request: web.Request, action: str) -> tuple[Viewer, StoredImage]:
        viewer = self.viewer(request, action, request.query.get("consultation"))
        image = self.store.image(request.match_info["image_id"])
        if image is None:
            raise self.refuse(request, action, 404, "image_not_found", "There is no image with this id.",
                              actor=viewer.person, consultation_id=viewer.consultation.id)
        if not self.may_see(viewer, image):
            raise self.refuse(request, action, 403, "not_care_team",
                              "This image belongs to another patient's care.", actor=viewer.person, image=image,
                              consultation_id=viewer.consultation.id)
        self.log(request, action, actor=viewer.person, image=image, consultation_id=viewer.consultation.id)
        return viewer, image

    # --- tus UploadPolicy -------------------------------------------------------------------------

    async def begin(self, request: web.Request, length: int, metadata: dict[str, str]) -> Upload:
        consultation_id = metadata.get("consultation", "").strip()
        if not consultation_id:
            if bearer(request) is None:  # the token is what is missing first
                raise self.refuse(request, "upload", 401, "token_missing",
                                  "Send the join token as 'Authorization: Bearer <token>'.")
            raise _metadata_error("consultation", "required.")
        claims = self._claims(request, consultation_id, "upload", (403, "wrong_consultation"))
        person = Person(claims.participant_id, claims.name, claims.role)
        consultation = self.hub.store.get(consultation_id)
        if consultation is None:
            raise self.refuse(request, "upload", 404, "room_not_found", "There is no consultation with this id.",
                              actor=person, consultation_id=consultation_id)
        if claims.role not in UPLOADERS:
            raise self.refuse(request, "upload", 403, "upload_not_allowed",
                              "Only the home kit, a nurse or a clinician may add images.",
                              actor=person, consultation_id=consultation_id)
        if length > self.max_size:
            raise self.refuse(request, "upload", 413, "too_large",
                              f"An image may be at most {self.max_size} bytes.",
                              actor=person, consultation_id=consultation_id)
        try:
            checked = upload_metadata(metadata, consultation)
        except ApiError as exc:
            raise self.refuse(request, "upload", exc.status, exc.code, exc.message, actor=person,
                              consultation_id=consultation_id, patient_ref=consultation.patient_ref) from None
        upload, _ = self.store.create_upload(checked, length, person)
        if upload.metadata.sha256 != checked.sha256 or upload.length != length:
            raise self.refuse(request, "upload", 409, "image_id_conflict",
                              "This image_id was uploaded before with other bytes; a new capture needs a new id.",
                              actor=person, consultation_id=consultation_id, patient_ref=checked.patient_ref)
        if upload.discarded:
            raise self.refuse(request, "upload", 415, "not_an_image",
                              "This capture was uploaded before and was not a decodable image; it was discarded.",
                              actor=person, consultation_id=consultation_id, patient_ref=checked.patient_ref)
        return upload

    async def check_access(self, request: web.Request, upload: Upload) -> None:
        # Someone else's upload is "not found": never a hint that it exists.
        claims = self._claims(request, upload.consultation_id, "upload", (404, "upload_not_found"))
        if claims.role not in UPLOADERS:
            raise self.refuse(request, "upload", 403, "upload_not_allowed",
                              "Only the home kit, a nurse or a clinician may add images.",
                              actor=Person(claims.participant_id, claims.name, claims.role),
                              consultation_id=upload.consultation_id)

    async def finish(self, request: web.Request | None, upload: Upload) -> str:
        meta = upload.metadata
        path = self.store.partial_path(upload.id)
        async with self._decoding:
            data = await asyncio.to_thread(path.read_bytes)
            sha256, sha1 = await asyncio.to_thread(_digests, data)
            if sha256 != meta.sha256 or len(data) != upload.length:
                self.store.restart_upload(upload.id)
                logger.info("upload %s: the whole image did not match its sha256; started again", upload.id)
                raise api_error(460, "image_checksum_mismatch", "The whole image does not match its sha256; the "
                                "upload starts again from byte 0.")
            try:
                decoded = await asyncio.to_thread(decode, meta.content_type, data)
            except NotAnImage as exc:
                self.store.discard_upload(upload.id)
                if request is not None:
                    self.log(request, "upload", actor=upload.uploader, code="not_an_image",
                             consultation_id=upload.consultation_id, patient_ref=meta.patient_ref)
                logger.info("upload %s discarded: %s", upload.id, exc)
                raise api_error(415, "not_an_image", f"This is not a decodable image: {exc}.") from None
            await asyncio.to_thread(self.store.store_files, sha256, data, decoded.thumbnail)
        stored = self.store.complete_upload(upload, StoredImage(
            id=new_id(20),
            consultation_id=upload.consultation_id,
            capture_id=meta.image_id,
            patient_ref=meta.patient_ref,
            body_site=meta.body_site,
            note=meta.note,
            consent=meta.consent,
            captured_at=meta.captured_at,
            captured_ts=datetime.fromisoformat(meta.captured_at).timestamp(),
            received_at=self.store.clock(),
            device=meta.device,
            uploader=upload.uploader,
            sha256=sha256,
            sha1=sha1,
            content_type=meta.content_type,
            bytes=len(data),
            width=decoded.width,
            height=decoded.height,
            mm_per_pixel=meta.mm_per_pixel,
            quality=meta.quality,
            filename=meta.filename,
        ))
        self.log(request, "upload", actor=upload.uploader, image=stored, consultation_id=upload.consultation_id)
        logger.info("image %s stored for %s (%d bytes, %dx%d)", stored.id, stored.consultation_id, stored.bytes,
                    stored.width, stored.height)
        await self.hub.notify(stored.consultation_id, {"type": "image-added",
                                                       "image": image_json(stored, stored.consultation_id)},
                              ANNOUNCED_TO)
        return stored.id

    # --- housekeeping -------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        expired = self.store.expire_uploads()
        finished = await self.tus.finish_pending()
        if expired or finished:
            logger.info("uploads: %d expired, %d completed after a restart", expired, finished)
        self._cleanup = asyncio.ensure_future(self._hourly())

    async def stop(self, app: web.Application) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()

    async def _hourly(self) -> None:
        while True:
            await asyncio.sleep(CLEANUP_INTERVAL)
            expired = self.store.expire_uploads()
            if expired:
                logger.info("uploads: %d unfinished for 7 days removed", expired)


IMAGES: web.AppKey[ImageService] = web.AppKey("images", ImageService)


# --- HTTP --------------------------------------------------------------------------------------


IMAGE_HEADERS = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}


async def list_images(request: web.Request) -> web.Response:
    service = request.app[IMAGES]
    consultation_id = request.match_info["id"]
    history = request.query.get("history") in ("1", "true")
    body_site = request.query.get("body_site")
    action = "history" if history else "list"
    if body_site is not None and body_site not in BODY_SITES:
        raise api_error(400, "body_site_invalid", "body_site must be one of the body sites in docs/images.md.")
    if history and body_site is None:
        raise api_error(400, "body_site_invalid", "history=1 needs a body_site.")
    viewer = service.viewer(request, action, consultation_id)
    patient_ref = viewer.consultation.patient_ref
    if history and patient_ref:
        images = service.store.history(patient_ref, body_site or "")
    else:
        images = [i for i in service.store.images_of(consultation_id) if body_site in (None, i.body_site)]
    service.log(request, action, actor=viewer.person, consultation_id=consultation_id, patient_ref=patient_ref)
    return web.json_response({"images": [image_json(i, consultation_id) for i in images]},
                             headers={"Cache-Control": "no-store"})


async def get_image(request: web.Request) -> web.StreamResponse:
    service = request.app[IMAGES]
    _, image = service.viewed_image(request, "view")
    extension = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}[image.content_type]
    filename = image.filename or f"{image.body_site}-{image.id}.{extension}"
    return web.FileResponse(service.store.image_path(image.sha256), headers={
        **IMAGE_HEADERS,
        "Content-Type": image.content_type,
        "Content-Disposition": f"inline; filename=\"{filename.replace(chr(34), '')}\"",
    })


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    service = request.app[IMAGES]
    _, image = service.viewed_image(request, "thumbnail")
    return web.FileResponse(service.store.thumbnail_path(image.sha256),
                            headers={**IMAGE_HEADERS, "Content-Type": "image/jpeg"})


async def get_fhir(request: web.Request) -> web.Response:
    service = request.app[IMAGES]
    viewer, image = service.viewed_image(request, "fhir")
    site: BodySite = BODY_SITES[image.body_site]
    if request.query.get("attachment") == "data":
        data = await asyncio.to_thread(service.store.image_path(image.sha256).read_bytes)
        resource = fhir.media(image, site, data=data)
    else:
        url = f"{service.hub.config.base_url}/api/images/{image.id}?consultation={viewer.consultation.id}"
        resource = fhir.media(image, site, url=url)
    return web.json_response(resource, content_type="application/fhir+json", headers={"Cache-Control": "no-store"})


def _moment(request: web.Request, key: str) -> float | None:
    raw = request.query.get(key)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise api_error(400, f"{key}_invalid", f"{key} must be Unix seconds or an ISO 8601 time.") from None
    if moment.tzinfo is None:
        raise api_error(400, f"{key}_invalid", f"{key} needs an offset or Z.")
    return moment.timestamp()


async def export_access_log(request: web.Request) -> web.Response:
    """IT staff (admin key, checked by rest.require_admin) export the access log as JSON or CSV."""
    service = request.app[IMAGES]
    since, until = _moment(request, "since"), _moment(request, "until")
    kind = request.query.get("format", "json")
    if kind not in ("json", "csv"):
        raise api_error(400, "format_invalid", "format must be json or csv.")
    records = service.store.access_log(since, until)
    service.log(request, "audit", actor=ADMIN)
    headers = {"Cache-Control": "no-store"}
    if kind == "csv":
        headers["Content-Disposition"] = 'attachment; filename="image-access.csv"'
        return web.Response(text=access_log_csv(records), content_type="text/csv", charset="utf-8", headers=headers)
    return web.json_response(access_log_json(records), headers=headers)


async def upload_token(request: web.Request) -> web.Response:
    """A kit outside a call gets a short upload token for a consultation it is or was assigned to.

    A photo may wait days in a kit's outbox on a bad link; the consultation's
    assignment may have ended meanwhile, and the photo must still arrive.
    """
    hub = request.app[HUB]
    kits = hub.devices
    assert kits is not None
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() not in ("device", "bearer") or not secret.strip():
        raise api_error(401, "device_credential_missing",
                        "Send the kit's secret as 'Authorization: Device <secret>'.")
    try:
        device = kits.store.authenticate(request.match_info["device_id"], secret.strip())
        if device.revoked:
            raise DeviceError("device_revoked", "IT staff revoked this home kit; enrol it again.")
    except DeviceError as exc:
        raise api_error(DEVICE_STATUS.get(exc.code, 400), exc.code, exc.message) from None
    consultation_id = (await json_body(request)).get("consultation")
    if not isinstance(consultation_id, str) or not kits.store.ever_assigned(device.id, consultation_id):
        raise api_error(403, "kit_not_assigned", "This home kit was never assigned to that consultation.")
    token, claims = hub.authority.mint(consultation_id, device.name, "kit", UPLOAD_TOKEN_TTL, device.id)
    logger.info("device %s got an upload token for %s", device.id, consultation_id)
    return web.json_response({"token": token, "expires_at": claims.expires_at, "consultation": consultation_id,
                              "participant_id": claims.participant_id})


def add_routes(app: web.Application, store: ImageStore) -> ImageService:
    """The image routes and their service (started and stopped with the app).

    Every route here but the access log's checks its own credentials; their names are in
    rest.SELF_AUTHENTICATED so the admin-key middleware leaves them alone.
    """
    hub = app[HUB]
    service = ImageService(hub, store, hub.config.upload_max_size)
    app[IMAGES] = service
    service.tus.add_routes(app, ROUTE_NAMES)
    app.router.add_get("/api/consultations/{id}/images", list_images, name="images-list")
    app.router.add_get("/api/images/{image_id}", get_image, name="image-get")
    app.router.add_get("/api/images/{image_id}/thumbnail", get_thumbnail, name="image-thumbnail")
    app.router.add_get("/api/images/{image_id}/fhir", get_fhir, name="image-fhir")
    app.router.add_get("/api/audit/image-access", export_access_log)
    app.router.add_post("/api/devices/{device_id}/upload-token", upload_token, name="device-upload-token")
    app.on_startup.append(service.start)
    app.on_shutdown.append(service.stop)
    return service
