"""When to pass a keyframe request on to a publisher.

Subscribers ask for keyframes (PLI/FIR) after loss and when they join. Every
request costs the publisher a large frame on what may be a thin uplink, so
requests for one published stream are merged: at most one per ``interval``.
A request that arrives inside the interval is remembered and sent when the
interval ends, so no subscriber is left without a picture.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KeyframeThrottle:
    interval: float = 0.5
    last_sent: float | None = None
    pending: bool = False

    def request(self, now: float) -> bool:
        """A subscriber wants a keyframe; True means send a request upstream now."""
        if self.last_sent is None or now - self.last_sent >= self.interval:
            self.last_sent = now
            self.pending = False
            return True
        self.pending = True
        return False

    def due(self, now: float) -> bool:
        """True when a request held back earlier should be sent now."""
        if self.pending and self.last_sent is not None and now - self.last_sent >= self.interval:
            self.last_sent = now
            self.pending = False
            return True
        return False

    def keyframe_seen(self) -> None:
        """A keyframe arrived from the publisher: a held-back request is answered."""
        self.pending = False
