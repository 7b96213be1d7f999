"""Errors reported to people, each with a stable code and a sentence they can act on."""


class CodedError(Exception):
    """Base of every refusal Nära reports: ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MediaError(CodedError):
    """Something about a participant's media (SDP, negotiation) was refused."""
