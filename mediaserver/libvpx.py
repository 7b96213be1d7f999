"""A small ctypes binding to libvpx's VP8 encoder, the copy shipped inside PyAV.

Why not PyAV's own ``libvpx`` codec: FFmpeg's wrapper reads the bitrate only
when the codec is opened, so a rate change means a new encoder and a
keyframe. libvpx itself changes rate, and shrinks or restores the picture
size, through ``vpx_codec_enc_config_set`` on a running encoder: only a size
change costs a keyframe.

Every ctypes structure below mirrors libvpx 1.16's public headers
(``vpx/vpx_encoder.h``, ``vpx/vpx_codec.h``, ``vpx/vpx_image.h``,
``vpx/vp8cx.h``) field for field. libvpx refuses an encoder whose
``VPX_ENCODER_ABI_VERSION`` differs from its own, and the default
configuration is read into a buffer with room to spare and checked field by
field at its end, so a libvpx with another layout is refused with a clear
error instead of corrupting memory.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mediaserver.errors import CodedError

# VPX_ENCODER_ABI_VERSION = 18 + VPX_CODEC_ABI_VERSION (4 + VPX_IMAGE_ABI_VERSION 5)
#                         + VPX_EXT_RATECTRL_ABI_VERSION (7 + VPX_TPL_ABI_VERSION 5)
ENCODER_ABI_VERSION = 18 + (4 + 5) + (7 + 5)
TESTED_VERSION = (1, 16)

CLOCK_RATE = 90_000  # the encoder's timebase is the RTP video clock

_SS_MAX_LAYERS = 5
_TS_MAX_LAYERS = 5
_TS_MAX_PERIODICITY = 16
_MAX_LAYERS = 12

_CODEC_OK = 0
_CX_FRAME_PKT = 0
_IMG_FMT_I420 = 0x100 | 2
_BITS_8 = 8
_RC_ONE_PASS = 0
_CBR = 1
_KF_DISABLED = 0
_ERROR_RESILIENT_DEFAULT = 0x1
_FRAME_IS_KEY = 0x1
_EFLAG_FORCE_KF = 1 << 0
_DL_REALTIME = 1

# enum vp8e_enc_control_id
_VP8E_SET_CPUUSED = 13
_VP8E_SET_NOISE_SENSITIVITY = 15
_VP8E_SET_STATIC_THRESHOLD = 17
_VP8E_SET_TOKEN_PARTITIONS = 18
_VP8E_GET_LAST_QUANTIZER_64 = 20
_VP8E_SET_MAX_INTRA_BITRATE_PCT = 26


class LibvpxError(CodedError):
    """libvpx is missing, of a version we cannot drive, or refused a request."""


class _Rational(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("den", ctypes.c_int)]


class _FixedBuf(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("sz", ctypes.c_size_t)]


class EncoderConfig(ctypes.Structure):
    """``vpx_codec_enc_cfg_t`` of libvpx 1.16."""

    _fields_ = [
        ("g_usage", ctypes.c_uint),
        ("g_threads", ctypes.c_uint),
        ("g_profile", ctypes.c_uint),
        ("g_w", ctypes.c_uint),
        ("g_h", ctypes.c_uint),
        ("g_bit_depth", ctypes.c_int),  # vpx_bit_depth_t
        ("g_input_bit_depth", ctypes.c_uint),
        ("g_timebase", _Rational),
        ("g_error_resilient", ctypes.c_uint32),  # vpx_codec_er_flags_t
        ("g_pass", ctypes.c_int),  # enum vpx_enc_pass
        ("g_lag_in_frames", ctypes.c_uint),
        ("rc_dropframe_thresh", ctypes.c_uint),
        ("rc_resize_allowed", ctypes.c_uint),
        ("rc_scaled_width", ctypes.c_uint),
        ("rc_scaled_height", ctypes.c_uint),
        ("rc_resize_up_thresh", ctypes.c_uint),
        ("rc_resize_down_thresh", ctypes.c_uint),
        ("rc_end_usage", ctypes.c_int),  # enum vpx_rc_mode
        ("rc_twopass_stats_in", _FixedBuf),
        ("rc_firstpass_mb_stats_in", _FixedBuf),
        ("rc_target_bitrate", ctypes.c_uint),  # kbit/s
        ("rc_min_quantizer", ctypes.c_uint),
        ("rc_max_quantizer", ctypes.c_uint),
        ("rc_undershoot_pct", ctypes.c_uint),
        ("rc_overshoot_pct", ctypes.c_uint),
        ("rc_buf_sz", ctypes.c_uint),  # milliseconds
        ("rc_buf_initial_sz", ctypes.c_uint),
        ("rc_buf_optimal_sz", ctypes.c_uint),
        ("rc_2pass_vbr_bias_pct", ctypes.c_uint),
        ("rc_2pass_vbr_minsection_pct", ctypes.c_uint),
        ("rc_2pass_vbr_maxsection_pct", ctypes.c_uint),
        ("rc_2pass_vbr_corpus_complexity", ctypes.c_uint),
        ("kf_mode", ctypes.c_int),  # enum vpx_kf_mode
        ("kf_min_dist", ctypes.c_uint),
        ("kf_max_dist", ctypes.c_uint),
        ("ss_number_layers", ctypes.c_uint),
        ("ss_enable_auto_alt_ref", ctypes.c_int * _SS_MAX_LAYERS),
        ("ss_target_bitrate", ctypes.c_uint * _SS_MAX_LAYERS),
        ("ts_number_layers", ctypes.c_uint),
        ("ts_target_bitrate", ctypes.c_uint * _TS_MAX_LAYERS),
        ("ts_rate_decimator", ctypes.c_uint * _TS_MAX_LAYERS),
        ("ts_periodicity", ctypes.c_uint),
        ("ts_layer_id", ctypes.c_uint * _TS_MAX_PERIODICITY),
        ("layer_target_bitrate", ctypes.c_uint * _MAX_LAYERS),
        ("temporal_layering_mode", ctypes.c_int),
        ("use_vizier_rc_params", ctypes.c_int),
        ("active_wq_factor", _Rational),
        ("err_per_mb_factor", _Rational),
        ("sr_default_decay_limit", _Rational),
        ("sr_diff_factor", _Rational),
        ("kf_err_per_mb_factor", _Rational),
        ("kf_frame_min_boost_factor", _Rational),
        ("kf_frame_max_boost_first_factor", _Rational),
        ("kf_frame_max_boost_subs_factor", _Rational),
        ("kf_max_total_boost_factor", _Rational),
        ("gf_max_total_boost_factor", _Rational),
        ("gf_frame_max_boost_factor", _Rational),
        ("zm_factor", _Rational),
        ("rd_mult_inter_qp_fac", _Rational),
        ("rd_mult_arf_qp_fac", _Rational),
        ("rd_mult_key_qp_fac", _Rational),
    ]


_SLACK = 512  # bytes behind the configuration, in case a libvpx writes a larger one


class _PaddedConfig(ctypes.Structure):
    _fields_ = [("cfg", EncoderConfig), ("slack", ctypes.c_ubyte * _SLACK)]


class _CodecContext(ctypes.Structure):
    """``vpx_codec_ctx_t``."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("iface", ctypes.c_void_p),
        ("err", ctypes.c_int),
        ("err_detail", ctypes.c_char_p),
        ("init_flags", ctypes.c_long),
        ("config", ctypes.c_void_p),  # union of pointers
        ("priv", ctypes.c_void_p),
    ]


class _Image(ctypes.Structure):
    """``vpx_image_t``."""

    _fields_ = [
        ("fmt", ctypes.c_int),
        ("cs", ctypes.c_int),
        ("range", ctypes.c_int),
        ("w", ctypes.c_uint),
        ("h", ctypes.c_uint),
        ("bit_depth", ctypes.c_uint),
        ("d_w", ctypes.c_uint),
        ("d_h", ctypes.c_uint),
        ("r_w", ctypes.c_uint),
        ("r_h", ctypes.c_uint),
        ("x_chroma_shift", ctypes.c_uint),
        ("y_chroma_shift", ctypes.c_uint),
        ("planes", ctypes.c_void_p * 4),
        ("stride", ctypes.c_int * 4),
        ("bps", ctypes.c_int),
        ("user_priv", ctypes.c_void_p),
        ("img_data", ctypes.c_void_p),
        ("img_data_owner", ctypes.c_int),
        ("self_allocd", ctypes.c_int),
        ("fb_priv", ctypes.c_void_p),
    ]


class _FramePacket(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("sz", ctypes.c_size_t),
        ("pts", ctypes.c_int64),
        ("duration", ctypes.c_ulong),
        ("flags", ctypes.c_uint32),
        ("partition_id", ctypes.c_int),
        ("width", ctypes.c_uint * _SS_MAX_LAYERS),
        ("height", ctypes.c_uint * _SS_MAX_LAYERS),
        ("spatial_layer_encoded", ctypes.c_uint8 * _SS_MAX_LAYERS),
    ]


class _PacketData(ctypes.Union):
    _fields_ = [
        ("frame", _FramePacket),
        ("raw", _FixedBuf),
        ("pad", ctypes.c_char * (128 - ctypes.sizeof(ctypes.c_int))),
    ]


class _OutputPacket(ctypes.Structure):
    """``vpx_codec_cx_pkt_t``."""

    _fields_ = [("kind", ctypes.c_int), ("data", _PacketData)]


def library_path() -> str:
    """Where PyAV's wheel keeps its libvpx (``av.libs/libvpx-*.so*``)."""
    import av

    site = os.path.dirname(os.path.dirname(os.path.abspath(av.__file__)))
    found = sorted(glob.glob(os.path.join(site, "av.libs", "libvpx-*.so*")))
    if not found:
        raise LibvpxError(
            "libvpx-missing",
            f"No libvpx found in {os.path.join(site, 'av.libs')}: the VP8 encoder needs the PyAV "
            "wheel from PyPI (pip install --force-reinstall av), which ships its own libvpx.",
        )
    return found[0]


@functools.cache
def load() -> ctypes.CDLL:
    """PyAV's libvpx, with the signatures Nära calls declared; checked once."""
    lib = ctypes.CDLL(library_path())
    lib.vpx_codec_version.restype = ctypes.c_int
    lib.vpx_codec_version_str.restype = ctypes.c_char_p
    version = lib.vpx_codec_version()
    major, minor = (version >> 16) & 0xFF, (version >> 8) & 0xFF
    if (major, minor) < TESTED_VERSION or major != TESTED_VERSION[0]:
        raise LibvpxError(
            "libvpx-version",
            f"libvpx {lib.vpx_codec_version_str().decode()} is older than the 1.16 Nära is built "
            "for; install the PyAV version pinned in pyproject.toml.",
        )
    ctx_p = ctypes.POINTER(_CodecContext)
    lib.vpx_codec_vp8_cx.restype = ctypes.c_void_p
    lib.vpx_codec_vp8_cx.argtypes = []
    lib.vpx_codec_enc_config_default.restype = ctypes.c_int
    lib.vpx_codec_enc_config_default.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    lib.vpx_codec_enc_init_ver.restype = ctypes.c_int
    lib.vpx_codec_enc_init_ver.argtypes = [ctx_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.vpx_codec_enc_config_set.restype = ctypes.c_int
    lib.vpx_codec_enc_config_set.argtypes = [ctx_p, ctypes.c_void_p]
    lib.vpx_codec_encode.restype = ctypes.c_int
    lib.vpx_codec_encode.argtypes = [
        ctx_p, ctypes.POINTER(_Image), ctypes.c_int64, ctypes.c_ulong, ctypes.c_long, ctypes.c_ulong]
    lib.vpx_codec_get_cx_data.restype = ctypes.POINTER(_OutputPacket)
    lib.vpx_codec_get_cx_data.argtypes = [ctx_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.vpx_codec_destroy.restype = ctypes.c_int
    lib.vpx_codec_destroy.argtypes = [ctx_p]
    lib.vpx_codec_error.restype = ctypes.c_char_p
    lib.vpx_codec_error.argtypes = [ctx_p]
    lib.vpx_codec_error_detail.restype = ctypes.c_char_p
    lib.vpx_codec_error_detail.argtypes = [ctx_p]
    lib.vpx_codec_err_to_string.restype = ctypes.c_char_p
    lib.vpx_codec_err_to_string.argtypes = [ctypes.c_int]
    lib.vpx_img_wrap.restype = ctypes.POINTER(_Image)
    lib.vpx_img_wrap.argtypes = [
        ctypes.POINTER(_Image), ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]
    # vpx_codec_control_ is variadic: it is called with explicit ctypes values and no argtypes.
    lib.vpx_codec_control_.restype = ctypes.c_int
    return lib


def version() -> str:
    """The loaded libvpx's version string, e.g. 'v1.16.0'."""
    text: bytes = load().vpx_codec_version_str()
    return text.decode()


def default_config() -> EncoderConfig:
    """libvpx's default VP8 configuration, checked against the 1.16 layout."""
    lib = load()
    padded = _PaddedConfig()
    status = lib.vpx_codec_enc_config_default(lib.vpx_codec_vp8_cx(), ctypes.byref(padded), 0)
    if status != _CODEC_OK:
        raise LibvpxError("libvpx-failed", f"libvpx has no default VP8 configuration: {_err_text(status)}")
    cfg: EncoderConfig = padded.cfg
    # Fields at both ends of the structure hold libvpx 1.16's known defaults, and
    # nothing was written past its end: the layouts agree.
    expected = (cfg.g_w, cfg.g_h, cfg.g_timebase.den, cfg.rc_target_bitrate, cfg.kf_max_dist,
                cfg.rd_mult_key_qp_fac.num, cfg.rd_mult_key_qp_fac.den)
    if expected != (320, 240, 30, 256, 128, 1, 1) or any(padded.slack):
        raise LibvpxError(
            "libvpx-version",
            f"libvpx {version()} lays out its encoder configuration differently from the 1.16 "
            "headers Nära is built on; install the PyAV version pinned in pyproject.toml.",
        )
    return cfg


def _err_text(status: int) -> str:
    text: bytes = load().vpx_codec_err_to_string(status)
    return text.decode(errors="replace")


@dataclass(frozen=True)
class Vp8Settings:
    """How a realtime VP8 encoder is set up; sizes in pixels, bitrate in bit/s."""

    width: int
    height: int
    bitrate: int
    cpu_used: int = -6  # negative: a fixed speed, no CPU-load guessing; -6 is libwebrtc's desktop choice
    min_quantizer: int = 4
    max_quantizer: int = 56
    drop_frame_threshold: int = 30  # per cent buffer fullness below which libvpx may drop a frame
    noise_sensitivity: int = 0  # 0 off; 1..6 temporal denoising (costs CPU)
    static_threshold: int = 1  # skip blocks that did not change
    buffer_ms: tuple[int, int, int] = (1000, 500, 600)  # size, initial, optimal
    max_keyframe_pct: int = 300  # a keyframe may take at most this share of one frame's budget


class Vp8Codec:
    """One running libvpx VP8 encoder: realtime deadline, CBR, one thread, no lag.

    Keyframes come only when asked for (``keyframe=True``) or when the
    picture size changes: libvpx's own keyframe placement is off. Not
    thread-safe: callers serialise access.
    """

    def __init__(self, settings: Vp8Settings) -> None:
        self._ctx: _CodecContext | None = None
        self._lib = load()
        self.settings = settings
        self._cfg = default_config()
        cfg = self._cfg
        cfg.g_threads = 1
        cfg.g_w, cfg.g_h = settings.width, settings.height
        cfg.g_timebase.num, cfg.g_timebase.den = 1, CLOCK_RATE
        cfg.g_error_resilient = _ERROR_RESILIENT_DEFAULT
        cfg.g_pass = _RC_ONE_PASS
        cfg.g_lag_in_frames = 0
        cfg.rc_dropframe_thresh = settings.drop_frame_threshold
        cfg.rc_resize_allowed = 0
        cfg.rc_end_usage = _CBR
        cfg.rc_target_bitrate = _kbit(settings.bitrate)
        cfg.rc_min_quantizer = settings.min_quantizer
        cfg.rc_max_quantizer = settings.max_quantizer
        cfg.rc_undershoot_pct = 100
        cfg.rc_overshoot_pct = 15
        cfg.rc_buf_sz, cfg.rc_buf_initial_sz, cfg.rc_buf_optimal_sz = settings.buffer_ms
        cfg.kf_mode = _KF_DISABLED
        cfg.kf_min_dist = 0
        cfg.kf_max_dist = 0x7FFFFFFF
        self._largest = (settings.width, settings.height)
        self._image = _Image()
        self._open()

    def _open(self) -> None:
        ctx = _CodecContext()
        status = self._lib.vpx_codec_enc_init_ver(
            ctypes.byref(ctx), self._lib.vpx_codec_vp8_cx(), ctypes.byref(self._cfg), 0, ENCODER_ABI_VERSION)
        if status != _CODEC_OK:
            raise LibvpxError("libvpx-failed", f"libvpx refused to start a VP8 encoder: {_err_text(status)}")
        self._ctx = ctx
        s = self.settings
        for control, value in (
            (_VP8E_SET_CPUUSED, s.cpu_used),
            (_VP8E_SET_NOISE_SENSITIVITY, s.noise_sensitivity),
            (_VP8E_SET_STATIC_THRESHOLD, s.static_threshold),
            (_VP8E_SET_TOKEN_PARTITIONS, 0),
            (_VP8E_SET_MAX_INTRA_BITRATE_PCT, s.max_keyframe_pct),
        ):
            self._check(self._lib.vpx_codec_control_(ctypes.byref(ctx), ctypes.c_int(control), ctypes.c_int(value)),
                        f"setting control {control}")

    @property
    def width(self) -> int:
        return int(self._cfg.g_w)

    @property
    def height(self) -> int:
        return int(self._cfg.g_h)

    @property
    def bitrate(self) -> int:
        return int(self._cfg.rc_target_bitrate) * 1000

    def reconfigure(self, *, bitrate: int | None = None, width: int | None = None, height: int | None = None) -> None:
        """Change rate or size on the running encoder.

        A rate change keeps the stream going without a keyframe. A size change
        makes the next frame a keyframe; a size larger than any the encoder has
        had restarts it, which also costs exactly that one keyframe.
        """
        cfg = self._cfg
        if bitrate is not None:
            cfg.rc_target_bitrate = _kbit(bitrate)
        if width is not None:
            cfg.g_w = width
        if height is not None:
            cfg.g_h = height
        if cfg.g_w > self._largest[0] or cfg.g_h > self._largest[1]:
            self._destroy()
            self._largest = (max(self._largest[0], cfg.g_w), max(self._largest[1], cfg.g_h))
            self._open()
            return
        self._check(self._lib.vpx_codec_enc_config_set(self._context(), ctypes.byref(cfg)), "reconfiguring")

    def encode(
        self, planes: Sequence[tuple[int, int]], pts: int, duration: int, keyframe: bool
    ) -> tuple[bytes, bool] | None:
        """Encode one I420 picture of the configured size; None if libvpx dropped it.

        ``planes`` are (address, stride) of the Y, U and V planes, which must
        stay alive during the call (libvpx copies them). ``pts`` and
        ``duration`` are in 90 kHz ticks and ``pts`` must increase.
        Returns the frame's bytes and whether it is a keyframe.
        """
        image = self._image
        width, height = self.width, self.height
        # With a buffer given, vpx_img_wrap only fills in the fields (it allocates nothing);
        # the plane addresses and strides are then set to the caller's own planes.
        self._lib.vpx_img_wrap(ctypes.byref(image), _IMG_FMT_I420, width, height, 1, planes[0][0])
        for i, (address, stride) in enumerate(planes[:3]):
            image.planes[i] = address
            image.stride[i] = stride
        ctx = self._context()
        flags = _EFLAG_FORCE_KF if keyframe else 0
        self._check(self._lib.vpx_codec_encode(ctx, ctypes.byref(image), pts, duration, flags, _DL_REALTIME),
                    "encoding")
        chunks: list[bytes] = []
        is_key = False
        iterator = ctypes.c_void_p(None)
        while True:
            packet = self._lib.vpx_codec_get_cx_data(ctx, ctypes.byref(iterator))
            if not packet:
                break
            if packet.contents.kind == _CX_FRAME_PKT:
                frame = packet.contents.data.frame
                chunks.append(ctypes.string_at(frame.buf, frame.sz))
                is_key = is_key or bool(frame.flags & _FRAME_IS_KEY)
        if not chunks:
            return None
        return b"".join(chunks), is_key

    def last_quantizer(self) -> int:
        """The quantizer (0..63) of the last encoded frame."""
        value = ctypes.c_int(0)
        self._check(self._lib.vpx_codec_control_(self._context(), ctypes.c_int(_VP8E_GET_LAST_QUANTIZER_64),
                                                 ctypes.byref(value)), "reading the quantizer")
        return value.value

    def close(self) -> None:
        self._destroy()

    def _destroy(self) -> None:
        if self._ctx is not None:
            self._lib.vpx_codec_destroy(ctypes.byref(self._ctx))
            self._ctx = None

    def _context(self) -> Any:
        if self._ctx is None:
            raise LibvpxError("libvpx-closed", "This VP8 encoder was closed.")
        return ctypes.byref(self._ctx)

    def _check(self, status: int, doing: str) -> None:
        if status == _CODEC_OK:
            return
        detail = ""
        if self._ctx is not None:
            raw = self._lib.vpx_codec_error_detail(ctypes.byref(self._ctx))
            detail = f" ({raw.decode(errors='replace')})" if raw else ""
        raise LibvpxError("libvpx-failed", f"libvpx failed {doing}: {_err_text(status)}{detail}")

    def __del__(self) -> None:
        self._destroy()


def _kbit(bitrate: int) -> int:
    return max(1, round(bitrate / 1000))
