"""Join tokens: short-lived JWTs that let one participant into one consultation.

Claims: ``sub`` (participant id), ``name``, ``role``, ``room`` (consultation
id), ``iss``, ``aud``, ``iat``, ``exp`` and ``jti``. HS256 with the server's
generated secret by default; EdDSA or RS256 with key files when configured.
Every refusal carries a stable code (see ``TokenError``).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from mediaserver.errors import CodedError

ROLES = ("clinician", "nurse", "patient", "relative", "kit", "observer")
PUBLISHING_ROLES = frozenset({"clinician", "nurse", "patient", "relative", "kit"})
SUPPORTED_ALGORITHMS = ("HS256", "EdDSA", "RS256")
DEFAULT_TTL = 2 * 3600
MAX_TTL = 12 * 3600
MAX_TOKEN_LENGTH = 4096
LEEWAY = 5  # seconds of clock skew tolerated between servers
PARTICIPANT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class TokenError(CodedError):
    """A token was refused."""


@dataclass(frozen=True)
class JoinClaims:
    participant_id: str
    name: str
    role: str
    room: str
    jti: str
    issued_at: int
    expires_at: int

    @property
    def may_publish(self) -> bool:
        return self.role in PUBLISHING_ROLES


@dataclass(frozen=True)
class TokenKeys:
    algorithm: str
    signing_key: Any  # None when this server only verifies
    verification_key: Any

    @classmethod
    def shared_secret(cls, secret: bytes) -> TokenKeys:
        if len(secret) < 32:
            raise ValueError("the HS256 secret must be at least 32 bytes")
        return cls("HS256", secret, secret)

    @classmethod
    def from_files(cls, algorithm: str, private_key: Path | None, public_key: Path) -> TokenKeys:
        if algorithm not in ("EdDSA", "RS256"):
            raise ValueError(f"key files are for EdDSA or RS256, not {algorithm}")
        signing = private_key.read_bytes() if private_key is not None else None
        return cls(algorithm, signing, public_key.read_bytes())


class TokenAuthority:
    def __init__(
        self,
        keys: TokenKeys,
        issuer: str = "nara",
        audience: str = "nara",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.clock = clock

    def mint(
        self,
        room: str,
        name: str,
        role: str,
        ttl: int = DEFAULT_TTL,
        participant_id: str | None = None,
    ) -> tuple[str, JoinClaims]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"token lifetime must be between 1 s and {MAX_TTL} s")
        name = name.strip()
        if not 0 < len(name) <= 100:
            raise ValueError("name must be 1 to 100 characters")
        participant_id = participant_id or f"{role}-{secrets.token_hex(4)}"
        if not PARTICIPANT_ID.match(participant_id):
            raise ValueError("participant id: 1 to 64 letters, digits or _.:-")
        if self.keys.signing_key is None:
            raise ValueError("this server has no private key to sign tokens with")
        now = int(self.clock())
        claims = JoinClaims(participant_id, name, role, room, secrets.token_hex(12), now, now + ttl)
        payload = {
            "sub": claims.participant_id,
            "name": claims.name,
            "role": claims.role,
            "room": claims.room,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": claims.issued_at,
            "exp": claims.expires_at,
            "jti": claims.jti,
        }
        token = jwt.encode(payload, self.keys.signing_key, algorithm=self.keys.algorithm)
        return token, claims

    def verify(self, token: Any, room: str) -> JoinClaims:
        """The claims of a valid token for ``room``, or TokenError."""
        if not isinstance(token, str) or not token:
            raise TokenError("token_missing", "A join token is required.")
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenError("token_malformed", "The join token is too long.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenError("token_malformed", "The join token is not a JWT.") from None
        algorithm = str(header.get("alg", ""))
        if algorithm.lower() == "none":
            raise TokenError("token_alg_none", "Unsigned tokens are not accepted.")
        if algorithm != self.keys.algorithm:
            raise TokenError(
                "token_alg_not_allowed",
                f"Tokens must be signed with {self.keys.algorithm}, not {algorithm or 'nothing'}.",
            )
        try:
            payload = jwt.decode(
                token,
                self.keys.verification_key,
                algorithms=[self.keys.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["sub", "iss", "aud", "iat", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "The join link has expired; ask for a new one.") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token_not_yet_valid", "The join token is not valid yet.") from None
        except jwt.InvalidAudienceError:
            raise TokenError(
                "token_wrong_audience", "The join token is not meant for this service."
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenError("token_wrong_issuer", "The join token was issued by someone else.") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token_bad_signature", "The join token's signature is not valid.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("token_claims_invalid", f"The join token lacks the {exc.claim} claim.") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("token_alg_not_allowed", "The join token's algorithm is not accepted.") from None
        except jwt.DecodeError:
            raise TokenError("token_malformed", "The join token could not be decoded.") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError("token_invalid", f"The join token is not valid: {exc}.") from None
        return self._claims(payload, room)

    def _claims(self, payload: dict[str, Any], room: str) -> JoinClaims:
        def text(key: str, limit: int) -> str:
            value = payload.get(key)
            if not isinstance(value, str) or not 0 < len(value) <= limit:
                raise TokenError("token_claims_invalid", f"The join token's {key} claim is not valid.")
            return value

        participant_id = text("sub", 64)
        if not PARTICIPANT_ID.match(participant_id):
            raise TokenError("token_claims_invalid", "The join token's sub claim is not valid.")
        name, role, token_room, jti = text("name", 100), text("role", 20), text("room", 64), text("jti", 64)
        if role not in ROLES:
            raise TokenError("token_claims_invalid", f"Unknown role {role!r}.")
        issued_at, expires_at = payload["iat"], payload["exp"]
        if not isinstance(issued_at, int) or not isinstance(expires_at, int):
            raise TokenError("token_claims_invalid", "The join token's times are not whole seconds.")
        if expires_at - issued_at > MAX_TTL:
            raise TokenError("token_claims_invalid", "The join token lives longer than 12 hours.")
        if token_room != room:
            raise TokenError("token_wrong_room", "This join link is for another consultation.")
        return JoinClaims(participant_id, name, role, token_room, jti, issued_at, expires_at)
