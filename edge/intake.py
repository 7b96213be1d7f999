"""``nara edge photo`` and ``nara edge upload``: an existing photo into the kit's outbox, and delivering it.

``nara edge photo`` runs beside the kit's agent (the outbox takes a second
process safely) and puts a photo file taken some other way into the outbox,
after the checks the server would make: it must be a JPEG, PNG or WebP that
decodes, of a body site from the list, with the consent answered. It belongs
to the consultation given, or else to the one the agent last recorded for
the kit. The running agent picks it up within a second.

``nara edge upload`` delivers the outbox without the rest of the agent (for
a kit whose agent is stopped: beside a running agent both would send the same
photo, which the server takes once, but the bytes twice), and with
``--until-empty`` returns once nothing is waiting (exit 1 if the kit's
credential no longer works, 2 for a configuration that cannot be used).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

from signalling.bodysites import BODY_SITES
from signalling.imageformat import CONTENT_TYPES, NotAnImage, decode, matches_type

from .config import EdgeConfig, read_config
from .device_api import CredentialError, read_credential
from .outbox import Outbox, OutboxError, OutboxItem, PhotoMetadata
from .uploader import Uploader, UploadSettings, UploadsStopped

logger = logging.getLogger(__name__)


class IntakeError(Exception):
    """The photo cannot be put in the outbox; the message says why and what to do."""


def content_type_of(data: bytes) -> str | None:
    return next((kind for kind in CONTENT_TYPES if matches_type(kind, data[:16])), None)


def add_photo_file(config: EdgeConfig, file: Path, *, body_site: str, consent: bool, note: str = "",
                   consultation: str | None = None) -> OutboxItem:
    """Check the photo in ``file`` and add it to the kit's outbox; durable when this returns."""
    if body_site not in BODY_SITES:
        raise IntakeError(f"--body-site {body_site!r} is not a body site; one of: {', '.join(BODY_SITES)}")
    try:
        data = file.read_bytes()
        taken = datetime.fromtimestamp(file.stat().st_mtime, UTC)
    except OSError as exc:
        raise IntakeError(f"cannot read {file}: {exc.strerror or exc}") from None
    content_type = content_type_of(data)
    if content_type is None:
        raise IntakeError(f"{file} is not a JPEG, PNG or WebP image")
    try:
        decode(content_type, data)
    except NotAnImage as exc:
        raise IntakeError(f"{file} does not decode as {content_type}: {exc}") from None
    try:
        device = read_credential(config.credential).name
    except CredentialError:
        device = ""  # not enrolled yet: the photo waits in the outbox all the same
    outbox = Outbox.open(config.outbox_dir, verify=False)
    try:
        consultation = consultation or outbox.last_consultation()
        if not consultation:
            raise IntakeError("the kit has not been assigned a consultation yet: name one with --consultation")
        metadata = PhotoMetadata(consultation=consultation, body_site=body_site, consent=consent,
                                 captured_at=taken, device=device, note=note, content_type=content_type,
                                 filename=file.name)
        return outbox.add(data, metadata)
    except ValueError as exc:
        raise IntakeError(str(exc)) from None
    finally:
        outbox.close()


def photo_main(config_path: Path, file: Path, *, body_site: str, consent: str, note: str,
               consultation: str | None) -> int:
    config, errors = read_config(config_path)
    if config is None:
        for error in errors:
            print(f"nara edge photo: {config_path}: {error.field}: {error.message}")
        return 2
    if consent not in ("yes", "no"):
        print(f"nara edge photo: --consent must be yes or no, not {consent!r}")
        return 2
    try:
        item = add_photo_file(config, file, body_site=body_site, consent=consent == "yes", note=note,
                              consultation=consultation)
    except (IntakeError, OutboxError) as exc:
        print(f"nara edge photo: {exc}")
        return 2
    print(f"Saved {file.name} as {item.id} ({item.size} bytes, consultation {item.metadata.consultation}); "
          "the kit delivers it.")
    return 0


async def deliver(config: EdgeConfig, until_empty: bool) -> int:
    try:
        credential = read_credential(config.credential)
        outbox = Outbox.open(config.outbox_dir)
    except (CredentialError, OutboxError) as exc:
        logger.error("%s", exc)
        return 2
    uploader = Uploader(outbox, config.server, credential, settings=UploadSettings(ceiling_kbps=config.upload_kbps))
    try:
        if until_empty:
            await uploader.run_until_empty()
        else:
            await uploader.run()
    except UploadsStopped as exc:
        logger.error("%s", exc)
        return 1
    finally:
        counts = {state: n for state, n in outbox.counts().items() if n}
        logger.info("outbox: %s", ", ".join(f"{n} {state}" for state, n in counts.items()) or "empty")
        outbox.close()
    return 0


def upload_main(config_path: Path, until_empty: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, errors = read_config(config_path)
    if config is None:
        for error in errors:
            logger.error("configuration %s: %s: %s", config_path, error.field, error.message)
        return 2
    return asyncio.run(deliver(config, until_empty))
