"""Join tokens: each kind of bad token is refused with its own code."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from signalling.tokens import MAX_TTL, TokenAuthority, TokenError, TokenKeys

SECRET = b"s" * 48
ROOM = "room-1"


def authority(**kw: object) -> TokenAuthority:
    return TokenAuthority(TokenKeys.shared_secret(SECRET), **kw)  # type: ignore[arg-type]


def claims(**override: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "p1", "name": "Anna", "role": "nurse", "room": ROOM, "iss": "nara",
        "aud": "nara", "iat": now, "exp": now + 600, "jti": "abc",
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def refused(token: str, code: str, auth: TokenAuthority | None = None, room: str = ROOM) -> None:
    with pytest.raises(TokenError) as info:
        (auth or authority()).verify(token, room)
    assert info.value.code == code
    assert info.value.message


def test_minted_token_is_accepted_for_its_room() -> None:
    auth = authority()
    token, minted = auth.mint(ROOM, "Anna", "nurse", ttl=600)
    verified = auth.verify(token, ROOM)
    assert verified == minted
    assert verified.may_publish


def test_observer_may_not_publish() -> None:
    auth = authority()
    token, _ = auth.mint(ROOM, "Student", "observer")
    assert not auth.verify(token, ROOM).may_publish


def test_alg_none_is_refused() -> None:
    refused(jwt.encode(claims(), None, algorithm="none"), "token_alg_none")


def test_wrong_algorithm_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(jwt.encode(claims(), key, algorithm="RS256"), "token_alg_not_allowed")
    refused(jwt.encode(claims(), SECRET, algorithm="HS512"), "token_alg_not_allowed")


def test_bad_signature_is_refused() -> None:
    refused(jwt.encode(claims(), b"x" * 48, algorithm="HS256"), "token_bad_signature")


def test_expired_token_is_refused() -> None:
    now = int(time.time())
    refused(jwt.encode(claims(iat=now - 7200, exp=now - 60), SECRET, algorithm="HS256"), "token_expired")


def test_token_from_the_future_is_refused() -> None:
    now = int(time.time())
    refused(jwt.encode(claims(iat=now + 600, exp=now + 1200), SECRET, algorithm="HS256"),
            "token_not_yet_valid")
    refused(jwt.encode(claims(nbf=now + 600), SECRET, algorithm="HS256"), "token_not_yet_valid")


def test_wrong_audience_and_issuer_are_refused() -> None:
    refused(jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256"), "token_wrong_audience")
    refused(jwt.encode(claims(iss="evil"), SECRET, algorithm="HS256"), "token_wrong_issuer")


def test_token_for_another_room_is_refused() -> None:
    token, _ = authority().mint("other-room", "Anna", "nurse")
    refused(token, "token_wrong_room")


def test_missing_and_invalid_claims_are_refused() -> None:
    refused(jwt.encode(claims(jti=None), SECRET, algorithm="HS256"), "token_claims_invalid")
    refused(jwt.encode(claims(role="admin"), SECRET, algorithm="HS256"), "token_claims_invalid")
    now = int(time.time())
    refused(jwt.encode(claims(iat=now, exp=now + MAX_TTL + 3600), SECRET, algorithm="HS256"),
            "token_claims_invalid")


def test_garbage_is_refused() -> None:
    refused("", "token_missing")
    refused("not-a-jwt", "token_malformed")
    refused("x" * 5000, "token_malformed")


def test_minting_refuses_bad_requests() -> None:
    auth = authority()
    with pytest.raises(ValueError):
        auth.mint(ROOM, "Anna", "superuser")
    with pytest.raises(ValueError):
        auth.mint(ROOM, "Anna", "nurse", ttl=MAX_TTL + 1)
    with pytest.raises(ValueError):
        auth.mint(ROOM, " ", "nurse")


def _pem_pair(private_key: object, tmp_path: Path, name: str) -> tuple[Path, Path]:
    private_path, public_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    private_path.write_bytes(private_key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public_path.write_bytes(private_key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
def test_key_file_algorithms(tmp_path: Path, algorithm: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate() if algorithm == "EdDSA" else rsa.generate_private_key(
        public_exponent=65537, key_size=2048)
    private_path, public_path = _pem_pair(key, tmp_path, algorithm)
    signer = TokenAuthority(TokenKeys.from_files(algorithm, private_path, public_path))
    verifier = TokenAuthority(TokenKeys.from_files(algorithm, None, public_path))
    token, minted = signer.mint(ROOM, "Anna", "clinician")
    assert verifier.verify(token, ROOM) == minted
    # an HS256 token made with the public key as secret (the classic confusion attack)
    forged = jwt.encode(claims(), b"k" * 48, algorithm="HS256")
    refused(forged, "token_alg_not_allowed", verifier)
    with pytest.raises(ValueError):
        verifier.mint(ROOM, "Anna", "clinician")
