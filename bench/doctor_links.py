"""How near the network doctor's round trip and bandwidth come to an emulated link's.

``python -m bench.doctor_links [--seconds S] PROFILE ...`` starts a server on
loopback (its own temporary data directory) and the impairing TURN relay
(bench/turn.py), then for each link profile (bench/profiles.py) opens the
doctor's test connection through the relay, where the link is, and prints the
link's figures beside what the doctor measured. The figures are in
docs/doctor.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web
from aiortc import RTCIceServer

from mediaserver.aiortc_adapter import restrict_host_addresses
from nara.doctor import ProbeConnection
from signalling.app import build_app
from signalling.config import ServerConfig
from signalling.doctor import mint_doctor_token
from signalling.ws import HUB

from .profiles import profile
from .turn import ImpairingTurnServer

MAX_BYTES = 4 * 1024 * 1024


def _kbps(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate / 1000:.0f}"


async def measure(names: list[str], seconds: float) -> None:
    restrict_host_addresses(["127.0.0.1"])
    relay = ImpairingTurnServer(seed=3)
    await relay.start()
    with tempfile.TemporaryDirectory() as directory:
        app = build_app(ServerConfig(data_dir=Path(directory), port=0, demo=False))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        token, _ = mint_doctor_token(app[HUB].authority)
        print(f"{'profile':26} {'link down/up kbit/s':>20} {'delay ms':>9} {'loss':>5} | "
              f"{'rtt ms':>7} {'down kbit/s':>12} {'up kbit/s':>10}")
        async with aiohttp.ClientSession() as http:
            for name in names:
                link = profile(name)
                server = RTCIceServer(urls=relay.url, username=f"{name}/doctor", credential=relay.password)
                probe = ProbeConnection([server], relay_only=True)
                figures = f"{_kbps(link.downlink.rate_bps) + '/' + _kbps(link.uplink.rate_bps):>20} " \
                          f"{link.downlink.delay_ms + link.uplink.delay_ms:>9.0f} {link.downlink.loss:>5.0%}"
                try:
                    await probe.connect(http, url, {"Authorization": f"Bearer {token}"}, True, 20)
                    rtt = await probe.round_trip(5, 10)
                    down = await probe.download(seconds, MAX_BYTES)
                    up = await probe.upload(seconds, MAX_BYTES)
                    print(f"{name:26} {figures} | {rtt:>7.0f} {down:>12.0f} {up:>10.0f}", flush=True)
                except Exception as exc:  # noqa: BLE001 - a failed profile is a result too
                    print(f"{name:26} {figures} | failed: {exc!r}", flush=True)
                finally:
                    await probe.close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="each direction (default 3, as nara doctor)")
    parser.add_argument("profiles", nargs="+")
    args = parser.parse_args()
    asyncio.run(measure(args.profiles, args.seconds))


if __name__ == "__main__":
    main()
