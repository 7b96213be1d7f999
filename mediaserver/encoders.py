"""Nära's own encoders: tracks that hand aiortc finished packets, encoded as we choose.

aiortc's own Opus encoder runs at a fixed 96 kbit/s without in-band FEC, more
than a whole thin uplink can spare for audio. These tracks take raw frames
from a source track, encode them with PyAV, and return ``av.Packet`` objects,
which aiortc's sender only packetises (``pack()``); it then ignores keyframe
requests and REMB for that sender, which is why rate decisions live with us.
"""

from __future__ import annotations

import fractions
from collections import deque
from typing import Any

import av
from aiortc.mediastreams import MediaStreamTrack

OPUS_RATE = 48000
OPUS_FRAME = 960  # 20 ms


class OpusTrack(MediaStreamTrack):
    """Opus at a low, steady bitrate with in-band FEC: speech that survives loss.

    ``expected_loss`` (per cent) tells libopus how much redundancy to carry;
    the receiver rebuilds a lost packet from the FEC in the next one.
    """

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, bitrate: int = 24_000, expected_loss: int = 10) -> None:
        super().__init__()
        if not 6_000 <= bitrate <= 128_000:
            raise ValueError("Opus bitrate must be between 6 and 128 kbit/s")
        self.source = source
        self.bitrate = bitrate
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.sample_rate = OPUS_RATE
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._codec.bit_rate = bitrate
        self._codec.time_base = fractions.Fraction(1, OPUS_RATE)
        self._codec.options = {
            "application": "voip",
            "frame_duration": "20",
            "fec": "1",
            "packet_loss": str(expected_loss),
        }
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=OPUS_RATE, frame_size=OPUS_FRAME)
        self._ready: deque[av.Packet[Any]] = deque()
        self._pts = 0

    async def recv(self) -> av.Packet[Any]:
        while not self._ready:
            frame = await self.source.recv()
            if not isinstance(frame, av.AudioFrame):
                raise TypeError("OpusTrack needs a source of audio frames")
            for chunk in self._resampler.resample(frame):
                chunk.pts = self._pts
                chunk.time_base = fractions.Fraction(1, OPUS_RATE)
                self._pts += chunk.samples
                for packet in self._codec.encode(chunk):
                    packet.time_base = fractions.Fraction(1, OPUS_RATE)
                    self._ready.append(packet)
        return self._ready.popleft()

    def stop(self) -> None:
        self.source.stop()
        super().stop()
