"""The naive relay Nära's SFU is measured against: decode once, re-encode per subscriber.

This is what aiortc offers out of the box: the published track is decoded,
``MediaRelay`` hands each decoded frame to every subscriber's sender, and each
sender runs its own VP8 encoder. It is a benchmark baseline, not a product.

Run as ``python -m bench.naive_relay --port P --bitrate B``; it serves
``POST /publish`` and ``POST /subscribe`` (SDP offer in, SDP answer out).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from mediaserver.aiortc_adapter import hold_encoder_bitrate, restrict_host_addresses


class NaiveRelay:
    def __init__(self, bitrate: int) -> None:
        self.bitrate = bitrate
        self.relay = MediaRelay()
        self.source: MediaStreamTrack | None = None
        self.source_ready = asyncio.Event()
        self.peers: set[RTCPeerConnection] = set()

    async def _answer(self, pc: RTCPeerConnection, request: web.Request) -> web.Response:
        offer = await request.json()
        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], offer["type"]))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    async def publish(self, request: web.Request) -> web.Response:
        pc = RTCPeerConnection()
        self.peers.add(pc)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self.source = track
                self.source_ready.set()

        return await self._answer(pc, request)

    async def subscribe(self, request: web.Request) -> web.Response:
        await asyncio.wait_for(self.source_ready.wait(), 10)
        assert self.source is not None
        pc = RTCPeerConnection()
        self.peers.add(pc)
        sender = pc.addTrack(self.relay.subscribe(self.source, buffered=False))
        hold_encoder_bitrate(sender, self.bitrate)
        return await self._answer(pc, request)


async def serve(port: int, bitrate: int) -> None:
    restrict_host_addresses(["127.0.0.1"])
    relay = NaiveRelay(bitrate)
    app = web.Application()
    app.router.add_post("/publish", relay.publish)
    app.router.add_post("/subscribe", relay.subscribe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for pc in list(relay.peers):
        await pc.close()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bitrate", type=int, default=550_000)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.bitrate))


if __name__ == "__main__":
    main()
