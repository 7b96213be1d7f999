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
