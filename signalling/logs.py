"""The server's log: plain text or one JSON object per line, with secrets taken out of either.

``server.log_format = "json"`` writes every record as one line of JSON with
``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, plus whatever
the caller gave as ``extra`` (``room``, ``participant``, ...) and ``exception``
when there is a traceback.

Whatever the format, every line passes ``redact`` first: join tokens and other
JWTs, ``token=`` (and key, secret, password, credential) values in query
strings and fragments, ``Authorization`` header values, passwords in URLs,
TURN credentials in JSON, and every secret value the server knows (its admin
key, its token-signing secret, TURN secrets) registered with ``hide``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

REDACTED = "[redacted]"
_MIN_SECRET = 8  # shorter values are not hidden by value (they would blank ordinary words)

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A JWT: three base64url parts, the header always a JSON object ("eyJ").
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # name=value in a query string, a fragment or a form body.
    (re.compile(r"(?i)((?:^|(?<=[?&#;\s\"'/]))[\w-]*(?:token|key|secret|password|passwd|credential)=)[^&\s\"';,#]+"),
     r"\1" + REDACTED),
    # An Authorization header (keeping its scheme), and a bearer credential anywhere.
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)[^\s\"',;]+"),
     r"\1" + REDACTED),
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + REDACTED),
    # user:password@ in a URL (redis://:pw@host).
    (re.compile(r"(//[^/@\s:\"']*:)[^@\s/\"']+@"), r"\1" + REDACTED + "@"),
    # A credential, password or secret as a JSON or Python dict entry.
    (re.compile(r"(?i)([\"'](?:credential|password|secret|static_auth_secret|admin_key|token)[\"']\s*:\s*[\"'])"
                r"[^\"']+"), r"\1" + REDACTED),
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def hide(*values: str | None) -> None:
    """Never let these exact values into the log (the admin key, signing secrets, TURN credentials)."""
    with _secrets_lock:
        _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET)


def redact(text: str) -> str:
    for value in sorted(_secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class RedactSecrets(logging.Filter):
    """Rewrites each record's message, extras and traceback with ``redact`` before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, name, redact(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and not name.startswith("_"):
                entry[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(log_format: str = "text", level: str = "info") -> logging.Handler:
    """Send every log record to stderr in ``log_format`` ("text" or "json"), secrets redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn(...) goes through the same handler
    return handler
