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
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamTrack

OPUS_RATE = 48000
OPUS_FRAME = 960  # 20 ms
OPUS_PACKET_MS = (20, 40, 60)


@dataclass(frozen=True)
class OpusProfile:
    """How the call's audio is encoded: bitrate (bit/s) and milliseconds of sound per packet."""

    bitrate: int = 24_000
    packet_ms: int = 20

    def __post_init__(self) -> None:
        if not 6_000 <= self.bitrate <= 128_000:
            raise ValueError("Opus bitrate must be between 6 and 128 kbit/s")
        if self.packet_ms not in OPUS_PACKET_MS:
            raise ValueError("Opus packets here are 20, 40 or 60 ms long")


# Every packet costs about 60 bytes of IP, UDP, RTP and SRTP headers: 24 kbit/s at 50 packets a second, as
# much as the speech itself. On a thin uplink, 20 kbit/s in 60 ms packets carries the speech (wideband, with
# in-band FEC, which libopus drops below about 18 kbit/s) in about 30 kbit/s instead of 55; a lost packet
# costs 60 ms, rebuilt from the next one's FEC or asked for again.
NORMAL = OpusProfile()
THIN_UPLINK = OpusProfile(bitrate=20_000, packet_ms=60)


class OpusTrack(MediaStreamTrack):
    """Opus at a low, steady bitrate with in-band FEC: speech that survives loss.

    ``expected_loss`` (per cent) tells libopus how much redundancy to carry;
    the receiver rebuilds a lost packet from the FEC in the next one.
    """

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, bitrate: int = 24_000, expected_loss: int = 10) -> None:
        super().__init__()
        self.source = source
        self.expected_loss = expected_loss
        self.profile = OpusProfile(bitrate=bitrate)
        self._wanted = self.profile
        self._codec = self._encoder(self.profile)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=OPUS_RATE, frame_size=OPUS_FRAME)
        self._unencoded: list[av.AudioFrame] = []  # 20 ms frames not yet encoded
        self._ready: deque[av.Packet[Any]] = deque()
        self._pts = 0
        self._source_next: int | None = None  # where the source's next frame should begin, at 48 kHz

    @property
    def bitrate(self) -> int:
        return self.profile.bitrate

    def use(self, profile: OpusProfile) -> None:
        """Encode as ``profile`` says from the next packet on (the stream goes on: its clock is unbroken)."""
        self._wanted = profile

    def _encoder(self, profile: OpusProfile) -> Any:
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = OPUS_RATE
        codec.layout = "mono"
        codec.format = "s16"
        codec.bit_rate = profile.bitrate
        codec.time_base = fractions.Fraction(1, OPUS_RATE)
        codec.options = {
            "application": "voip",
            "frame_duration": str(profile.packet_ms),
            "fec": "1",
            "packet_loss": str(self.expected_loss),
        }
        return codec

    async def recv(self) -> av.Packet[Any]:
        while not self._ready:
            frame = await self.source.recv()
            if not isinstance(frame, av.AudioFrame):
                raise TypeError("OpusTrack needs a source of audio frames")
            self._follow_dropped_time(frame)
            for chunk in self._resampler.resample(frame):
                self._unencoded.append(chunk)
                if len(self._unencoded) * OPUS_FRAME >= self.profile.packet_ms * OPUS_RATE // 1000:
                    self._encode_waiting()
        return self._ready.popleft()

    def _follow_dropped_time(self, frame: av.AudioFrame) -> None:
        """The packets' clock jumps where the source's frames do (whole 20 ms frames).

        A machine that stalls for a while gets the missed frames from its capture at once, and a slow reader
        keeps only the newest of them (``edge/media.py``): counted on unbroken, the packets would go out for
        good as much later than their timestamps say as was dropped, and a receiver would take every one of
        them as late. The frames waiting for the packet under way go with the dropped time (at most a
        packet's worth before a gap of seconds), so what follows is stamped where it was captured. A source
        whose time goes back (a device opened again) is followed from where it now is, without a jump.
        """
        if frame.pts is None or frame.time_base is None or not frame.sample_rate:
            return
        begins = int(frame.pts * frame.time_base * OPUS_RATE)
        expected, self._source_next = self._source_next, begins + frame.samples * OPUS_RATE // frame.sample_rate
        if expected is None:
            return
        jump = round((begins - expected) / OPUS_FRAME) * OPUS_FRAME
        if jump > 0:
            self._pts += jump + sum(chunk.samples for chunk in self._unencoded)
            self._unencoded = []

    def _encode_waiting(self) -> None:
        """One packet of the frames waiting; a new profile starts at a packet's edge, with a fresh encoder
        (libopus sets its packet length once)."""
        chunks, self._unencoded = self._unencoded, []
        samples = sum(chunk.samples for chunk in chunks)
        joined = av.AudioFrame.from_ndarray(np.concatenate([chunk.to_ndarray() for chunk in chunks], axis=1),
                                            format="s16", layout="mono")
        joined.sample_rate = OPUS_RATE
        joined.pts = self._pts
        joined.time_base = fractions.Fraction(1, OPUS_RATE)
        self._pts += samples
        for packet in self._codec.encode(joined):
            packet.time_base = fractions.Fraction(1, OPUS_RATE)
            self._ready.append(packet)
        if self._wanted != self.profile:
            self.profile = self._wanted
            self._codec = self._encoder(self.profile)

    def stop(self) -> None:
        self.source.stop()
        super().stop()
