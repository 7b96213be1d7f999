"""The home kit's agent (`nara edge`): joins, stays connected, delivers stills."""
