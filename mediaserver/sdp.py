"""Small, exact edits to SDP text that aiortc does not offer a setting for."""

from __future__ import annotations

import re

OPUS_RTPMAP = re.compile(r"^a=rtpmap:(\d+) opus/48000(?:/2)?$", re.IGNORECASE | re.MULTILINE)


def with_opus_fec(sdp: str) -> str:
    """Ask for Opus in-band FEC (RFC 7587 ``useinbandfec=1``) on every Opus payload type.

    A browser sends FEC only when the other side says it wants it; aiortc's
    offers carry no Opus fmtp line at all.
    """
    lines = sdp.split("\r\n")
    out: list[str] = []
    for line in lines:
        match = OPUS_RTPMAP.match(line)
        if match is not None:
            payload_type = match.group(1)
            out.append(line)
            existing = next((i for i, other in enumerate(lines) if other.startswith(f"a=fmtp:{payload_type} ")), None)
            if existing is None:
                out.append(f"a=fmtp:{payload_type} minptime=10;useinbandfec=1")
            continue
        if line.startswith("a=fmtp:") and "useinbandfec" not in line:
            payload_type = line.split(" ", 1)[0].split(":", 1)[1]
            if any(OPUS_RTPMAP.match(other) and other.split(":", 1)[1].startswith(f"{payload_type} ")
                   for other in lines):
                line = f"{line};useinbandfec=1"
        out.append(line)
    return "\r\n".join(out)


def transport_cc_toward_subscribers(sdp: str) -> str:
    """Offer transport-wide congestion control only on the m-lines the server sends on.

    On an m-line the server receives on, a browser would stamp its packets and
    steer its own sending by feedback the server never sends; it keeps its
    REMB- and loss-based control there instead.
    """
    out: list[str] = []
    section: list[str] = []

    def flush() -> None:
        receiving = "a=recvonly" in section and section[0].startswith("m=")
        out.extend(line for line in section
                   if not receiving or ("transport-wide-cc" not in line and not line.endswith(" transport-cc")))
        section.clear()

    for line in sdp.split("\r\n"):
        if line.startswith("m="):
            flush()
        section.append(line)
    flush()
    return "\r\n".join(out)
