"""Issue 7's acceptance test: power cuts during capture and upload, and server restarts, lose or repeat nothing.

A kit process (tests/outbox_driver.py: the real outbox and uploader, capturing
photos of about 200 kB while it delivers them in 16 KiB chunks) is killed with
SIGKILL 50 times at points a seeded generator picks — right inside a photo's
capture, or at a random moment, usually in the middle of a chunk — and started
again each time; four times the server itself (``nara serve``) is killed and
started again while the kit uploads. The random delays before a kill are not
synchronisation: where the kill lands is the point of the test.

At the end every photo the outbox ever committed is on the server exactly once,
byte for byte, with its metadata, and the listing holds nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sys
import time
from pathlib import Path

from bench.process import PROJECT
from edge.outbox import DELIVERED, UPLOADING, Outbox
from tests.outbox_driver import photo_bytes, photo_metadata

from .edge_helpers import ServerProcess, admin
from .upload_helpers import assigned_kit, stored_images

KILLS = 50
SERVER_RESTARTS_AT = {8, 20, 32, 44}
DRIVER = [sys.executable, "-m", "tests.outbox_driver", "kit"]
ENV = {**os.environ, "PYTHONPATH": str(PROJECT)}


class KitProcess:
    """One life of the kit: its lines as they come, until it is killed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, config: Path, room: str, tag: str, captures: int, seed: int) -> KitProcess:
        with (config.parent / "kit.log").open("ab") as log:  # its warnings, for whoever reads a failure
            process = await asyncio.create_subprocess_exec(
                *DRIVER, str(config), "--consultation", room, "--tag", tag, "--captures", str(captures),
                "--seed", str(seed), stdout=asyncio.subprocess.PIPE, stderr=log, env=ENV)
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().strip())
            self._new_line.set()

    async def line_starting(self, prefix: str, timeout: float = 20.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                if self._reader.done():
                    raise AssertionError(f"the kit ended before printing {prefix!r}: {self.lines}")
                self._new_line.clear()
                await self._new_line.wait()

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        await self._reader

    def tags(self, prefix: str) -> set[str]:
        return {line.split(" ", 1)[1] for line in self.lines if line.startswith(prefix + " ")}


async def test_fifty_kills_and_four_server_restarts_lose_and_repeat_nothing(tmp_path: Path) -> None:
    started = time.monotonic()
    server = ServerProcess(tmp_path / "server")
    await asyncio.to_thread(server.start)
    try:
        room = (await admin(server.url, server.admin_key, "POST", "/api/consultations",
                            {"title": "Hembesök", "patient_ref": "p-kill"}))["id"]
        kit = await assigned_kit(server.url, server.admin_key, tmp_path, room)
        config = tmp_path / "kit" / "edge.toml"
        config.write_text(f'server = "{server.url}"\ncredential = "{kit.credential_path}"\n'
                          f'data_dir = "{tmp_path / "kit" / "data"}"\nupload_kbps = 2000\n')
        outbox_dir = tmp_path / "kit" / "data" / "outbox"
        rng = random.Random(20250301)
        saved: set[str] = set()  # photos whose capture the kit reported finished: certainly committed
        inside_capture = inside_upload = 0

        for run in range(KILLS):
            captures = rng.choice((0, 1, 2, 2))
            kit_process = await KitProcess.start(config, room, f"r{run}", captures, seed=run)
            await kit_process.line_starting("ready")
            if captures and rng.random() < 0.25:
                await kit_process.line_starting("capturing")
                await asyncio.sleep(rng.uniform(0.0, 0.002))  # the kill point: during the photo's capture
            else:
                await asyncio.sleep(rng.uniform(0.05, 0.9))  # the kill point: anywhere, usually mid-chunk
            if run in SERVER_RESTARTS_AT:
                server.kill()  # the server goes down in the middle of the kit's uploads, and comes back
                await asyncio.to_thread(server.start)
                await asyncio.sleep(rng.uniform(0.1, 0.6))
            await kit_process.kill()
            saved |= kit_process.tags("saved")
            inside_capture += bool(kit_process.tags("capturing") - kit_process.tags("saved"))
            outbox = Outbox.open(outbox_dir)  # what the kit finds on its next start
            items = outbox.items()
            outbox.close()
            assert all(item.state in (DELIVERED, "queued", UPLOADING) for item in items), [
                (i.metadata.note, i.state, i.error) for i in items]
            inside_upload += any(i.state == UPLOADING and 0 < i.sent < i.size for i in items)

        last = await asyncio.create_subprocess_exec(*DRIVER, str(config), "--consultation", room, "--tag", "end",
                                                    "--until-empty", env=ENV)
        assert await asyncio.wait_for(last.wait(), 60) == 0
        outbox = Outbox.open(outbox_dir)
        items = outbox.items()
        stored = await stored_images(server.url, room, await server.token(room))
    finally:
        server.kill()

    took = time.monotonic() - started
    unannounced = len({i.metadata.note for i in items} - saved)
    print(f"{KILLS} kills ({inside_capture} during a capture, {inside_upload} with a chunk half sent), "
          f"{len(SERVER_RESTARTS_AT)} server restarts; {len(items)} photos ({unannounced} committed just before "
          f"a kill) in {took:.0f} s")
    assert inside_upload >= 10 and inside_capture >= 3  # the kills did land where they should
    assert {i.state for i in items} == {DELIVERED}
    assert saved <= {i.metadata.note for i in items}  # every photo reported saved was kept
    assert len(stored) == len(items)  # exactly once each, and nothing partial or foreign
    assert {s["id"] for s in stored} == {i.image_ref for i in items}
    by_id = {s["id"]: s for s in stored}
    for item in items:
        image = by_id[item.image_ref]
        tag = item.metadata.note
        expected = photo_bytes(tag)
        assert image["data"] == expected and image["sha256"] == item.sha256 == hashlib.sha256(expected).hexdigest()
        metadata = photo_metadata(room, tag)
        assert item.metadata == metadata
        assert (image["body_site"], image["note"], image["filename"], image["quality"], image["mm_per_pixel"]) == (
            metadata.body_site, tag, metadata.filename, metadata.quality, metadata.mm_per_pixel)
        assert image["captured_at"].replace("Z", "+00:00") == metadata.captured_at.isoformat()
        assert image["patient_ref"] == "p-kill" and image["consultation"] == room
    assert {p.name for p in outbox_dir.iterdir()} <= {"outbox.db", "outbox.db-wal", "outbox.db-shm", ".lock"}
