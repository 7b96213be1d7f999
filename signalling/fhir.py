"""A stored image as a FHIR R4 ``Media`` resource, for the patient record.

The patient is named only by the consultation's pseudonymous reference (an
identifier-only reference in the ``urn:nara:patient-ref`` system); the body
site is coded in SNOMED CT with the side in ``bodySite.text``.
``content.hash`` is the base64 SHA-1 of the bytes, as R4's Attachment asks.
"""

from __future__ import annotations

import base64
from typing import Any

from .bodysites import BodySite
from .imagestore import StoredImage, iso_utc

MEDIA_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/media-type"
SNOMED_CT = "http://snomed.info/sct"
PATIENT_REF_SYSTEM = "urn:nara:patient-ref"
IMAGE_ID_SYSTEM = "urn:nara:image"


def media(image: StoredImage, site: BodySite, *, url: str | None = None, data: bytes | None = None) -> dict[str, Any]:
    """The Media resource; ``content`` carries either the image's ``url`` or its bytes (``data``)."""
    content: dict[str, Any] = {
        "contentType": image.content_type,
        "size": image.bytes,
        "hash": base64.b64encode(bytes.fromhex(image.sha1)).decode("ascii"),
        "title": image.filename or f"{site.en}, {image.captured_at}",
        "creation": image.captured_at,
    }
    if data is not None:
        content["data"] = base64.b64encode(data).decode("ascii")
    elif url is not None:
        content["url"] = url
    body_site: dict[str, Any] = {"text": site.en}
    if site.snomed is not None:
        body_site["coding"] = [{"system": SNOMED_CT, "code": site.snomed}]
    resource: dict[str, Any] = {
        "resourceType": "Media",
        "id": image.id,
        "identifier": [{"system": IMAGE_ID_SYSTEM, "value": image.id}],
        "status": "completed",
        "type": {"coding": [{"system": MEDIA_TYPE_SYSTEM, "code": "image", "display": "Image"}]},
        "createdDateTime": image.captured_at,
        "issued": iso_utc(image.received_at),
        "bodySite": body_site,
        "height": image.height,
        "width": image.width,
        "content": content,
    }
    if image.patient_ref:
        resource["subject"] = {"identifier": {"system": PATIENT_REF_SYSTEM, "value": image.patient_ref}}
    if image.device:
        resource["device"] = {"display": image.device}
    if image.note:
        resource["note"] = [{"text": image.note}]
    return resource
