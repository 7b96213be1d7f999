"""Named link profiles: what a participant's access link looks like, and where the numbers come from.

Each profile has an uplink (participant to server) and a downlink (server to
participant). Round-trip times are split evenly between the two directions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .link import DeliveryTrace, GilbertElliott, LinkProfile


@dataclass(frozen=True)
class NamedProfile:
    name: str
    uplink: LinkProfile
    downlink: LinkProfile
    source: str


def _both(link: LinkProfile, name: str, source: str) -> NamedProfile:
    return NamedProfile(name, link, link, source)


def traces_dir() -> Path:
    """Where the Mahimahi traces are: $NARA_TRACES, else shared/traces beside the project."""
    configured = os.environ.get("NARA_TRACES")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "traces"


def _trace_profile(name: str, stem: str, delay_ms: float, source: str) -> NamedProfile:
    folder = traces_dir()
    down = DeliveryTrace.load(folder / f"{stem}.down")
    up = DeliveryTrace.load(folder / f"{stem}.up")
    return NamedProfile(
        name,
        LinkProfile(trace=up, queue_ms=1000, delay_ms=delay_ms),
        LinkProfile(trace=down, queue_ms=1000, delay_ms=delay_ms),
        source,
    )


CATALOGUE: dict[str, NamedProfile] = {
    p.name: p
    for p in (
        _both(LinkProfile(), "loopback", "No impairment: the baseline of every comparison."),
        _both(
            LinkProfile(rate_bps=2_000_000, queue_bytes=50 * 1500, delay_ms=50, loss=0.03),
            "webrtc-moderate",
            "libwebrtc video/full_stack_tests.cc 'moderate': 2 Mbit/s, 50-packet queue, "
            "100 ms RTT, 3 % loss.",
        ),
        _both(
            LinkProfile(rate_bps=500_000, queue_bytes=50 * 1500, delay_ms=25, loss=0.03),
            "webrtc-500k-lossy",
            "libwebrtc full_stack_tests.cc: 500 kbit/s, 50 ms RTT, 3 % loss.",
        ),
        _both(
            LinkProfile(rate_bps=150_000, queue_bytes=20 * 1500),
            "webrtc-150k",
            "libwebrtc full_stack_tests.cc: 150 kbit/s, no loss.",
        ),
        _both(
            LinkProfile(rate_bps=400_000, queue_ms=400, delay_ms=175, loss=0.05),
            "poor-3g",
            "testRTC 'Poor 3G': 400 kbit/s, 350 ms RTT, 5 % loss.",
        ),
        _both(
            LinkProfile(rate_bps=4_000_000, queue_ms=300, delay_ms=250, loss=0.10),
            "unstable-4g",
            "testRTC 'Unstable 4G': 4 Mbit/s, 500 ms RTT, 10 % loss.",
        ),
        _both(
            LinkProfile(rate_bps=50_000, queue_ms=1000, delay_ms=250, loss=0.20),
            "call-drop",
            "testRTC 'Call Drop': 50 kbit/s, 500 ms RTT, 20 % loss.",
        ),
        NamedProfile(
            "edge",
            LinkProfile(rate_bps=200_000, queue_ms=1000, delay_ms=420),
            LinkProfile(rate_bps=240_000, queue_ms=1000, delay_ms=420),
            "WebPageTest 'EDGE': 240 kbit/s down, 200 kbit/s up, 840 ms RTT.",
        ),
        _both(
            LinkProfile(
                rate_bps=1_000_000,
                rate_steps=((40.0, 2_500_000.0), (60.0, 600_000.0), (80.0, 1_000_000.0)),
                queue_ms=300,
                delay_ms=50,
            ),
            "rfc8867-steps",
            "RFC 8867 §5.1: 1, 2.5, 0.6 and 1 Mbit/s from 0, 40, 60 and 80 s; 100 ms RTT.",
        ),
        NamedProfile(
            "geo-satellite",
            LinkProfile(rate_bps=1_000_000, queue_ms=800, delay_ms=300, jitter_ms=20,
                        bursts=GilbertElliott.with_mean(0.005, 5)),
            LinkProfile(rate_bps=4_000_000, queue_ms=800, delay_ms=300, jitter_ms=20,
                        bursts=GilbertElliott.with_mean(0.005, 5)),
            "Geostationary satellite: ~600 ms RTT from the 35 786 km orbit (physics); "
            "plan rates of a consumer service (4 Mbit/s down, 1 Mbit/s up) are assumptions; "
            "low loss in short bursts (0.5 %, bursts of 5).",
        ),
        NamedProfile(
            "starlink",
            LinkProfile(rate_bps=2_000_000, queue_ms=150, delay_ms=25, jitter_ms=10,
                        bursts=GilbertElliott.with_mean(0.01, 10),
                        outages=tuple((15.0 * k, 0.3) for k in range(1, 41))),
            LinkProfile(rate_bps=10_000_000, queue_ms=150, delay_ms=25, jitter_ms=10,
                        bursts=GilbertElliott.with_mean(0.01, 10),
                        outages=tuple((15.0 * k, 0.3) for k in range(1, 41))),
            "Low-earth-orbit satellite: ~50 ms median RTT and a short break at the "
            "15-second satellite handovers (public measurements); 1 % loss in bursts of 10.",
        ),
        NamedProfile(
            "inland-norrbotten-mobile",
            LinkProfile(rate_bps=350_000, queue_ms=600, delay_ms=60, jitter_ms=30,
                        bursts=GilbertElliott.with_mean(0.03, 4),
                        outages=((45.0, 5.0), (150.0, 20.0))),
            LinkProfile(rate_bps=1_200_000, queue_ms=600, delay_ms=60, jitter_ms=30,
                        bursts=GilbertElliott.with_mean(0.03, 4),
                        outages=((45.0, 5.0), (150.0, 20.0))),
            "Nära's own assumption for a farmhouse at a 4G cell edge inland in Norrbotten, "
            "inside the range DESIGN.md gives for the home end (150 kbit/s to 2 Mbit/s, "
            "1-10 % loss in bursts, outages): 1.2 Mbit/s down, 350 kbit/s up, ~120 ms RTT "
            "with 30 ms jitter, 3 % loss in bursts of 4, a 5 s outage at 45 s and a 20 s "
            "outage at 150 s.",
        ),
    )
}

# The links of `nara bench adapt`: a publisher on a clean, fast link; each subscriber
# on the link its scenario is about. Times are of the full-length run (see time_scaled).
ADAPT_PROFILES: dict[str, NamedProfile] = {
    p.name: p
    for p in (
        _both(LinkProfile(rate_bps=10_000_000, queue_ms=100, delay_ms=10),
              "adapt-clean", "A publisher on a clean, fast link: 10 Mbit/s, 20 ms RTT, no loss."),
        _both(LinkProfile(rate_bps=2_000_000, rate_steps=((10.0, 300_000.0), (25.0, 2_000_000.0)),
                          queue_ms=300, delay_ms=25),
              "adapt-step", "2 Mbit/s, down to 300 kbit/s at 10 s, back to 2 Mbit/s at 25 s; 50 ms RTT, "
                            "300 ms queue."),
        _both(LinkProfile(rate_bps=1_000_000, queue_ms=300, delay_ms=50, loss=0.05),
              "adapt-loss5", "1 Mbit/s, 100 ms RTT, 5 % random loss."),
        _both(LinkProfile(rate_bps=150_000, queue_ms=500, delay_ms=25),
              "adapt-thin150", "150 kbit/s, 50 ms RTT, 500 ms queue, no loss."),
        _both(LinkProfile(rate_bps=1_000_000, queue_ms=300, delay_ms=25, bursts=GilbertElliott.with_mean(0.10, 3)),
              "adapt-burst10", "1 Mbit/s, 50 ms RTT, 10 % loss in Gilbert-Elliott bursts of 3 packets on average."),
        _both(LinkProfile(rate_bps=300_000, queue_ms=300, delay_ms=25),
              "adapt-300k", "300 kbit/s, 50 ms RTT, no loss: the slow subscriber of a mixed consultation."),
        _both(LinkProfile(rate_bps=4_000_000, queue_ms=300, delay_ms=25),
              "adapt-4m", "4 Mbit/s, 50 ms RTT, no loss: the fast subscriber of a mixed consultation."),
        _both(LinkProfile(rate_bps=250_000, queue_ms=300, delay_ms=25),
              "adapt-250k", "250 kbit/s, 50 ms RTT, no loss (the layer-CPU scenario's first links)."),
        _both(LinkProfile(rate_bps=120_000, queue_ms=300, delay_ms=25),
              "adapt-120k", "120 kbit/s, 50 ms RTT, no loss: the relatives of the layer-CPU scenario, with room "
                            "for the lowest layer (50 kbit/s) beside the audio and never for the next (150 kbit/s)."),
    )
}
CATALOGUE.update(ADAPT_PROFILES)


def time_scaled(named: NamedProfile, factor: float) -> NamedProfile:
    """The same profile with its rate steps and outages ``factor`` times as far into the run."""
    def scale(link: LinkProfile) -> LinkProfile:
        return replace(link, rate_steps=tuple((at * factor, rate) for at, rate in link.rate_steps),
                       outages=tuple((at * factor, length) for at, length in link.outages))

    if factor == 1:
        return named
    return NamedProfile(named.name, scale(named.uplink), scale(named.downlink), named.source)


TRACE_PROFILES = {
    "umts-driving": ("TMobile-UMTS-driving", 40.0,
                     "Mahimahi trace TMobile-UMTS-driving (≈2.0/0.94 Mbit/s, gaps up to 5.8 s), 80 ms RTT."),
    "evdo-driving": ("Verizon-EVDO-driving", 60.0,
                     "Mahimahi trace Verizon-EVDO-driving (≈0.52 Mbit/s down, gaps up to 11.6 s), 120 ms RTT."),
}


def profile(name: str) -> NamedProfile:
    """A profile by name; trace profiles are loaded on first use."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    if name in TRACE_PROFILES:
        stem, delay, source = TRACE_PROFILES[name]
        return _trace_profile(name, stem, delay, source)
    known = ", ".join([*CATALOGUE, *TRACE_PROFILES])
    raise KeyError(f"unknown link profile {name!r}; known: {known}")

