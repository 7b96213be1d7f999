"""The network doctor's side of the server: its page, its TURN settings and its test connections.

IT staff check, from where a home kit or a browser stands, whether calls can
reach this server (docs/doctor.md). The checks need no consultation:

* ``GET /doctor/`` is the browser page (``/doctor/#token=<token>``).
* ``GET /doctor/config`` tells the client which TURN URLs and credentials to
  test, and the limits of the bandwidth test.
* ``POST /doctor/offer`` with ``{"sdp": offer}`` answers ``{"sdp": answer}``
  from a peer on the SFU's own host addresses (mediaserver/doctor_peer.py) that
  echoes pings and sends or swallows bytes for the bandwidth test.
* ``POST /api/doctor/tokens`` (admin key) mints a doctor token.

Both ``/doctor/config`` and ``/doctor/offer`` need one of: a doctor token or
any join token for an open consultation (``Authorization: Bearer <token>``),
or a home kit's credential (``Authorization: Device <device_id>:<secret>``).
Nobody gets a peer connection on the server without one. Offers are limited
per client address and in number at once, and every doctor peer closes
itself after ``PEER_LIFETIME`` seconds.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

import jwt
from aiohttp import web

from mediaserver.doctor_peer import MAX_BYTES, MAX_SECONDS, DoctorPeer

from .devices import DeviceError
from .ratelimit import TokenBucket
from .rest import api_error, json_body
from .tokens import TokenAuthority, TokenError
from .turn import ice_servers_for
from .web import PAGE_HEADERS, STATIC
from .ws import HUB

logger = logging.getLogger(__name__)

DOCTOR_ROOM = "network-doctor"  # the room claim of a doctor token; never a consultation's id
DOCTOR_TOKEN_TTL = 3600
DOCTOR_TOKEN_NAME = "Nätverkskontroll"
PEER_LIFETIME = 60.0  # seconds a doctor peer lives, whatever its client does
PEER_CONNECT_WITHIN = 20.0  # seconds for its connection to come up (the client gives up after 12)
MAX_PEERS = 8  # doctor peers at once on this server
OFFER_RATE = 1 / 3  # offers per second and client address, after a burst of
OFFER_BURST = 6
MAX_SDP = 16 * 1024
CLIENTS_REMEMBERED = 1024


def turn_checks(ice_servers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One check per TURN URL among ``ice_servers``: its kind (turn-udp, turn-tcp or turn-tls), URL and credentials."""
    checks = []
    for server in ice_servers:
        urls = server.get("urls", [])
        for url in [urls] if isinstance(urls, str) else urls:
            scheme, _, rest = str(url).partition(":")
            if scheme not in ("turn", "turns"):
                continue
            query = urllib.parse.parse_qs(rest.partition("?")[2])
            transport = query.get("transport", ["udp" if scheme == "turn" else "tcp"])[0]
            kind = "turn-tls" if scheme == "turns" else "turn-tcp" if transport == "tcp" else "turn-udp"
            checks.append({"kind": kind, "url": url, "username": server.get("username"),
                           "credential": server.get("credential")})
    return checks


class DoctorService:
    """The doctor peers alive on this server and the offer rate of each client address."""

    def __init__(self) -> None:
        self.peers: set[DoctorPeer] = set()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def may_offer(self, address: str) -> bool:
        bucket = self._buckets.pop(address, None) or TokenBucket(OFFER_RATE, OFFER_BURST)
        self._buckets[address] = bucket
        while len(self._buckets) > CLIENTS_REMEMBERED:
            self._buckets.popitem(last=False)
        return bucket.take()

    async def close(self, app: web.Application) -> None:
        for peer in list(self.peers):
            await peer.close()


DOCTOR: web.AppKey[DoctorService] = web.AppKey("doctor", DoctorService)


def authorise(request: web.Request) -> str:
    """Who asks (for the log), if they may; an ApiError otherwise."""
    hub = request.app[HUB]
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "device" and hub.devices is not None:
        device_id, _, secret = value.partition(":")
        try:
            device = hub.devices.store.authenticate(device_id, secret)
        except DeviceError as exc:
            raise api_error(401, exc.code, exc.message) from None
        if device.revoked:
            raise api_error(403, "device_revoked", "IT staff revoked this home kit; enrol it again.")
        return f"device {device.id}"
    if scheme.lower() != "bearer" or not value:
        raise api_error(401, "credential_missing",
                        "Send a doctor token or a join token as 'Authorization: Bearer <token>', "
                        "or a kit's credential as 'Authorization: Device <device_id>:<secret>'.")
    try:
        room = jwt.decode(value, options={"verify_signature": False}).get("room")
    except jwt.InvalidTokenError:
        raise api_error(403, "token_malformed", "The token is not a JWT.") from None
    if not isinstance(room, str):
        raise api_error(403, "token_claims_invalid", "The token has no room claim.")
    try:
        claims = hub.authority.verify(value, room)
    except TokenError as exc:
        raise api_error(403, exc.code, exc.message) from None
    if room != DOCTOR_ROOM:
        consultation = hub.store.get(room)
        if consultation is None or consultation.status != "open":
            raise api_error(403, "room_not_found", "The join token is for a consultation that is not open.")
    return f"participant {claims.participant_id}"


async def to_doctor_page(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/doctor/")


async def doctor_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "doctor.html", headers=PAGE_HEADERS)


async def doctor_config(request: web.Request) -> web.Response:
    authorise(request)
    hub = request.app[HUB]
    return web.json_response(
        {
            "turn": turn_checks(ice_servers_for(hub.config, "doctor", time.time())),
            "transport_policy": hub.config.ice_transport_policy,
            "limits": {"seconds": MAX_SECONDS, "bytes": MAX_BYTES, "peer_lifetime": PEER_LIFETIME},
        },
        headers={"Cache-Control": "no-store"},
    )


async def doctor_offer(request: web.Request) -> web.Response:
    service = request.app[DOCTOR]
    if not service.may_offer(request.remote or ""):
        raise api_error(429, "rate_limited", "Too many network checks from this address; wait a minute.")
    who = authorise(request)
    sdp = (await json_body(request)).get("sdp")
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or len(sdp) > MAX_SDP:
        raise api_error(400, "sdp_invalid", f"Send {{\"sdp\": <an SDP offer of at most {MAX_SDP} characters>}}.")
    if "m=application" not in sdp:
        raise api_error(400, "sdp_invalid", "The offer must carry the 'doctor' data channel.")
    if len(service.peers) >= MAX_PEERS:
        raise api_error(503, "doctor_busy", "Other network checks are running on this server; try again in a minute.")
    peer = DoctorPeer(PEER_LIFETIME, on_closed=service.peers.discard, connect_within=PEER_CONNECT_WITHIN)
    service.peers.add(peer)
    try:
        answer = await peer.answer(sdp)
    except ValueError as exc:  # aiortc's word on an offer it cannot take
        await peer.close()
        raise api_error(400, "sdp_invalid", f"The offer was not accepted: {exc}") from None
    logger.info("network check for %s from %s", who, request.remote)
    return web.json_response({"sdp": answer}, headers={"Cache-Control": "no-store"})


async def doctor_token(request: web.Request) -> web.Response:
    """A doctor token (admin key): it opens the network checks and nothing else."""
    hub = request.app[HUB]
    ttl = (await json_body(request)).get("ttl_seconds", DOCTOR_TOKEN_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= 12 * 3600:
        raise api_error(400, "ttl_invalid", "ttl_seconds must be a whole number from 1 to 43200.")
    token, expires_at = mint_doctor_token(hub.authority, ttl)
    return web.json_response(
        {"token": token, "expires_at": expires_at, "doctor_url": doctor_url(hub.config.base_url, token)},
        status=201,
    )


def doctor_url(base_url: str, token: str) -> str:
    """The browser page's link; the token rides in the fragment, out of every log."""
    return f"{base_url}/doctor/#token={token}"


def mint_doctor_token(authority: TokenAuthority, ttl: int = DOCTOR_TOKEN_TTL) -> tuple[str, int]:
    """A doctor token and when it expires (Unix seconds)."""
    token, claims = authority.mint(DOCTOR_ROOM, DOCTOR_TOKEN_NAME, "observer", ttl)
    return token, claims.expires_at


def add_routes(app: web.Application) -> None:
    service = DoctorService()
    app[DOCTOR] = service
    app.router.add_get("/doctor", to_doctor_page)
    app.router.add_get("/doctor/", doctor_page)
    app.router.add_get("/doctor/config", doctor_config)
    app.router.add_post("/doctor/offer", doctor_offer)
    app.router.add_post("/api/doctor/tokens", doctor_token)
    app.on_shutdown.append(service.close)

