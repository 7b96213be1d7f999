"""Nära's video encoders: what comes out decodes to what went in, at the rate asked for.

H.264 tests run for every codec ``available_codecs()`` reports; VP8 must be there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.h264 import h264_depayload
from aiortc.codecs.vpx import VpxPayloadDescriptor, vp8_depayload

from bench.synthetic import FrameStamp, StampedVideoTrack, draw_stamp, read_stamp
from mediaserver.aiortc_adapter import prefer_codec, restrict_host_addresses, send_bitrate_cap, send_keyframe_request
from mediaserver.video_encoders import (
    EncodedFrame,
    EncodedVideoTrack,
    H264Encoder,
    VideoEncoder,
    Vp8Encoder,
    available_codecs,
    h264_payloads,
    vp8_payloads,
)
from mediaserver.video_payloads import h264_nal_units
from mediaserver.vp8 import is_keyframe_start

CODECS = available_codecs()
DECODERS = {"VP8": "vp8", "H264": "h264"}
TAG = 7


def make_encoder(codec: str, width: int, height: int, fps: float, bitrate: int, **kw: float) -> VideoEncoder:
    cls: type[VideoEncoder] = {"VP8": Vp8Encoder, "H264": H264Encoder}[codec]
    return cls(width, height, fps, bitrate, **kw)  # type: ignore[arg-type]


@functools.cache
def texture(width: int, height: int) -> np.ndarray:
    """A seeded, softly blurred block pattern larger than the picture, to pan across."""
    rng = np.random.default_rng(width * 7919 + height)
    blocks = rng.integers(56, 200, size=(height // 8 + 41, width // 8 + 61)).astype(np.float32)
    tex = np.kron(blocks, np.ones((8, 8), np.float32))
    for _ in range(2):
        tex = (tex + np.roll(tex, 3, 0) + np.roll(tex, 3, 1) + np.roll(tex, (3, 3), (0, 1))) / 4
    return tex.astype(np.uint8)


def source_luma(width: int, height: int, number: int) -> np.ndarray:
    """Picture ``number``: the texture panned 3 px right and 2 px down per frame, back and forth, stamped."""
    tex = texture(width, height)

    def bounce(position: int, span: int) -> int:
        position %= 2 * span
        return position if position < span else 2 * span - position

    x, y = bounce(number * 3, 480), bounce(number * 2, 320)
    luma = tex[y:y + height, x:x + width].copy()
    draw_stamp(luma, FrameStamp(TAG, number, 0))
    return luma


def picture(width: int, height: int, number: int) -> av.VideoFrame:
    chroma = np.full((height // 2, width), 128, dtype=np.uint8)
    return av.VideoFrame.from_ndarray(np.vstack([source_luma(width, height, number), chroma]), format="yuv420p")


def luma_of(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="yuv420p")[: frame.height]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def encode_run(encoder: VideoEncoder, width: int, height: int, fps: int, first: int, count: int,
               before: Callable[[int], None] | None = None) -> list[tuple[int, EncodedFrame]]:
    """Encode pictures ``first`` … ``first + count - 1``; the (number, frame) of each one that came out."""
    out = []
    for number in range(first, first + count):
        if before is not None:
            before(number)
        encoded = encoder.encode(picture(width, height, number), number * 90000 // fps)
        if encoded is not None:
            out.append((number, encoded))
    return out


def test_vp8_is_always_available() -> None:
    assert "VP8" in CODECS


@pytest.mark.parametrize("codec", CODECS)
def test_output_decodes_to_the_pictures_sent(codec: str) -> None:
    encoder = make_encoder(codec, 320, 240, 30, 600_000)
    decoder = av.CodecContext.create(DECODERS[codec], "r")
    decoded: list[av.VideoFrame] = []
    for number, encoded in encode_run(encoder, 320, 240, 30, 0, 30):
        assert encoded.timestamp == number * 3000
        decoded += decoder.decode(av.Packet(encoded.data))
    decoded += decoder.decode(None)
    assert [read_stamp(luma_of(f)).frame for f in decoded] == list(range(30))
    assert {(f.width, f.height) for f in decoded} == {(320, 240)}
    worst = min(psnr(luma_of(f), source_luma(320, 240, i)) for i, f in enumerate(decoded))
    assert worst > 30
    assert (encoder.frames, encoder.keyframes) == (30, 1)
    encoder.close()


def measured_rate(frames: list[tuple[int, EncodedFrame]], fps: int, since: int, until: int) -> float:
    """Bit/s of the frames numbered ``since`` up to (not including) ``until``."""
    sizes = [len(f.data) for number, f in frames if since <= number < until]
    return sum(sizes) * 8 * fps / (until - since)


@pytest.mark.parametrize("codec", CODECS)
def test_rate_follows_the_target_without_a_keyframe(codec: str) -> None:
    width, height, fps = 640, 360, 30
    encoder = make_encoder(codec, width, height, fps, 1_000_000, keyframe_interval=60.0)
    rates = {}
    number = 0
    for target in (1_000_000, 100_000, 30_000):
        encoder.set_target(bitrate=target)
        assert encoder.bitrate == target
        frames = encode_run(encoder, width, height, fps, number, 3 * fps)
        rates[target] = measured_rate(frames, fps, since=number + fps, until=number + 3 * fps)  # the last 2 s
        number += 3 * fps
    assert rates[1_000_000] > 600_000  # as much as this scene needs, near the target
    assert 50_000 < rates[100_000] < 150_000
    assert rates[30_000] < 50_000
    assert encoder.keyframes == 1  # the first frame only
    encoder.close()


@pytest.mark.parametrize("codec", CODECS)
def test_keyframes_come_every_interval(codec: str) -> None:
    encoder = make_encoder(codec, 320, 180, 15, 300_000, keyframe_interval=1.0)
    frames = encode_run(encoder, 320, 180, 15, 0, 60)
    assert len(frames) == 60
    assert [n for n, f in frames if f.keyframe] == [0, 15, 30, 45]
    encoder.close()


@pytest.mark.parametrize("codec", CODECS)
def test_a_requested_keyframe_comes_on_the_next_frame_and_repeats_merge(codec: str) -> None:
    encoder = make_encoder(codec, 320, 180, 15, 300_000, keyframe_interval=60.0)
    requests = {20: 1, 40: 3}  # frame number -> requests made just before it

    def ask(number: int) -> None:
        for _ in range(requests.get(number, 0)):
            encoder.request_keyframe()

    frames = encode_run(encoder, 320, 180, 15, 0, 60, before=ask)
    assert [n for n, f in frames if f.keyframe] == [0, 20, 40]
    decoder = av.CodecContext.create(DECODERS[codec], "r")  # a receiver joining at the requested keyframe
    decoded = [p for _, f in frames[20:] for p in decoder.decode(av.Packet(f.data))] + decoder.decode(None)
    assert read_stamp(luma_of(decoded[0])).frame == 20
    assert len(decoded) == 40
    encoder.close()


@pytest.mark.parametrize("codec", CODECS)
def test_a_lower_frame_rate_keeps_fewer_frames_without_a_keyframe(codec: str) -> None:
    encoder = make_encoder(codec, 320, 180, 30, 300_000, keyframe_interval=60.0)
    assert len(encode_run(encoder, 320, 180, 30, 0, 30)) == 30
    encoder.set_target(framerate=10)
    frames = encode_run(encoder, 320, 180, 30, 30, 60)
    assert len(frames) == 20
    assert [n for n, _ in frames][:4] == [30, 33, 36, 39]
    assert not any(f.keyframe for _, f in frames)
    assert encoder.skipped == 40
    encoder.close()


@pytest.mark.parametrize("codec", CODECS)
def test_a_new_size_costs_one_keyframe_and_decodes_at_that_size(codec: str) -> None:
    encoder = make_encoder(codec, 640, 360, 15, 500_000, keyframe_interval=60.0)
    decoder = av.CodecContext.create(DECODERS[codec], "r")
    sizes = []
    number = 0
    for width, height in ((640, 360), (320, 180), (640, 360), (960, 540)):  # the last is above the first size
        encoder.set_target(width=width, height=height)
        frames = encode_run(encoder, 640, 360, 15, number, 10)
        number += 10
        assert [f.keyframe for _, f in frames] == [True] + [False] * 9  # the first frame, then each change
        for _, f in frames:
            sizes += [(p.width, p.height) for p in decoder.decode(av.Packet(f.data))]
    sizes += [(p.width, p.height) for p in decoder.decode(None)]
    assert sizes == [(640, 360)] * 10 + [(320, 180)] * 10 + [(640, 360)] * 10 + [(960, 540)] * 10
    assert encoder.keyframes == 4
    encoder.close()


@pytest.mark.parametrize("codec", CODECS)
def test_pictures_of_another_size_and_format_are_converted(codec: str) -> None:
    encoder = make_encoder(codec, 320, 180, 15, 400_000)
    decoder = av.CodecContext.create(DECODERS[codec], "r")
    decoded = []
    for number in range(10):
        big = picture(1280, 720, number).reformat(format="rgb24")
        encoded = encoder.encode(big, number * 6000)
        assert encoded is not None
        decoded += decoder.decode(av.Packet(encoded.data))
    decoded += decoder.decode(None)
    assert {(f.width, f.height) for f in decoded} == {(320, 180)}
    assert [read_stamp(luma_of(f)).frame for f in decoded] == list(range(10))
    encoder.close()


@pytest.mark.parametrize("codec", CODECS)
def test_timestamps_that_wrap_around_keep_the_schedule(codec: str) -> None:
    encoder = make_encoder(codec, 320, 180, 15, 300_000, keyframe_interval=1.0)
    start = 0xFFFFFFFF - 6000 * 10 + 1
    out = [encoder.encode(picture(320, 180, i), (start + i * 6000) & 0xFFFFFFFF) for i in range(30)]
    assert all(f is not None for f in out)
    assert [i for i, f in enumerate(out) if f is not None and f.keyframe] == [0, 15]
    assert [f.timestamp for f in out if f is not None][9:12] == [0xFFFFFFFF - 5999, 0, 6000]
    encoder.close()


@pytest.mark.parametrize("codec", [c for c in CODECS if c == "H264"])
def test_h264_rate_above_its_cap_waits_for_the_next_keyframe_due(codec: str) -> None:
    encoder = make_encoder(codec, 640, 360, 30, 100_000, keyframe_interval=1.0)
    frames = encode_run(encoder, 640, 360, 30, 0, 45)
    encoder.set_target(bitrate=600_000)  # above the cap x264 was opened with
    frames += encode_run(encoder, 640, 360, 30, 45, 75)
    assert [n for n, f in frames if f.keyframe] == [0, 30, 60, 90]  # no keyframe of its own
    assert measured_rate(frames, 30, 45, 60) < 150_000  # still capped
    assert measured_rate(frames, 30, 61, 90) > 300_000  # reopened at the keyframe at 60
    encoder.close()


def test_a_missing_libvpx_is_reported_with_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mediaserver import libvpx

    monkeypatch.setattr(av, "__file__", str(tmp_path / "av" / "__init__.py"))
    with pytest.raises(libvpx.LibvpxError) as refused:
        libvpx.library_path()
    assert refused.value.code == "libvpx-missing"
    assert "pip install" in refused.value.message


def test_libvpx_is_the_version_its_structures_were_written_for() -> None:
    from mediaserver import libvpx

    assert libvpx.version().startswith("v1.16")
    cfg = libvpx.default_config()  # checks the layout of vpx_codec_enc_cfg_t at both ends
    assert (cfg.g_w, cfg.g_h, cfg.rc_max_quantizer) == (320, 240, 63)


def test_vp8_payloads_reassemble_and_mark_where_keyframes_start() -> None:
    encoder = Vp8Encoder(640, 360, 30, 1_000_000)
    frames = encode_run(encoder, 640, 360, 30, 0, 5)
    assert frames[0][1].keyframe and not frames[1][1].keyframe
    for i, (_, frame) in enumerate(frames):
        payloads = vp8_payloads(frame, picture_id=0x7FFE + i)  # wraps to 0 at the third frame
        assert all(len(p) <= 1100 for p in payloads)
        assert max(map(len, payloads)) - min(map(len, payloads)) <= 1  # spread evenly
        assert b"".join(vp8_depayload(p) for p in payloads) == frame.data
        descriptors = [VpxPayloadDescriptor.parse(p)[0] for p in payloads]
        assert {d.picture_id for d in descriptors} == {(0x7FFE + i) & 0x7FFF}
        assert [d.partition_start for d in descriptors] == [1] + [0] * (len(payloads) - 1)
        assert {d.partition_id for d in descriptors} == {0}
        assert is_keyframe_start(payloads[0]) == frame.keyframe
        assert not any(is_keyframe_start(p) for p in payloads[1:])
    assert len(vp8_payloads(frames[0][1], 0)) > 1  # the keyframe needed several packets
    small = EncodedFrame(data=b"\x31" * 10, keyframe=False, timestamp=0)
    assert vp8_payloads(small, 5) == [bytes((0x90, 0x80, 0x80, 0x05)) + small.data]
    encoder.close()


@pytest.mark.parametrize("codec", [c for c in CODECS if c == "H264"])
def test_h264_payloads_reassemble_into_a_stream_that_decodes(codec: str) -> None:
    encoder = make_encoder(codec, 640, 360, 30, 1_000_000, keyframe_interval=0.5)
    frames = encode_run(encoder, 640, 360, 30, 0, 20)
    for number in (0, 15):  # every keyframe starts with SPS and PPS, then the IDR slice
        units = [unit[0] & 0x1F for unit in h264_nal_units(frames[number][1].data)]
        assert units[:2] == [7, 8] and 5 in units
    key = frames[0][1]
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for _, frame in frames:
        payloads = h264_payloads(frame)
        assert all(len(p) <= 1100 for p in payloads)
        assert {p[0] & 0x1F for p in payloads} <= {1, 5, 6, 7, 8, 28}  # single NAL units and FU-A
        stream = b"".join(h264_depayload(p) for p in payloads)
        assert h264_nal_units(stream) == h264_nal_units(frame.data)
        decoded += decoder.decode(av.Packet(stream))
    decoded += decoder.decode(None)
    assert [read_stamp(luma_of(f)).frame for f in decoded] == list(range(20))
    assert any(p[0] & 0x1F == 28 for p in h264_payloads(key))
    encoder.close()


# --- a publisher over real aiortc peer connections ----------------------------


@pytest.fixture
async def loopback_only() -> AsyncIterator[None]:
    restrict_host_addresses(["127.0.0.1"])
    yield
    restrict_host_addresses(None)


def without_abs_send_time(sdp: str) -> str:
    """The SDP without the abs-send-time extension: aiortc's receiver then sends no REMB of its own."""
    return "".join(line for line in sdp.splitlines(keepends=True) if "abs-send-time" not in line)


async def test_published_track_follows_remb_down_in_steps_and_answers_pli(loopback_only: None) -> None:
    source = StampedVideoTrack(TAG, width=640, height=360, fps=30)
    encoder = Vp8Encoder(640, 360, 30, 800_000, keyframe_interval=60.0)
    track = EncodedVideoTrack(source, encoder)
    publisher, subscriber = RTCPeerConnection(), RTCPeerConnection()
    seen: list[tuple[int, int, int]] = []  # width, height, frame number of each decoded picture
    changed = asyncio.Condition()
    reader: asyncio.Task[None] | None = None

    async def read(remote: av.VideoFrame) -> None:
        while True:
            frame = await remote.recv()
            stamp = read_stamp(luma_of(frame)) if frame.width >= 320 else None
            assert stamp is None or stamp.tag == TAG
            seen.append((frame.width, frame.height, stamp.frame if stamp else -1))
            async with changed:
                changed.notify_all()

    async def until(predicate: Callable[[], bool]) -> None:
        async with changed:
            await asyncio.wait_for(changed.wait_for(predicate), 10)

    try:
        transceiver = publisher.addTransceiver(track, direction="sendonly")
        prefer_codec(transceiver, "video/VP8", with_rtx=False)
        track.attach(transceiver.sender)
        await publisher.setLocalDescription(await publisher.createOffer())
        offer = publisher.localDescription
        await subscriber.setRemoteDescription(RTCSessionDescription(without_abs_send_time(offer.sdp), offer.type))
        await subscriber.setLocalDescription(await subscriber.createAnswer())
        await publisher.setRemoteDescription(subscriber.localDescription)
        receiver = subscriber.getTransceivers()[0].receiver
        reader = asyncio.ensure_future(read(receiver.track))

        await until(lambda: len(seen) >= 10)
        assert {(w, h) for w, h, _ in seen} == {(640, 360)}
        numbers = [n for _, _, n in seen]
        assert numbers == sorted(numbers)
        stats = await transceiver.sender.getStats()
        ssrc = next(s.ssrc for s in stats.values() if s.type == "outbound-rtp")

        # 100 kbit/s: 90 kbit/s with headroom, half size at 10 fps, one keyframe for the change
        keyframes = encoder.keyframes
        await send_bitrate_cap(receiver, 100_000, [ssrc])
        await until(lambda: sum(1 for w, _, _ in seen if w == 320) >= 5)
        assert track.remb == 100_000
        assert (encoder.bitrate, encoder.framerate) == (90_000, 10.0)
        assert encoder.keyframes == keyframes + 1

        # a PLI from the receiver: the publisher sends a keyframe, pictures keep coming
        keyframes = encoder.keyframes
        await send_keyframe_request(receiver, ssrc)
        await until(lambda: encoder.keyframes == keyframes + 1)
        count = len(seen)
        await until(lambda: len(seen) >= count + 3)

        # 40 kbit/s: a quarter of the size at 7 fps, again one keyframe
        keyframes = encoder.keyframes
        await send_bitrate_cap(receiver, 40_000, [ssrc])
        await until(lambda: sum(1 for w, _, _ in seen if w == 160) >= 3)
        assert (encoder.width, encoder.height, encoder.bitrate, encoder.framerate) == (160, 90, 36_000, 7.0)
        assert encoder.keyframes == keyframes + 1
        widths = [w for w, _, _ in seen]
        assert widths == sorted(widths, reverse=True)  # straight down, no flapping
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        await publisher.close()
        await subscriber.close()
