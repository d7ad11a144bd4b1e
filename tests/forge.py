"""Hand-made JWS compact tokens, for attacks no JWT library would produce: any header or claim
of any type, raw bytes in any segment, any algorithm (including `none` and HMAC keyed with a
public key), signatures that verify or not."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    """A JSON value as a base64url segment; bytes are taken as they are."""
    if isinstance(value, bytes):
        return b64(value)
    return b64(json.dumps(value, separators=(",", ":"), allow_nan=True).encode())


def sign(signing_input: bytes, key: Any, alg: str) -> bytes:
    """The signature `alg` makes over `signing_input` with `key` (bytes for HMAC)."""
    if alg == "none":
        return b""
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
        return hmac.new(key, signing_input, digest[alg]).digest()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        hash_alg = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}
        der = key.sign(signing_input, ec.ECDSA(hash_alg[key.curve.key_size]))
        r, s = decode_dss_signature(der)
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if isinstance(key, rsa.RSAPrivateKey):
        pad = padding.PSS(padding.MGF1(hashes.SHA256()), 32) if alg.startswith("PS") else None
        return key.sign(signing_input, pad or padding.PKCS1v15(), hashes.SHA256())
    raise TypeError(f"cannot sign with {type(key).__name__}")


def forge(header: Any, claims: Any, key: Any = None, alg: str | None = None) -> str:
    """header.claims.signature; signed with `key` by `alg` (default: the header's alg)."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    algorithm = alg or (header.get("alg") if isinstance(header, dict) else None) or "none"
    signature = b"" if key is None else sign(signing_input.encode(), key, str(algorithm))
    return f"{signing_input}.{b64(signature)}"


def flip_bit(token: str, part: int, bit: int = 0) -> str:
    """The token with one bit of its `part` (0 header, 1 claims, 2 signature) flipped, still
    valid base64url (the flip is made in the decoded bytes)."""
    parts = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[part] + "=" * (-len(parts[part]) % 4)))
    raw[bit // 8 % len(raw)] ^= 1 << (bit % 8)
    parts[part] = b64(bytes(raw))
    return ".".join(parts)
