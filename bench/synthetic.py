"""Synthetic participants' media that a receiver can measure.

Video: every frame carries, in large black and white blocks along its top,
a publisher tag, the frame number and the capture time in milliseconds, so a
receiver can tell whose frame it is, which one, and how late, even after lossy
VP8 compression. Audio: a sine tone at a known frequency per publisher.

Under the stamp is one of two scenes, both regenerable from the frame number
(for PSNR): ``gradient``, a moving diagonal gradient that VP8 codes in a few
hundred kbit/s at 640x360 whatever it is allowed, and ``detailed``, the same
gradient under fine grain (a blanket, foliage, skin up close) in two layers
that move different ways, so motion compensation cannot predict it away:
at 640x360 and 15 fps it takes all of 2 Mbit/s and more, and still codes
cleanly at 300 kbit/s, only less sharply.
"""

from __future__ import annotations

import fractions
import functools
import time
from collections import deque
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

SCENES = ("gradient", "detailed")
GRAIN = 4.0  # standard deviation of each grain layer, in luma levels
GRAIN_PERIOD = 256  # pixels a grain layer moves before it repeats
STAMP_BITS = 64  # tag (8) | frame number (24) | capture time ms mod 2**32 (32)
BLOCKS_PER_ROW = 32
AUDIO_RATE = 48000
AUDIO_SAMPLES = 960  # 20 ms


@dataclass(frozen=True)
class FrameStamp:
    tag: int
    frame: int
    capture_ms: int


def _block_size(width: int) -> int:
    return max(4, width // BLOCKS_PER_ROW)


def draw_stamp(luma: np.ndarray, stamp: FrameStamp) -> None:
    """Write ``stamp`` into the top rows of a Y plane, in place."""
    value = ((stamp.tag & 0xFF) << 56) | ((stamp.frame & 0xFFFFFF) << 32) | (stamp.capture_ms & 0xFFFFFFFF)
    size = _block_size(luma.shape[1])
    for bit in range(STAMP_BITS):
        row, col = divmod(bit, BLOCKS_PER_ROW)
        level = 235 if (value >> (STAMP_BITS - 1 - bit)) & 1 else 16
        luma[row * size:(row + 1) * size, col * size:(col + 1) * size] = level


def read_stamp(luma: np.ndarray) -> FrameStamp:
    """Read the stamp back from a decoded Y plane, the original or a smaller copy of the same shape.

    The blocks are a fixed share of the width, so a picture scaled down on the
    server (a layer) carries them at a fractional size; they are read there.
    """
    width = luma.shape[1]
    size = width / BLOCKS_PER_ROW if width // BLOCKS_PER_ROW >= 1 else float(_block_size(width))
    margin = size / 4
    value = 0
    for bit in range(STAMP_BITS):
        row, col = divmod(bit, BLOCKS_PER_ROW)
        top, left = row * size + margin, col * size + margin
        block = luma[int(top):max(int(top) + 1, int(top + size - 2 * margin)),
                     int(left):max(int(left) + 1, int(left + size - 2 * margin))]
        value = (value << 1) | int(block.mean() > 128)
    return FrameStamp(tag=value >> 56, frame=(value >> 32) & 0xFFFFFF, capture_ms=value & 0xFFFFFFFF)


def source_luma(width: int, height: int, frame: int, scene: str = "gradient") -> np.ndarray:
    """The picture under the stamp for ``scene`` (one of SCENES), regenerable for PSNR."""
    y = np.arange(height, dtype=np.uint16)[:, None]
    x = np.arange(width, dtype=np.uint16)[None, :]
    # (the frame's shift is reduced first: frame * 4 outgrows uint16 after 16384 frames, 18 minutes at 15 fps)
    gradient = (x + y + (frame * 4) % 200) % 200 + 28
    if scene == "gradient":
        return gradient.astype(np.uint8)
    if scene != "detailed":
        raise ValueError(f"unknown scene {scene!r}; one of {', '.join(SCENES)}")
    across, down = _grain(width, height)
    shift_x, shift_y = (frame * 3) % GRAIN_PERIOD, (frame * 2) % GRAIN_PERIOD
    picture = gradient + across[:, shift_x:shift_x + width] + down[shift_y:shift_y + height, :]
    luma: np.ndarray = np.clip(picture, 16, 235).astype(np.uint8)
    return luma


@functools.lru_cache(maxsize=8)
def _grain(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Two layers of fine grain (2x2-pixel cells), one to slide across the picture and one down it,
    each a period longer than the picture in its direction; the same for every run."""
    rng = np.random.default_rng(width * 10007 + height)

    def layer(rows: int, cols: int) -> np.ndarray:
        cells = rng.standard_normal(((rows + 1) // 2, (cols + 1) // 2)) * GRAIN
        grain: np.ndarray = np.kron(cells, np.ones((2, 2)))[:rows, :cols].astype(np.float32)
        return grain

    return layer(height, width + GRAIN_PERIOD), layer(height + GRAIN_PERIOD, width)


def wall_ms() -> int:
    return int(time.time() * 1000) & 0xFFFFFFFF


class StampedVideoTrack(VideoStreamTrack):
    """Publishes stamped frames of ``scene`` at ``fps``."""

    def __init__(self, tag: int, width: int = 640, height: int = 480, fps: int = 30, scene: str = "gradient") -> None:
        super().__init__()
        if scene not in SCENES:
            raise ValueError(f"unknown scene {scene!r}; one of {', '.join(SCENES)}")
        self.tag = tag
        self.width, self.height, self.fps = width, height, fps
        self.scene = scene
        self.frames_sent = 0
        # wall-clock time of each frame, the last hour's worth (a kit's synthetic camera runs for days)
        self.sent_at: deque[float] = deque(maxlen=3600 * fps)
        self._chroma = np.full((height // 2, width), 128, dtype=np.uint8)
        self._began: float | None = None

    async def recv(self) -> av.VideoFrame:
        import asyncio

        if self._began is None:
            self._began = time.monotonic()
        due = self._began + self.frames_sent / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        number = self.frames_sent
        luma = source_luma(self.width, self.height, number, self.scene)
        self.sent_at.append(time.time())
        draw_stamp(luma, FrameStamp(self.tag, number, wall_ms()))
        frame = av.VideoFrame.from_ndarray(np.vstack([luma, self._chroma]), format="yuv420p")
        frame.pts = int(number * 90000 / self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self.frames_sent += 1
        return frame


class ToneAudioTrack(AudioStreamTrack):
    """Publishes a continuous sine tone at ``frequency`` Hz.

    ``voiced``: the tone with two weaker harmonics, a syllable-paced envelope and
    a little noise. Opus treats a pure tone as music and soon stops sending
    in-band FEC; this one it treats as speech, as it will a real voice. The
    tone stays the strongest frequency, so receivers still tell whose it is.
    """

    def __init__(self, frequency: float, amplitude: float = 0.3, voiced: bool = False) -> None:
        super().__init__()
        self.frequency = frequency
        self.amplitude = amplitude
        self.voiced = voiced
        self._noise = np.random.default_rng(int(frequency))
        self.samples_sent = 0
        self._began: float | None = None

    async def recv(self) -> av.AudioFrame:
        import asyncio

        if self._began is None:
            self._began = time.monotonic()
        due = self._began + self.samples_sent / AUDIO_RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t = (np.arange(AUDIO_SAMPLES) + self.samples_sent) / AUDIO_RATE
        wave = np.sin(2 * np.pi * self.frequency * t)
        if self.voiced:
            envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3 * t)
            harmonics = 0.4 * np.sin(4 * np.pi * self.frequency * t) + 0.2 * np.sin(6 * np.pi * self.frequency * t)
            wave = (wave + harmonics) * envelope / 1.6 + self._noise.standard_normal(AUDIO_SAMPLES) * 0.03
        pcm = (wave * self.amplitude * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self.samples_sent
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self.samples_sent += AUDIO_SAMPLES
        return frame


def dominant_frequency(frame: av.AudioFrame) -> float:
    """The strongest frequency in a decoded audio frame (first channel)."""
    samples = frame.to_ndarray().astype(np.float64)
    channels = len(frame.layout.channels)
    mono = samples.reshape(-1)[::channels] if samples.shape[0] == 1 else samples[0]
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    spectrum[0] = 0
    return float(np.argmax(spectrum) * frame.sample_rate / len(mono))
