"""What the network doctor's checks found, and what it means for a call, in plain words.

Plain data and plain functions: ``verdict`` decides from the results alone, so
its tests need no network (docs/doctor.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PATH_ORDER = ("udp-direct", "turn-udp", "turn-tcp", "turn-tls")  # the order ICE would prefer them in
LABELS = {
    "http": "HTTP(S)", "websocket": "WebSocket", "credential": "Credential", "udp-direct": "UDP direct",
    "turn-udp": "TURN/UDP", "turn-tcp": "TURN/TCP", "turn-tls": "TURN/TLS",
    "bandwidth-down": "Bandwidth down", "bandwidth-up": "Bandwidth up",
}


@dataclass
class Check:
    kind: str  # http, websocket, credential, udp-direct, turn-udp, turn-tcp, turn-tls, bandwidth-down, bandwidth-up
    ok: bool
    rtt_ms: float | None = None
    kbps: float | None = None
    detail: str = ""
    url: str | None = None

    @property
    def label(self) -> str:
        return LABELS.get(self.kind, self.kind)


@dataclass
class Report:
    server: str
    checks: list[Check] = field(default_factory=list)
    on_check: Callable[[Check], None] | None = field(default=None, repr=False)  # each result as it comes
    relay_only: str | None = None  # why calls from here never go straight to the server, if they do not

    def add(self, check: Check) -> None:
        self.checks.append(check)
        if self.on_check is not None:
            self.on_check(check)

    def get(self, kind: str) -> Check | None:
        return next((c for c in self.checks if c.kind == kind), None)

    def as_json(self) -> dict[str, Any]:
        possible, words = verdict(self.checks, self.relay_only)
        return {"server": self.server, "call_possible": possible, "verdict": words, "relay_only": self.relay_only,
                "checks": [{k: v for k, v in asdict(c).items() if v is not None} for c in self.checks]}


# --- what the results mean ---------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def media_path(checks: list[Check]) -> Check | None:
    """The path a call would take: the first that worked in ICE's order of preference."""
    working = {c.kind: c for c in checks if c.ok and c.kind in PATH_ORDER}
    return next((working[k] for k in PATH_ORDER if k in working), None)


def bandwidth_words(down: float | None, up: float | None) -> str:
    """What the slower direction allows, in the words of a call."""
    known = [v for v in (down, up) if v is not None]
    if not known:
        return ""
    slowest = min(known)
    if slowest >= 1000:
        return "Bandwidth is enough for good video both ways."
    if slowest >= 300:
        return "Bandwidth is enough for video at reduced resolution."
    if slowest >= 100:
        return "Bandwidth allows audio and small, low-rate video only."
    return "Bandwidth is below 100 kbit/s: expect audio only, with gaps."


def verdict(checks: list[Check], relay_only: str | None = None) -> tuple[bool, str]:
    """Is a call possible from here, and what should IT staff know? In plain words.

    ``relay_only`` says why calls from here never go straight to the server, if they do not:
    the server's transport policy, or the kit's own relay.
    """
    by_kind = {c.kind: c for c in checks}
    http, ws = by_kind.get("http"), by_kind.get("websocket")
    if http is None or not http.ok:
        reason = http.detail if http else "not checked"
        return False, (f"The server cannot be reached ({reason}). Check the address, the name lookup (DNS) and "
                       "that outgoing HTTPS (TCP 443) is allowed.")
    if ws is None or not ws.ok:
        reason = ws.detail if ws else "not checked"
        return False, (f"The server answers HTTP but its WebSocket does not ({reason}): a proxy or firewall "
                       "blocks WebSocket upgrades, and no call can be set up. Allow WebSocket to the server.")
    credential = by_kind.get("credential")
    if credential is not None and not credential.ok:
        return False, (f"The server did not accept the credential ({credential.detail}), so the media paths were "
                       "not checked. Get a new doctor token (nara doctor-token), or check the kit's credential.")
    turn = [c for c in checks if c.kind.startswith("turn-")]
    failed_turn = [c for c in turn if not c.ok]
    down, up = by_kind.get("bandwidth-down"), by_kind.get("bandwidth-up")
    speed = bandwidth_words(down.kbps if down else None, up.kbps if up else None)
    if relay_only is not None:
        return _relayed_verdict(turn, ws, relay_only, speed)
    path = media_path(checks)
    if path is None:
        if not turn:
            return False, ("No media path: direct UDP to the media server is blocked and the server names no TURN "
                           "relay. Allow outgoing UDP to the server, or configure TURN over TLS on port 443.")
        return False, ("No media path: direct UDP is blocked and no TURN relay could be used ("
                       + "; ".join(f"{c.label}: {c.detail}" for c in failed_turn)
                       + "). Allow outgoing UDP, or TCP 443 to the TURN server.")
    words: list[str] = []
    if path.kind == "udp-direct":
        words.append(f"Calls go directly over UDP (round trip {_ms(path.rtt_ms)}).")
        if failed_turn:
            words.append("If UDP is ever blocked here there is no fallback: "
                         + "; ".join(f"{c.label} failed ({c.detail})" for c in failed_turn) + ".")
    else:
        extra = ""
        if path.rtt_ms is not None and ws is not None and ws.rtt_ms is not None:
            extra = f"; expect +{max(0.0, path.rtt_ms - ws.rtt_ms):.0f} ms over the server's own round trip"
        port = _port(path.url)
        if path.kind == "turn-udp":
            words.append(f"Direct UDP to the media server is blocked: calls will go through TURN over UDP "
                         f"(round trip {_ms(path.rtt_ms)}{extra}).")
        else:
            how = "TLS" if path.kind == "turn-tls" else "TCP"
            words.append(f"UDP is blocked: calls will go through TURN over {how} on port {port} "
                         f"(round trip {_ms(path.rtt_ms)}{extra}). Over TCP a lost packet holds up the ones "
                         "behind it, so sound and picture stall more on a lossy link than over UDP.")
    if speed:
        words.append(speed)
    return True, " ".join(words)


def _relayed_verdict(turn: list[Check], ws: Check, why: str, speed: str) -> tuple[bool, str]:
    path = media_path(turn)
    if path is None:
        failures = "; ".join(f"{c.label}: {c.detail}" for c in turn) or "none is configured"
        return False, (f"Every call from here goes through TURN ({why}), and no TURN relay could be used "
                       f"({failures}).")
    extra = ""
    if path.rtt_ms is not None and ws.rtt_ms is not None:
        extra = f"; +{max(0.0, path.rtt_ms - ws.rtt_ms):.0f} ms over the server's own round trip"
    how = {"turn-udp": "UDP", "turn-tcp": "TCP", "turn-tls": "TLS"}[path.kind]
    words = [f"Every call from here goes through TURN ({why}): over {how} on port {_port(path.url)} "
             f"(round trip {_ms(path.rtt_ms)}{extra})."]
    if path.kind != "turn-udp":
        words.append("Over TCP a lost packet holds up the ones behind it, so sound and picture stall more on a "
                     "lossy link than over UDP.")
    if speed:
        words.append(speed)
    return True, " ".join(words)


def _port(url: str | None) -> str:
    if not url:
        return "?"
    hostport = url.partition(":")[2].partition("?")[0]
    return hostport.rpartition(":")[2] if ":" in hostport else ("5349" if url.startswith("turns:") else "3478")


TABLE_HEADER = f"  {'check':<16}{'result':<8}{'measured':>14}  detail"


def render_row(c: Check) -> str:
    measured = f"{c.kbps:.0f} kbit/s" if c.kbps is not None else _ms(c.rtt_ms) if c.rtt_ms is not None else "-"
    detail = ": ".join(x for x in (c.url or "", c.detail) if x)
    return f"  {c.label:<16}{'ok' if c.ok else 'FAILED':<8}{measured:>14}  {detail}".rstrip()


def render_verdict(checks: list[Check], relay_only: str | None = None) -> str:
    possible, words = verdict(checks, relay_only)
    return ("A call is possible. " if possible else "No call is possible from here. ") + words


def render(report: Report) -> str:
    """The table and the verdict, for a terminal."""
    lines = [f"Nära network check of {report.server}", "", TABLE_HEADER]
    lines += [render_row(c) for c in report.checks]
    return "\n".join([*lines, "", render_verdict(report.checks, report.relay_only)])
