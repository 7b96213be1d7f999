"""Opus decoding with what FFmpeg's decoders leave out: in-band FEC and concealment.

A lost Opus packet can often be rebuilt from the next one, which carries a
low-bitrate copy of the previous frame (LBRR, RFC 6716 §4.2.4) when the
encoder runs with in-band FEC. PyAV's decoders cannot ask libopus for it, so
this module binds libopus itself with ctypes. It uses the libopus that ships
inside PyAV's wheel (``av.libs/``), or the system's libopus when there is none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from functools import cache

import av
import numpy as np

from .errors import MediaError

MAX_FRAME_SAMPLES = 5760  # 120 ms at 48 kHz, the longest Opus packet
OPUS_OK = 0
OPUS_RESET_STATE = 4028


class OpusUnavailable(MediaError):
    """libopus could not be found or loaded."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "opus_unavailable",
            "libopus was not found: install PyAV from its wheel (it ships libopus) "
            f"or the system package libopus0. {detail}",
        )


class OpusDecodeError(MediaError):
    """libopus refused a packet or a setting."""

    def __init__(self, what: str, status: int) -> None:
        super().__init__("opus_decode_failed", f"{what}: {_library().opus_strerror(status).decode()}")
        self.status = status


def _candidates() -> list[str]:
    libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    found = sorted(glob.glob(os.path.join(libs, "libopus*.so*")))
    system = ctypes.util.find_library("opus")
    if system is not None:
        found.append(system)
    return found


@cache
def _library() -> ctypes.CDLL:
    candidates = _candidates()
    if not candidates:
        raise OpusUnavailable("Looked in PyAV's av.libs and the system library path.")
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        _declare(lib)
        return lib
    raise OpusUnavailable("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    pcm = ctypes.POINTER(ctypes.c_int16)
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decoder_destroy.restype = None
    lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, pcm, ctypes.c_int, ctypes.c_int]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_decoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.opus_decoder_ctl.restype = ctypes.c_int
    lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    lib.opus_packet_get_nb_samples.restype = ctypes.c_int
    lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    lib.opus_packet_has_lbrr.restype = ctypes.c_int
    lib.opus_strerror.argtypes = [ctypes.c_int]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_get_version_string.argtypes = []
    lib.opus_get_version_string.restype = ctypes.c_char_p


def libopus_version() -> str:
    """The version string of the libopus in use, e.g. 'libopus 1.5.2'."""
    return str(_library().opus_get_version_string().decode())


def has_fec(packet: bytes) -> bool:
    """True when ``packet`` carries FEC (LBRR) data for the frame before it."""
    if not packet:
        return False
    return bool(_library().opus_packet_has_lbrr(packet, len(packet)) > 0)


def packet_samples(packet: bytes, sample_rate: int = 48000) -> int:
    """How many samples per channel ``packet`` decodes to at ``sample_rate``."""
    n = int(_library().opus_packet_get_nb_samples(packet, len(packet), sample_rate))
    if n < 0:
        raise OpusDecodeError("not an Opus packet", n)
    return n


class OpusDecoder:
    """One Opus stream's decoder state; output is interleaved int16 samples.

    Every call returns an array of shape ``(samples * channels,)``. Feed it
    every frame in order, whether decoded, rebuilt from FEC or concealed, so
    its state follows the stream.
    """

    def __init__(self, sample_rate: int = 48000, channels: int = 1) -> None:
        self._handle: int | None = None
        if sample_rate not in (8000, 12000, 16000, 24000, 48000):
            raise ValueError("Opus decodes at 8, 12, 16, 24 or 48 kHz")
        if channels not in (1, 2):
            raise ValueError("Opus decodes to one or two channels")
        self.sample_rate = sample_rate
        self.channels = channels
        self._lib = _library()
        status = ctypes.c_int(0)
        handle = self._lib.opus_decoder_create(sample_rate, channels, ctypes.byref(status))
        if status.value != OPUS_OK or not handle:
            raise OpusDecodeError("could not create an Opus decoder", status.value)
        self._handle = handle
        self._pcm = np.zeros(MAX_FRAME_SAMPLES * channels, dtype=np.int16)
        self._pcm_ptr = self._pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_int16))

    def decode(self, data: bytes) -> np.ndarray:
        """Decode one packet."""
        if not data:
            raise ValueError("an empty packet: use conceal() for a missing one")
        return self._run(data, MAX_FRAME_SAMPLES, fec=False, what="could not decode a packet")

    def decode_fec(self, next_packet: bytes, samples: int) -> np.ndarray:
        """Rebuild the ``samples`` before ``next_packet`` from its FEC data.

        Without FEC data in ``next_packet`` libopus conceals instead; ask
        ``has_fec(next_packet)`` first to know which one you get. Decode
        ``next_packet`` itself afterwards as usual.
        """
        return self._run(next_packet, samples, fec=True, what="could not decode FEC data")

    def conceal(self, samples: int) -> np.ndarray:
        """Packet loss concealment: ``samples`` that continue the signal plausibly."""
        return self._run(None, samples, fec=False, what="could not conceal a lost packet")

    def reset(self) -> None:
        """Forget the stream so far (a new stream begins)."""
        status = self._lib.opus_decoder_ctl(self._require(), OPUS_RESET_STATE)
        if status != OPUS_OK:
            raise OpusDecodeError("could not reset the Opus decoder", status)

    def close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._lib.opus_decoder_destroy(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()

    def _require(self) -> int:
        if self._handle is None:
            raise ValueError("the Opus decoder is closed")
        return self._handle

    def _run(self, data: bytes | None, samples: int, *, fec: bool, what: str) -> np.ndarray:
        handle = self._require()
        if not 0 < samples <= MAX_FRAME_SAMPLES or samples % (self.sample_rate // 400):
            raise ValueError("Opus frames are multiples of 2.5 ms and at most 120 ms long")
        length = 0 if data is None else len(data)
        n = self._lib.opus_decode(handle, data, length, self._pcm_ptr, samples, int(fec))
        if n < 0:
            raise OpusDecodeError(what, n)
        return self._pcm[: n * self.channels].copy()
