"""``nara bench upload``'s own arithmetic: which seconds count, what goodput is, and the photo it sends.

The run itself needs network namespaces and minutes; these check, exactly,
the figures it reports from what it recorded.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bench.metrics import AudioReceipt
from bench.upload import padded, socket_stats, wound_photo
from bench.upload_figures import goodput_share, phase_figures, recovery, up_time, up_windows

RATE = 48000
FRAME = 960  # 20 ms


def receipts(start: float, end: float, silent: tuple[tuple[float, float], ...] = (),
             missing: tuple[tuple[float, float], ...] = ()) -> list[AudioReceipt]:
    """20 ms frames from ``start`` to ``end``; none arrive in ``missing``, they arrive without sound in ``silent``."""
    out = []
    for n in range(round((end - start) / 0.02)):
        at = start + n * 0.02
        if any(a <= at < b for a, b in missing):
            continue
        played = not any(a <= at < b for a, b in silent)
        out.append(AudioReceipt(at, n * FRAME, RATE, 0.02, played))
    return out


@pytest.mark.parametrize(("outages", "allowance", "expected"), [
    ((), 0.0, [(0.0, 100.0)]),
    (((30.0, 50.0),), 0.0, [(0.0, 30.0), (50.0, 100.0)]),
    (((30.0, 50.0),), 3.0, [(0.0, 30.0), (53.0, 100.0)]),
    (((30.0, 50.0), (70.0, 90.0)), 3.0, [(0.0, 30.0), (53.0, 70.0), (93.0, 100.0)]),
    (((-10.0, 5.0), (98.0, 120.0)), 3.0, [(8.0, 98.0)]),  # outages reaching over either end
    (((10.0, 20.0), (21.0, 30.0)), 3.0, [(0.0, 10.0), (33.0, 100.0)]),  # the allowance covers the next start
])
def test_the_seconds_judged_leave_out_each_outage_and_the_allowance_after_it(
        outages: tuple[tuple[float, float], ...], allowance: float, expected: list[tuple[float, float]]) -> None:
    assert up_windows((0.0, 100.0), outages, allowance) == expected


def test_goodput_counts_only_the_time_the_link_was_up() -> None:
    # 5 MB in 240 s with two 20 s outages: 200 s up, 200 kbit/s, 78 % of 256 kbit/s.
    span, outages = (10.0, 250.0), ((40.0, 60.0), (130.0, 150.0))
    assert up_time(span, outages) == pytest.approx(200.0)
    assert goodput_share(5_000_000, span, outages, 256_000) == pytest.approx(200_000 / 256_000)


def test_the_audio_gap_of_a_phase_is_what_did_not_play_while_the_call_was_up() -> None:
    # 60 s of a call; an outage from 20 to 40 s (nothing arrives), the audio back 1.5 s later; then 1 s of
    # concealed sound at 50 s. Judged: 0-20 and 41.5-60 s = 38.5 s, of which 1 s did not play.
    heard = receipts(0.0, 60.0, silent=((50.0, 51.0),), missing=((20.0, 41.5),))
    phase = phase_figures(heard, (0.0, 60.0), [(20.0, 40.0), (200.0, 220.0)])
    assert phase.outages == ((20.0, 40.0),), "only the outages within the phase"
    assert phase.recoveries == (pytest.approx(1.5, abs=0.021),)
    assert phase.judged_seconds == pytest.approx(38.5, abs=0.021)
    assert phase.audio_gap == pytest.approx(1.0 / 38.5, abs=0.002)


def test_audio_that_never_comes_back_is_a_recovery_of_never_and_all_gap() -> None:
    heard = receipts(0.0, 20.0)
    assert recovery(heard, (20.0, 30.0)) is None
    phase = phase_figures(heard, (0.0, 60.0), [(20.0, 30.0)])
    assert phase.judged_seconds == pytest.approx(50.0)
    assert phase.audio_gap == pytest.approx(30.0 / 50.0, abs=0.01)


@pytest.mark.parametrize("extra", [0, 4, 5, 1000, 65536, 65537, 65538, 65540, 65541, 131073, 131078, 200_001])
def test_padding_gives_the_exact_size_and_the_picture_still_decodes(extra: int) -> None:
    ok, encoded = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))
    jpeg = encoded.tobytes()
    grown = padded(jpeg, len(jpeg) + extra)
    assert len(grown) == len(jpeg) + extra
    picture = cv2.imdecode(np.frombuffer(grown, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape == (48, 64, 3)


def test_the_photo_is_a_full_resolution_jpeg_of_the_size_asked_for() -> None:
    photo = wound_photo(5_000_000, seed=1)
    assert len(photo) == 5_000_000
    picture = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[1] == 4056, "a 12-megapixel still"
    assert wound_photo(5_000_000, seed=1) == photo, "the same run sends the same bytes"


SS_OUTPUT = """State Recv-Q Send-Q Local Address:Port  Peer Address:Port Process
ESTAB 0      0           10.78.0.2:45002     10.78.0.1:8123
\t cubic wscale:7,7 rto:1230 rtt:640.5/80.2 mss:1448 cwnd:3 bytes_sent:1200 bytes_retrans:0 bytes_acked:1200
ESTAB 0      61000       10.78.0.2:45010     10.78.0.1:8123
\t cubic wscale:7,7 rto:2048 rtt:812.25/120.5 mss:1448 cwnd:7 ssthresh:5 bytes_sent:2900000 bytes_retrans:310000 \
bytes_acked:2500000 unacked:12 retrans:1/220 lost:3
"""


def test_the_kit_upload_socket_is_read_from_ss() -> None:
    stats = socket_stats(SS_OUTPUT, "10.78.0.1")
    assert stats == {"tcp_connections": 2, "tcp_cc": "cubic", "tcp_cwnd": 7.0, "tcp_rtt_ms": 812.25,
                     "tcp_rto_ms": 2048.0, "tcp_unacked": 12.0, "tcp_bytes_retrans": 310000.0}
    assert socket_stats("State Recv-Q Send-Q Local Address:Port  Peer Address:Port Process\n", "10.78.0.1") == {}


def test_the_kit_upload_sockets_own_pacing_and_bbr_estimate_are_read_from_ss() -> None:
    output = ("ESTAB 0 0 10.78.0.2:45010 10.78.0.1:8123\n\t bbr wscale:7,7 rto:364 rtt:154.02/5.317 cwnd:9 "
              "bytes_sent:900000 bbr:(bw:204376bps,mrtt:149.973,pacing_gain:1.25,cwnd_gain:2) "
              "pacing_rate 202328bps/1.2Mbps delivery_rate 148512bps app_limited unacked:4 notsent:16498\n")
    stats = socket_stats(output, "10.78.0.1")
    assert stats["tcp_pacing_kbps"] == pytest.approx(202.328) and stats["tcp_max_pacing_kbps"] == 1200.0
    assert stats["tcp_bbr_bw_kbps"] == pytest.approx(204.376) and stats["tcp_bbr_gain"] == 1.25
    assert stats["tcp_notsent"] == 16498.0
