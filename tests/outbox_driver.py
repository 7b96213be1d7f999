"""A second process for the outbox and upload tests: it adds photos, opens the outbox, or runs a kit's uploads.

``python -m tests.outbox_driver add FOLDER --count N --tag T``: add N photos tagged T-0 … T-(N-1).
``python -m tests.outbox_driver reopen FOLDER --count N``: open the outbox N times (each open cleans up).
``python -m tests.outbox_driver kit CONFIG --consultation C --tag T --captures N [--until-empty]``: a kit
that delivers its outbox while it captures N photos, one after another after short random pauses; prints
``ready`` when running, ``capturing TAG`` as it starts to add a photo and ``saved TAG`` once it is committed;
with ``--until-empty`` it exits once nothing is waiting, else it runs until killed.

Each photo's bytes follow from its tag (``photo_bytes``): a noise JPEG of a few hundred KB with the tag in a
comment segment, so a test can check any stored image's bytes from its note alone.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

from edge.outbox import Outbox, PhotoMetadata

SITES = ("sacrum", "heel_left", "heel_right", "hip_left")


@functools.cache
def _base_jpeg(width: int = 640, height: int = 480) -> bytes:
    import cv2
    import numpy as np

    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return bytes(encoded)


def photo_bytes(tag: str, small: bool = False) -> bytes:
    """A decodable JPEG that differs for every tag: the tag sits in a COM segment after SOI.

    About 200 kB (640x480 of noise), or 50 kB when ``small``."""
    base = _base_jpeg(320, 240) if small else _base_jpeg()
    text = f"nara-test {tag}".encode()
    return base[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + base[2:]


def photo_metadata(consultation: str, tag: str) -> PhotoMetadata:
    number = sum(tag.encode())
    return PhotoMetadata(
        consultation=consultation, body_site=SITES[number % len(SITES)], consent=True,
        captured_at=datetime(2025, 3, 1, 10, number % 60, tzinfo=UTC), device="Kit 7", note=tag,
        quality={"sharpness": float(number), "dark": 0.0}, filename=f"{tag}.jpg",
        mm_per_pixel=0.1 if number % 2 else None,
    )


def add(folder: Path, count: int, tag: str, consultation: str) -> None:
    outbox = Outbox.open(folder, verify=False)
    for n in range(count):
        outbox.add(photo_bytes(f"{tag}-{n}"), photo_metadata(consultation, f"{tag}-{n}"))
    outbox.close()


def reopen(folder: Path, count: int) -> None:
    for _ in range(count):
        Outbox.open(folder, verify=False).close()


async def kit(config_path: Path, consultation: str, tag: str, captures: int, seed: int, until_empty: bool) -> None:
    from edge.config import load_config
    from edge.device_api import read_credential
    from edge.pacing import MIN_CHUNK
    from edge.reconnect import Backoff
    from edge.uploader import Uploader, UploadSettings

    config = load_config(config_path)
    outbox = Outbox.open(config.outbox_dir)
    credential = read_credential(config.credential)
    # PATCHes of 64 KiB in blocks of about 5 kB: kills land between PATCHes and inside their blocks.
    settings = UploadSettings(ceiling_kbps=config.upload_kbps, max_chunk=MIN_CHUNK, max_stream=4 * MIN_CHUNK,
                              block_seconds=0.01, idle_check=0.05,
                              stall_timeout=2.0, backoff=Backoff(base=0.1, cap=0.5))
    uploader = Uploader(outbox, config.server, credential, settings=settings, rng=random.Random(seed))
    if until_empty:
        await uploader.run_until_empty()
        return
    uploading = asyncio.ensure_future(uploader.run())
    print("ready", flush=True)
    rng, camera = random.Random(seed), random.Random(-seed)
    for n in range(captures):
        await asyncio.sleep(rng.uniform(0.0, 0.4))  # the nurse's pace, not a wait for an event
        name = f"{tag}-{n}"
        image, metadata = photo_bytes(name), photo_metadata(consultation, name)
        print(f"capturing {name}", flush=True)
        # The camera's readout (a still takes a Pi's camera some hundreds of milliseconds; here up to 8): on a
        # busy machine the test's kill came after a store that follows at once, and too few landed in captures.
        await asyncio.sleep(camera.uniform(0.0, 0.008))
        outbox.add(image, metadata)  # in the loop's thread: a kill lands before, inside or after it
        print(f"saved {name}", flush=True)
        uploader.wake()
    await uploading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outbox_driver")
    sub = parser.add_subparsers(dest="command", required=True)
    adding = sub.add_parser("add")
    adding.add_argument("folder")
    adding.add_argument("--count", type=int, required=True)
    adding.add_argument("--tag", required=True)
    adding.add_argument("--consultation", default="c1")
    opening = sub.add_parser("reopen")
    opening.add_argument("folder")
    opening.add_argument("--count", type=int, required=True)
    running = sub.add_parser("kit")
    running.add_argument("config")
    running.add_argument("--consultation", required=True)
    running.add_argument("--tag", required=True)
    running.add_argument("--captures", type=int, default=0)
    running.add_argument("--seed", type=int, default=1)
    running.add_argument("--until-empty", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "add":
        add(Path(args.folder), args.count, args.tag, args.consultation)
    elif args.command == "reopen":
        reopen(Path(args.folder), args.count)
    else:
        asyncio.run(kit(Path(args.config), args.consultation, args.tag, args.captures, args.seed, args.until_empty))
    return 0


if __name__ == "__main__":
    sys.exit(main())
