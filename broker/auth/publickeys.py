"""Service-account public keys from PEM or JWK, and the one signing algorithm each allows.

Only the key types of the assertion allowlist are accepted: EC P-256 (ES256), Ed25519
(EdDSA) and RSA of at least 2048 bits (RS256). A private key is refused outright: the
policy must never hold one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWKError

MIN_RSA_BITS = 2048
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


def algorithm_for(public_key: Any) -> str:
    """The JWS algorithm a key signs with; ValueError for key types we do not accept."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise ValueError(f"EC keys must use curve P-256, not {public_key.curve.name}")
        return "ES256"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
        return "RS256"
    raise ValueError("unsupported key type (use EC P-256, Ed25519 or RSA)")


def from_pem(text: str) -> Any:
    if "PRIVATE KEY" in text:
        raise ValueError("is a private key; the policy holds only public keys")
    try:
        return serialization.load_pem_public_key(text.encode())
    except ValueError:
        raise ValueError("is not a PEM public key ('-----BEGIN PUBLIC KEY-----')") from None


def from_jwk(jwk: Mapping[str, Any]) -> tuple[Any, str]:
    """(public key, kid) from a JWK; the kid is "" when the JWK has none."""
    if any(member in jwk for member in PRIVATE_JWK_MEMBERS):
        raise ValueError("is a private or symmetric JWK; the policy holds only public keys")
    try:
        key = PyJWK(dict(jwk)).key
    except (PyJWKError, ValueError, TypeError) as exc:
        raise ValueError(f"is not a usable JWK ({exc})") from None
    kid = jwk.get("kid", "")
    return key, kid if isinstance(kid, str) else ""


def from_text(text: str) -> tuple[Any, str]:
    """A key file's content: PEM, or a JWK as JSON."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError("is neither PEM nor JSON") from None
        if not isinstance(data, dict):
            raise ValueError("JSON content must be a JWK object")
        return from_jwk(data)
    return from_pem(text), ""


def thumbprint(public_key: Any) -> str:
    """SHA-256 of the key's SubjectPublicKeyInfo: identifies it in logs and audit."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()
