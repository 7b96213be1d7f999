"""The kit's side of the device API: enrolment, its credential, and "where should I be now?".

A kit is enrolled once with a short code from IT staff and then holds a
per-device credential (a JSON file of mode 0600). With it the kit asks the
server, by itself, which consultation it should be in; the answer carries a
short-lived join token. Failures are sorted into what the reconnect logic
needs to know: no network at all, a server out of reach, a revoked kit, or
a credential that no longer works (the kit must be enrolled again).

No secret or token ever appears in a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .files import write_json_atomically
from .reconnect import Failure

SESSION_WAIT_MAX = 25.0
REQUEST_MARGIN = 5.0  # beyond a long poll's own wait, before a request counts as lost
PROBE_TIMEOUT = 1.0
_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}
_CREDENTIAL_FIELDS = ("server", "device_id", "secret", "name")


class CredentialError(Exception):
    """The credential file is missing or unusable: the kit must be enrolled."""


class Unreachable(Exception):
    """The server could not be reached or did not answer properly."""

    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


class Refused(Exception):
    """The server answered with an error: ``code`` is its stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def revoked(self) -> bool:
        return self.code == "device_revoked"

    @property
    def needs_enrolment(self) -> bool:
        """The credential will never work again: revoked, unknown or invalid."""
        return self.code in ("device_revoked", "device_unknown", "device_credential_invalid",
                             "device_credential_missing")


@dataclass(frozen=True)
class DeviceCredential:
    server: str
    device_id: str
    secret: str = field(repr=False)
    name: str

    def as_json(self) -> dict[str, str]:
        return {"server": self.server, "device_id": self.device_id, "secret": self.secret, "name": self.name}


@dataclass(frozen=True)
class Assignment:
    consultation_id: str
    title: str
    token: str = field(repr=False)
    expires_at: float
    participant_id: str
    name: str
    patient_ref: str = ""  # the consultation's pseudonymous patient reference, when the server gives it


@dataclass(frozen=True)
class Idle:
    next_consultation: str | None = None
    scheduled_for: float | None = None


def read_credential(path: Path) -> DeviceCredential:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CredentialError(f"no credential at {path}: enrol the kit with 'nara edge enrol'") from None
    except OSError as exc:
        raise CredentialError(f"cannot read the credential {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise CredentialError(f"the credential {path} is not JSON: enrol the kit again") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in _CREDENTIAL_FIELDS):
        raise CredentialError(f"the credential {path} lacks {', '.join(_CREDENTIAL_FIELDS)}: enrol the kit again")
    if os.stat(path).st_mode & 0o077:
        path.chmod(0o600)
    return DeviceCredential(data["server"], data["device_id"], data["secret"], data["name"])


def write_credential(path: Path, credential: DeviceCredential) -> None:
    """Write the credential atomically, readable by its owner only (0600)."""
    write_json_atomically(path, credential.as_json())


def classify(exc: BaseException) -> Unreachable:
    """What a failed request means for reconnecting: no network, or a server out of reach."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Unreachable(Failure.NO_NETWORK, "the server's name does not resolve")
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno in _NO_ROUTE:
        return Unreachable(Failure.NO_NETWORK, f"no route to the server ({exc.os_error.strerror})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Unreachable(Failure.UNREACHABLE, "the server refused the connection")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return Unreachable(Failure.UNREACHABLE, "the server did not answer in time")
    if isinstance(exc, OSError) and exc.errno in _NO_ROUTE:
        return Unreachable(Failure.NO_NETWORK, f"no route to the server ({exc.strerror})")
    return Unreachable(Failure.UNREACHABLE, f"the connection failed ({type(exc).__name__})")


async def _error_of(response: aiohttp.ClientResponse) -> Refused:
    try:
        body = await response.json(content_type=None)
        error = body["error"]
        return Refused(response.status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return Refused(response.status, f"http_{response.status}", response.reason or "")


async def enrol(server: str, code: str, timeout: float = 15.0) -> DeviceCredential:
    """Exchange an enrolment code for the kit's credential; raises Refused or Unreachable."""
    server = server.rstrip("/")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.post(f"{server}/api/devices/enrol", json={"code": code}) as response:
                if response.status != 200:
                    raise await _error_of(response)
                data: dict[str, Any] = await response.json()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise classify(exc) from None
    return DeviceCredential(server, str(data["device_id"]), str(data["secret"]), str(data["name"]))


class DeviceApi:
    """Requests the running kit makes with its credential, to ``server`` (the address it reaches the server by)."""

    def __init__(self, server: str, credential: DeviceCredential) -> None:
        self.server = server.rstrip("/")
        self.credential = credential
        # No keep-alive: after a network change a pooled connection is the likeliest to be dead.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def close(self) -> None:
        await self._http.close()

    async def session(self, wait: float = 0.0) -> Assignment | Idle:
        """Where the kit should be now: waits up to ``wait`` seconds for an assignment."""
        wait = max(0.0, min(wait, SESSION_WAIT_MAX))
        url = f"{self.server}/api/devices/{self.credential.device_id}/session"
        headers = {"Authorization": f"Device {self.credential.secret}"}
        timeout = aiohttp.ClientTimeout(total=wait + REQUEST_MARGIN, sock_connect=REQUEST_MARGIN)
        try:
            async with self._http.post(url, params={"wait": f"{wait:g}"}, headers=headers,
                                       timeout=timeout) as response:
                if response.status >= 500:
                    raise Unreachable(Failure.UNREACHABLE, f"the server answered {response.status}")
                if response.status != 200:
                    raise await _error_of(response)
                data: dict[str, Any] = await response.json()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise classify(exc) from None
        if data.get("state") == "assigned":
            return Assignment(
                consultation_id=str(data["consultation_id"]), title=str(data.get("title", "")),
                token=str(data["token"]), expires_at=float(data.get("expires_at", 0)),
                participant_id=str(data.get("participant_id", self.credential.device_id)),
                name=str(data.get("name", self.credential.name)),
                patient_ref=str(data.get("patient_ref") or ""),
            )
        upcoming = data.get("next") or {}
        scheduled = upcoming.get("scheduled_for")
        return Idle(upcoming.get("consultation_id"), float(scheduled) if scheduled is not None else None)

    async def probe(self, timeout: float = PROBE_TIMEOUT) -> bool:
        """Whether the server answers its health check within ``timeout`` seconds."""
        try:
            async with self._http.get(f"{self.server}/healthz",
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
