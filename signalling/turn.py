"""The TURN servers a participant is given in ``joined``, with their credentials.

With ``[turn] static_auth_secret`` (coturn's ``use-auth-secret``, the "TURN REST
API" scheme) each participant gets a credential of its own that expires:
username ``<unix expiry>:<participant id>``, credential
base64(HMAC-SHA1(secret, username)). coturn checks it with the same secret and
refuses it after the expiry, so a leaked one is worth little. With a static
``username``/``credential`` everyone gets that pair.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from .config import ServerConfig


def time_limited_credential(secret: str, name: str, ttl: int, now: float) -> tuple[str, str]:
    """(username, credential) for coturn's use-auth-secret, valid ``ttl`` seconds from ``now``."""
    username = f"{int(now) + ttl}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers_for(config: ServerConfig, participant_id: str, now: float) -> list[dict[str, Any]]:
    """The ICE servers for one participant: ``config.ice_servers`` and the ``[turn]`` servers."""
    servers = list(config.ice_servers)
    if not config.turn_urls:
        return servers
    if config.turn_static_auth_secret is not None:
        username, credential = time_limited_credential(config.turn_static_auth_secret, participant_id,
                                                       config.turn_ttl, now)
    elif config.turn_username is not None and config.turn_credential is not None:
        username, credential = config.turn_username, config.turn_credential
    else:
        return servers  # nara check-config refuses TURN servers without credentials
    return [*servers, {"urls": list(config.turn_urls), "username": username, "credential": credential}]
