"""Nära signalling: consultations, join tokens, WebSocket offer/answer and events."""
