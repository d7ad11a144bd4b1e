"""Signed checkpoints of the audit chain.

A checkpoint is a compact JWS, signed with the broker's key, stating that event `seq` of the
chain has hash `hash` (and that the checkpoint before it was at `prev_seq`). Because each
event's hash covers every event before it, one valid checkpoint vouches for the whole chain up
to its sequence: someone who can write the database can recompute hashes, but cannot sign.

The broker signs through `CheckpointSigner` (the key ring implements it); anyone verifies with
the published public keys alone (`PublishedKeys`), offline.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.store import CheckpointRecord, PublicKeyRecord

# RFC 8725 §3.11: an explicit type, so no other JWS the broker signs passes as a checkpoint.
CHECKPOINT_TYP = "tokenbroker-audit-checkpoint+jwt"
# RFC 8725 §3.1: the algorithm comes from the key's record, and only from this list.
ALLOWED_ALGS = frozenset({"ES256", "RS256"})
_HEX_HASH = re.compile(r"^[0-9a-f]{64}$")


class CheckpointSigner(Protocol):
    """Signs checkpoint claims with the broker's current key.

    The compact JWS header must carry `kid` (a key published in signing_keys), `alg` (that
    key's algorithm) and `typ` as given.
    """

    def sign(self, claims: dict[str, Any], *, typ: str) -> str: ...


class PrivateKeySigner:
    """A `CheckpointSigner` over one private key (tests, and keys held outside the key ring)."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        kid: str,
        alg: str = "ES256",
    ) -> None:
        if alg not in ALLOWED_ALGS:
            raise ValueError(f"checkpoint algorithm must be one of {sorted(ALLOWED_ALGS)}")
        self._key = private_key
        self.kid = kid
        self.alg = alg

    def sign(self, claims: dict[str, Any], *, typ: str) -> str:
        return jwt.encode(
            claims, self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": typ}
        )

    def public_jwk(self) -> str:
        """The public half as a JWK (JSON), as the signing_keys table stores it."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = json.loads(algorithm.to_jwk(self._key.public_key()))
        return json.dumps({**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}, sort_keys=True)


def claims_for(
    sequence: int,
    chain_hash: str,
    prev_sequence: int,
    now: float,
    issuer: str,
    tree: tuple[int, bytes] | None = None,
) -> dict[str, Any]:
    """The claims of a checkpoint; with `tree` (size, root), also the Merkle tree's root at
    that event (`tree_size`, `tree_root` in base64), so one signature covers both."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "iat": int(now),
        "seq": sequence,
        "hash": chain_hash,
        "prev_seq": prev_sequence,
    }
    if tree is not None:
        claims["tree_size"] = tree[0]
        claims["tree_root"] = base64.b64encode(tree[1]).decode()
    return claims


def key_id(jws: str) -> str:
    """The `kid` a JWS names (unverified: for storing alongside it only)."""
    return str(jwt.get_unverified_header(jws).get("kid", ""))


class CheckpointInvalid(Exception):
    """A checkpoint's signature, type, key or claims do not verify."""


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """What a checkpoint whose signature verified says."""

    sequence: int
    hash: str
    prev_sequence: int
    issued_at: int
    kid: str
    # The Merkle tree at this event (size, root), when the checkpoint states it.
    tree: tuple[int, bytes] | None = None


@dataclass(frozen=True)
class _Key:
    alg: str
    key: Any


class PublishedKeys:
    """Public keys by kid, to verify checkpoints offline."""

    def __init__(self, jwks: Iterable[Mapping[str, Any]]) -> None:
        self._keys: dict[str, _Key] = {}
        self._jwks: list[dict[str, Any]] = []
        for jwk in jwks:
            kid, alg = str(jwk.get("kid", "")), str(jwk.get("alg", ""))
            if not kid or alg not in ALLOWED_ALGS:
                continue  # unusable for checkpoints; never guess an algorithm
            try:
                key = jwt.PyJWK(dict(jwk), algorithm=alg).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError):
                continue
            self._keys[kid] = _Key(alg, key)
            self._jwks.append(dict(jwk))

    @classmethod
    def from_records(cls, records: Iterable[PublicKeyRecord]) -> PublishedKeys:
        """From the signing_keys table: the row's kid and alg win over the JWK's own."""
        return cls({**json.loads(r.public_jwk), "kid": r.kid, "alg": r.alg} for r in records)

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> PublishedKeys:
        """From a JWKS document ({"keys": [...]}); keys need `kid` and `alg`."""
        keys = document.get("keys")
        if not isinstance(keys, list):
            raise ValueError('a JWKS document is an object with a "keys" list')
        return cls(k for k in keys if isinstance(k, dict))

    def __len__(self) -> int:
        return len(self._keys)

    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._jwks)}

    def verify(self, jws: str) -> VerifiedCheckpoint:
        try:
            header = jwt.get_unverified_header(jws)
        except jwt.PyJWTError as exc:
            raise CheckpointInvalid(f"not a compact JWS: {exc}") from None
        if header.get("typ") != CHECKPOINT_TYP:
            raise CheckpointInvalid(f"typ is {header.get('typ')!r}, not {CHECKPOINT_TYP!r}")
        kid = str(header.get("kid", ""))
        key = self._keys.get(kid)
        if key is None:
            raise CheckpointInvalid(f"signed with unknown key {kid!r}")
        try:
            claims = jwt.decode(
                jws,
                key.key,
                algorithms=[key.alg],
                # A checkpoint never expires; its iat is a statement, not a validity window.
                options={"require": ["iat", "seq", "hash", "prev_seq"], "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise CheckpointInvalid(f"signature or claims do not verify: {exc}") from None
        return _checked_claims(claims, kid)


def _checked_claims(claims: Mapping[str, Any], kid: str) -> VerifiedCheckpoint:
    sequence, chain_hash, prev = claims["seq"], claims["hash"], claims["prev_seq"]
    if not (isinstance(sequence, int) and isinstance(prev, int) and 0 <= prev < sequence):
        raise CheckpointInvalid("seq and prev_seq must be integers with 0 <= prev_seq < seq")
    if not (isinstance(chain_hash, str) and _HEX_HASH.match(chain_hash)):
        raise CheckpointInvalid("hash must be 64 lowercase hex digits")
    return VerifiedCheckpoint(
        sequence, chain_hash, prev, int(claims["iat"]), kid, _tree_claims(claims)
    )


def _tree_claims(claims: Mapping[str, Any]) -> tuple[int, bytes] | None:
    size, root = claims.get("tree_size"), claims.get("tree_root")
    if size is None and root is None:
        return None  # a checkpoint from before the tree
    if not (isinstance(size, int) and size >= 0 and isinstance(root, str)):
        raise CheckpointInvalid("tree_size and tree_root must be a count and base64")
    try:
        digest = base64.b64decode(root, validate=True)
    except (ValueError, binascii.Error):
        raise CheckpointInvalid("tree_root is not base64") from None
    if len(digest) != 32:
        raise CheckpointInvalid("tree_root is not a SHA-256 hash")
    return size, digest


def verify_record(keys: PublishedKeys, record: CheckpointRecord) -> VerifiedCheckpoint:
    """Verify a stored checkpoint; its columns must say what its signature says."""
    verified = keys.verify(record.jws)
    if (verified.sequence, verified.hash, verified.prev_sequence) != (
        record.sequence,
        record.hash,
        record.prev_sequence,
    ):
        raise CheckpointInvalid("stored columns differ from the signed claims")
    return verified
