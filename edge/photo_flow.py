"""The nurse's photo flow on the kit's screen: take, judge, retake or keep, describe, and into the outbox.

One photo at a time is on the screen (``Pending``): the still's JPEG at full
quality, a preview, and the checks' verdict (``edge/photos.py``). "Ta om"
drops it; "Spara" with the form (body site, note, consent) puts it in the
durable outbox (``edge/outbox.py``), which delivers it. A clinician's
``photo-requested`` event (docs/images.md) is kept as the prompt the page
shows, with the body site to preselect, until a photo of that site is saved
(the nurse may put the prompt off for later; the page then only hides it).

Everything the page shows comes from ``public()``: the prompt and the queue,
each photo's state from the outbox and the uploader's progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from signalling.bodysites import BODY_SITES

from .config import EdgeConfig
from .media import KitMedia
from .outbox import DELIVERED, MAX_NOTE, Outbox, OutboxError, OutboxItem, PhotoMetadata
from .photos import Examined, examine, thresholds_for

logger = logging.getLogger(__name__)

QUEUE_SHOWN = 8  # finished photos the page lists (besides every one still waiting or refused)


class PhotoFormError(Exception):
    """The nurse's form cannot be saved as it is; ``code`` names the text the page shows, ``field`` the input."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PhotoRequest:
    """A clinician's request for a photo, as the kit's screen shows it."""

    by: str  # the requester's name
    role: str
    body_site: str | None  # a key of BODY_SITES, or None
    note: str
    at: float  # time.time()

    @classmethod
    def from_event(cls, event: dict[str, Any], now: float) -> PhotoRequest:
        by = event.get("by")
        if not isinstance(by, dict):
            by = {}
        site = event.get("body_site")
        note = event.get("note")
        return cls(str(by.get("name", "")), str(by.get("role", "")),
                   site if isinstance(site, str) and site in BODY_SITES else None,
                   note if isinstance(note, str) else "", now)

    def public(self) -> dict[str, Any]:
        site = BODY_SITES.get(self.body_site) if self.body_site is not None else None
        return {"by": self.by, "role": self.role, "body_site": self.body_site,
                "label": site.label() if site is not None else None, "note": self.note}


@dataclass(frozen=True)
class Pending:
    """The photo on the screen, not yet kept."""

    id: str
    captured_at: datetime
    examined: Examined

    def public(self) -> dict[str, Any]:
        quality = self.examined.quality
        scale = self.examined.scale
        return {
            "id": self.id, "width": self.examined.width, "height": self.examined.height,
            "bytes": len(self.examined.jpeg),
            "ok": quality.ok, "problems": [{"code": p.code, "sv": p.sv, "en": p.en} for p in quality.problems],
            "quality": quality.metadata(), "mm_per_pixel": scale.mm_per_pixel if scale is not None else None,
            "preview": f"/photo/{self.id}/preview.jpg",
        }


def body_sites() -> list[dict[str, str]]:
    """The fixed list for the form, in its order: key and both languages' labels."""
    return [{"key": site.key, "sv": site.sv, "en": site.en} for site in BODY_SITES.values()]


def read_form(form: dict[str, Any]) -> tuple[str, str, bool]:
    """(body site, note, consent) from the page's form; raises ``PhotoFormError``."""
    site = form.get("body_site")
    if not isinstance(site, str) or site not in BODY_SITES:
        raise PhotoFormError("body_site_missing", "body_site", "choose where on the body the photo was taken")
    note = form.get("note") or ""
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise PhotoFormError("note_too_long", "note", f"the note may have at most {MAX_NOTE} characters")
    consent = form.get("consent")
    if consent not in ("yes", "no"):
        raise PhotoFormError("consent_missing", "consent", "say whether the patient agreed to the photo")
    return site, note.strip(), consent == "yes"


class PhotoFlow:
    """The kit's photo flow; ``on_change`` is called (on the event loop) whenever what the page shows changed."""

    def __init__(self, config: EdgeConfig, on_change: Callable[[], None]) -> None:
        self.config = config
        self.on_change = on_change
        self.request: PhotoRequest | None = None
        self.pending: Pending | None = None
        self.outbox: Outbox | None = None  # set by the agent once open
        self.uploader_status: Callable[[], dict[str, Any]] | None = None
        self._taking = asyncio.Lock()

    # --- the clinician's request ----------------------------------------------------------------

    def requested(self, event: dict[str, Any]) -> None:
        self.request = PhotoRequest.from_event(event, time.time())
        logger.info("photo requested by %s (%s), body site %s", self.request.by, self.request.role,
                    self.request.body_site or "not given")
        self.on_change()

    # --- taking and keeping -----------------------------------------------------------------------

    async def take(self, media: KitMedia) -> Pending:
        """A still from the camera, judged; it replaces the photo on the screen. Raises ``StillFailed``."""
        async with self._taking:
            still = await media.still()
            captured_at = datetime.now(UTC).astimezone()
            thresholds = thresholds_for(self.config.data_dir, self.config.camera)  # a calibration meanwhile counts
            examined = await asyncio.get_running_loop().run_in_executor(
                None, examine, still, thresholds, self.config.marker_mm)
            self.pending = Pending(uuid.uuid4().hex, captured_at, examined)
            logger.info("photo taken: %dx%d, %d bytes, quality %s", examined.width, examined.height,
                        len(examined.jpeg), examined.quality.metadata())
            return self.pending

    def discard(self, photo_id: str) -> bool:
        if self.pending is None or self.pending.id != photo_id:
            return False
        self.pending = None
        return True

    async def save(self, photo_id: str, form: dict[str, Any], *, consultation: str | None, device: str,
                   patient_ref: str = "") -> OutboxItem:
        """Keep the photo on the screen in the outbox with the form's metadata.

        Raises ``PhotoFormError`` (the form, or nothing to keep) or ``OutboxError`` (it could not be stored:
        nothing was kept, the photo stays on the screen).
        """
        pending = self.pending
        if pending is None or pending.id != photo_id:
            raise PhotoFormError("photo_gone", "photo", "this photo is no longer on the screen: take it again")
        site, note, consent = read_form(form)
        if not consultation:
            raise PhotoFormError("no_consultation", "photo",
                                 "the kit has not been in a consultation yet, so the photo has nowhere to go")
        if self.outbox is None:
            raise OutboxError("outbox_unavailable", "the photo outbox is not open")
        examined = pending.examined
        metadata = PhotoMetadata(
            consultation=consultation, body_site=site, consent=consent, captured_at=pending.captured_at,
            device=device[:128], patient_ref=patient_ref, note=note,
            mm_per_pixel=examined.scale.mm_per_pixel if examined.scale is not None else None,
            quality=examined.quality.metadata(), content_type="image/jpeg",
            filename=f"{site}-{pending.captured_at.strftime('%Y%m%d-%H%M%S')}.jpg",
        )
        item = await asyncio.get_running_loop().run_in_executor(None, self.outbox.add, examined.jpeg, metadata)
        if self.pending is pending:
            self.pending = None
        if self.request is not None and (self.request.body_site in (None, site)):
            self.request = None  # answered
        self.on_change()
        return item

    # --- what the page shows -------------------------------------------------------------------------

    def public(self) -> dict[str, Any]:
        return {
            "request": self.request.public() if self.request is not None else None,
            "queue": self.queue(),
            "uploader": self.uploader_status() if self.uploader_status is not None else None,
        }

    def queue(self) -> list[dict[str, Any]]:
        """Newest first: every photo still waiting, refused or damaged, and the last few delivered."""
        if self.outbox is None:
            return []
        items = self.outbox.items()
        uploading = self.uploader_status() if self.uploader_status is not None else {}
        shown: list[dict[str, Any]] = []
        delivered = 0
        for item in reversed(items):
            if item.state == DELIVERED:
                delivered += 1
                if delivered > QUEUE_SHOWN:
                    continue
            shown.append(_queue_entry(item, uploading))
        return shown


def _queue_entry(item: OutboxItem, uploading: dict[str, Any]) -> dict[str, Any]:
    entry = item.public()
    site = BODY_SITES.get(item.metadata.body_site)
    entry["label"] = site.label() if site is not None else {"sv": item.metadata.body_site,
                                                             "en": item.metadata.body_site}
    sent = item.sent
    if uploading.get("image") == item.id and uploading.get("state") == "sending":
        sent = max(sent, int(uploading.get("sent") or 0))
        entry["state"] = "sending"
    entry["percent"] = min(100, round(100 * sent / item.size)) if item.size else 0
    return entry
