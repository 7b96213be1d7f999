"""Nära media server: a forwarding SFU on aiortc."""
