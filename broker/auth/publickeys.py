"""Service-account public keys from PEM or JWK, and the one signing algorithm each allows.

Only the key types of the assertion allowlist are accepted: EC P-256 (ES256), Ed25519
(EdDSA) and RSA of at least 2048 bits (RS256). A private key is refused outright: the
policy must never hold one.

Every way a key can be unusable, whatever the parsing library raised, is a `KeyProblem`
whose message says what is wrong in a few words (never the key itself): the policy loader
names the file and key path in front of it and reports it with every other problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWTError

MIN_RSA_BITS = 2048
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")
# What the parsers raise on malformed input (InvalidKeyError and PyJWKError are PyJWTErrors;
# binascii.Error is a ValueError; a member of the wrong type gives TypeError or AttributeError).
_PARSE_ERRORS = (PyJWTError, UnsupportedAlgorithm, ValueError, TypeError, AttributeError, KeyError)
_MAX_REASON = 120


class KeyProblem(ValueError):
    """A key the policy cannot use; the message says why, without the key material."""


def algorithm_for(public_key: Any) -> str:
    """The JWS algorithm a key signs with; KeyProblem for key types we do not accept."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise KeyProblem(f"EC keys must use curve P-256, not {public_key.curve.name}")
        return "ES256"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyProblem(f"RSA keys must have at least {MIN_RSA_BITS} bits")
        return "RS256"
    raise KeyProblem("unsupported key type (use EC P-256, Ed25519 or RSA)")


def from_pem(text: str) -> Any:
    if "PRIVATE KEY" in text:
        raise KeyProblem("is a private key; the policy holds only public keys")
    try:
        return serialization.load_pem_public_key(text.encode())
    except _PARSE_ERRORS:
        raise KeyProblem("is not a PEM public key ('-----BEGIN PUBLIC KEY-----')") from None


def from_jwk(jwk: Mapping[str, Any]) -> tuple[Any, str]:
    """(public key, kid) from a JWK; the kid is "" when the JWK has none."""
    if any(member in jwk for member in PRIVATE_JWK_MEMBERS):
        raise KeyProblem("is a private or symmetric JWK; the policy holds only public keys")
    try:
        key = PyJWK(dict(jwk)).key
    except _PARSE_ERRORS as exc:
        raise KeyProblem(f"is not a usable JWK ({_reason(exc)})") from None
    kid = jwk.get("kid", "")
    return key, kid if isinstance(kid, str) else ""


def from_text(text: str) -> tuple[Any, str]:
    """A key file's content: PEM, or a JWK as JSON."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise KeyProblem("is neither PEM nor JSON") from None
        if not isinstance(data, dict):
            raise KeyProblem("JSON content must be a JWK object")
        return from_jwk(data)
    return from_pem(text), ""


def _reason(exc: Exception) -> str:
    """The library's explanation, short: some messages repeat the whole JWK."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.split(": {", 1)[0]
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def thumbprint(public_key: Any) -> str:
    """SHA-256 of the key's SubjectPublicKeyInfo: identifies it in logs and audit."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()
