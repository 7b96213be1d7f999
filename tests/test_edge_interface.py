"""The kit's own network interface goes away and comes back: the kit notices, says so, and rejoins by itself.

The kit runs as its real service (`nara edge run`) in a network namespace of
its own, joined to the server's namespace by a virtual Ethernet pair, as a
kit's Wi-Fi or mobile modem joins it to the world. The test then does to that
interface what happens in a patient's home: the kit is powered on before the
network is there, the link goes down and up again, and the address is lost
and given back (a lease that lapsed).

This needs root in a private network namespace (``scripts/test`` runs the
suite in one); anywhere else it would touch the machine's real interfaces, so
it does not run there — except under CI, where a missing namespace is a
failure, not a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.upload import KitProcess, in_private_namespace

from .edge_helpers import KitWatcher, ServerProcess, admin, enrolled_kit

SERVER_ADDRESS = "10.77.0.1"  # the server's end of the kit's link, inside the test's own namespace
KIT_ADDRESS = "10.77.0.2"
PREFIX = 30
RECOVERY_GOAL = 3.0  # media flows again within 3 s of the interface's return
NOTICE_GOAL = 3.5  # the kit notices a dead link within 3 s (plus the test's own reading of its log)


def _tools() -> bool:
    return all(shutil.which(tool) for tool in ("ip", "unshare", "nsenter"))


if not (in_private_namespace() and _tools()):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the suite as root in a private network namespace (scripts/test does)")
    pytest.skip("needs root in a private network namespace with ip, unshare and nsenter (run ./scripts/test)",
                allow_module_level=True)


def ip(*args: str, namespace_of: int | None = None) -> None:
    command = ["ip", *args]
    if namespace_of is not None:
        command = ["nsenter", "-t", str(namespace_of), "-n", *command]
    subprocess.run(command, check=True, capture_output=True)


@contextlib.asynccontextmanager
async def server_and_kit(tmp_path: Path) -> AsyncIterator[tuple[ServerProcess, KitProcess, KitWatcher]]:
    """A server listening on every address of the test's namespace, a kit assigned to a consultation
    with the care team in it, and the kit powered on before its network exists."""
    served = ServerProcess(tmp_path / "server", "--host", "0.0.0.0",
                           "--media-address", "127.0.0.1", "--media-address", SERVER_ADDRESS)
    await asyncio.to_thread(served.start)
    kit: KitProcess | None = None
    clinician: KitWatcher | None = None
    try:
        kit_id, credential = await enrolled_kit(served.url, served.admin_key, tmp_path)
        consultation = await admin(served.url, served.admin_key, "POST", "/api/consultations",
                                   {"title": "Hembesök", "scheduled_for": time.time()})
        room = consultation["id"]
        await admin(served.url, served.admin_key, "PUT", f"/api/consultations/{room}/kit", {"device_id": kit_id})
        config = tmp_path / "kit" / "edge.toml"
        config.write_text(
            f'server = "http://{SERVER_ADDRESS}:{served.port}"\ncredential = "{credential}"\n'
            'camera = "synthetic"\nmicrophone = "synthetic"\npage = "127.0.0.1:8090"\nvideo = "320x240"\nfps = 15\n'
            f'data_dir = "{tmp_path / "kit" / "data"}"\n')
        kit = await KitProcess.start(config, tmp_path / "kit.log", time.monotonic)
        clinician = await KitWatcher.join(served.url, room, await served.token(room), kit_id)
        yield served, kit, clinician
    finally:
        if clinician is not None:
            await clinician.close()
        if kit is not None:
            await kit.stop()
            print("the kit's log:", *kit.lines, sep="\n")  # shown when the test fails
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", "veth-nara-s")
        if served.process is not None:
            served.process.terminate()
            await asyncio.to_thread(served.process.wait, 20)


def plug_in(kit: KitProcess) -> None:
    """The kit's interface appears: a virtual cable from the kit's namespace to the server's."""
    ip("link", "add", "veth-nara-s", "type", "veth", "peer", "name", "veth-nara-k", "netns", str(kit.pid))
    ip("addr", "add", f"{SERVER_ADDRESS}/{PREFIX}", "dev", "veth-nara-s")
    ip("link", "set", "veth-nara-s", "up")
    ip("addr", "add", f"{KIT_ADDRESS}/{PREFIX}", "dev", "veth-nara-k", namespace_of=kit.pid)
    ip("link", "set", "veth-nara-k", "up", namespace_of=kit.pid)


async def test_the_kit_rejoins_by_itself_when_its_interface_goes_away_and_returns(tmp_path: Path) -> None:
    async with server_and_kit(tmp_path) as (_, kit, clinician):
        # Powered on before the network is there: the kit says so, and keeps trying.
        await kit.wait_for(lambda: kit.state() == "no_network", 10)
        plugged = time.monotonic()
        plug_in(kit)
        await clinician.wait_for(clinician.sees_kit, 20)
        assert kit.entered("connected", plugged) is not None

        cuts = (
            # The link goes down (Wi-Fi lost, modem dropped) and comes back up.
            (("link", "set", "veth-nara-k", "down"), ("link", "set", "veth-nara-k", "up")),
            # The address goes away (a lease that lapsed) and is given again.
            (("addr", "flush", "dev", "veth-nara-k"), ("addr", "add", f"{KIT_ADDRESS}/{PREFIX}", "dev", "veth-nara-k")),
        )
        for gone, back_again in cuts:
            await clinician.wait_for(lambda: clinician.kit_video_after(time.monotonic() - 0.5) is not None)
            cut = time.monotonic()
            ip(*gone, namespace_of=kit.pid)
            # The kit notices by itself, and then finds it has no network at all.
            await kit.wait_for(lambda cut=cut: kit.entered("reconnecting", cut) is not None
                               or kit.entered("no_network", cut) is not None, NOTICE_GOAL + 1)
            noticed = min(t for t in (kit.entered("reconnecting", cut), kit.entered("no_network", cut)) if t)
            assert noticed - cut <= NOTICE_GOAL, noticed - cut
            await kit.wait_for(lambda cut=cut: kit.entered("no_network", cut) is not None, 10)
            returned = time.monotonic()
            ip(*back_again, namespace_of=kit.pid)
            await clinician.wait_for(lambda returned=returned: clinician.kit_video_after(returned) is not None, 15)
            recovered = clinician.kit_video_after(returned)
            assert recovered is not None and recovered - returned < RECOVERY_GOAL, recovered - returned
            assert kit.entered("connected", returned) is not None
        assert kit.process.returncode is None, "the agent never stopped"
        assert not any("Traceback" in line for line in kit.lines), "\n".join(kit.lines[-30:])
