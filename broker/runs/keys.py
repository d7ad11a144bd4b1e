"""Signing keys: one active key signs; older keys stay published until every token they
signed has expired, then retire.

Private keys live in `<data-dir>/keys/<kid>.pem` (0600) or in a file the operator names
with `--signing-key`; the store holds only public halves (so every replica of a shared
database publishes the same JWKS). Key ids are RFC 7638 JWK thumbprints.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.audit.events import Action, AuditEvent, Outcome, draft
from broker.auth.authz import Authorizer, Op
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import FailedPrecondition, Unavailable
from broker.identity import BROKER
from broker.store import PublicKeyRecord, PublishKey, RetireKey, Store, Write, durable
from tokenbroker.verification import PublicKey

log = logging.getLogger(__name__)

KEY_ACTIONS = frozenset({Action.KEY_CREATED, Action.KEY_ROTATED, Action.KEY_RETIRED})

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey
    public_jwk: Mapping[str, str]


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unsupported signing algorithm {alg!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(private_key: PrivateKey, alg: str) -> dict[str, str]:
    """The public JWK with its RFC 7638 thumbprint as `kid`."""
    public = private_key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        required = {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
    else:
        rsa_numbers = public.public_numbers()
        required = {
            "e": _b64(rsa_numbers.e.to_bytes((rsa_numbers.e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": _b64(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
        }
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode()
    kid = _b64(hashlib.sha256(canonical).digest())
    return {**required, "kid": kid, "use": "sig", "alg": alg}


def _alg_of(private_key: PrivateKey) -> str:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("EC signing keys must be on P-256 (ES256)")
        return "ES256"
    return "RS256"


def load_private_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: signing keys must be EC P-256 or RSA")
    return key


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write a PEM private key readable by the owner only, created 0600 (never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


class KeyRing:
    """The broker's signing keys, held in memory; changes go through the store with audit."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        key_dir: Path,
        alg: str,
        retire_after: float,
        authorizer: Authorizer,
        external_key: Path | None = None,
    ) -> None:
        """`retire_after`: how long a rotated-out key stays published (the longest lifetime
        of anything it signed)."""
        self._store = store
        self._clock = clock
        self._key_dir = key_dir
        self._alg = alg
        self._retire_after = retire_after
        self._external = external_key
        self._authz = authorizer
        self._lock = threading.Lock()
        # One refresh at a time, read to install: a refresh that read the store before a
        # rotation must not install its stale view after the rotation's own refresh.
        self._refreshing = threading.Lock()
        self._private: dict[str, SigningKey] = {}
        self._published: dict[str, PublicKey] = {}
        self._jwks: dict[str, list[dict[str, Any]]] = {"keys": []}
        self._active: SigningKey | None = None
        self._fallback: SigningKey | None = None

    # -- start-up --------------------------------------------------------------------------

    def load(self, ctx: CallContext) -> None:
        """Load key files, publish any not yet published, create a first key if none."""
        for key in self._read_key_files():
            self._private[key.kid] = key
        records = {r.kid: r for r in self._store.public_keys()}
        for key in self._private.values():
            if key.kid not in records:
                self._publish(ctx, key, Action.KEY_CREATED)
        if self._external is None and not self._usable_private(records):
            self._create(ctx, Action.KEY_CREATED)
        self.refresh()

    def _read_key_files(self) -> list[SigningKey]:
        if self._external is not None:
            private = load_private_key(self._external)
            return [self._signing_key(private)]
        if not self._key_dir.is_dir():
            return []
        return [self._signing_key(load_private_key(p)) for p in sorted(self._key_dir.glob("*.pem"))]

    def _signing_key(self, private: PrivateKey) -> SigningKey:
        alg = _alg_of(private)
        return SigningKey(public_jwk(private, alg)["kid"], alg, private, public_jwk(private, alg))

    def _usable_private(self, records: Mapping[str, PublicKeyRecord]) -> bool:
        return any(
            kid in records and records[kid].retire_time is None and key.alg == self._alg
            for kid, key in self._private.items()
        )

    def _create(self, ctx: CallContext, action: str) -> SigningKey:
        private = generate_private_key(self._alg)
        key = self._signing_key(private)
        write_private_key(self._key_dir / f"{key.kid}.pem", private)
        self._private[key.kid] = key
        self._publish(ctx, key, action)
        log.info("signing key created", extra={"kid": key.kid, "alg": key.alg})
        return key

    def _publish(self, ctx: CallContext, key: SigningKey, action: str) -> None:
        now = self._clock()
        event = draft(ctx, now, action, Outcome.SUCCESS, details={"kid": key.kid, "alg": key.alg})
        mutation = PublishKey(key.kid, key.alg, json.dumps(dict(key.public_jwk)), now)
        durable.commit(self._store, Write([event], mutation), "the signing keys were not changed")

    # -- serving ---------------------------------------------------------------------------

    def on_events(self, events: Sequence[AuditEvent]) -> None:
        """A key was created, rotated or retired (here or by another replica): re-read."""
        if any(e.draft.action in KEY_ACTIONS for e in events):
            self.refresh()

    def refresh(self) -> None:
        """Re-read the published keys (after a change here or by another replica).

        Keys are per replica: each signs with its own key, published through the store, so
        every replica's JWKS lists every key in use. A rotation on any replica schedules every
        published key to retire; a replica whose own keys are all scheduled to retire makes a
        new one here, so one `keys rotate` rotates the whole service. Refreshes are serialised:
        one that read the store before a rotation must not reinstate the old key after it.
        """
        with self._refreshing:
            self._rebuild()
            if self._active is None and self._external is None and self._private:
                try:
                    with self._lock:
                        self._create(CallContext(principal=BROKER), Action.KEY_ROTATED)
                except Unavailable:
                    log.warning("could not make a new signing key; signing with a retiring one")
                self._rebuild()

    def _rebuild(self) -> None:
        now = self._clock()
        published: dict[str, PublicKey] = {}
        jwks: list[dict[str, Any]] = []
        active: SigningKey | None = None
        retiring: SigningKey | None = None  # still published: better than not signing at all
        for record in self._store.public_keys():  # newest first
            if record.retire_time is not None and record.retire_time <= now:
                continue
            jwk = json.loads(record.public_jwk)
            published[record.kid] = PublicKey(record.kid, record.alg, _public_key(jwk))
            jwks.append(jwk)
            private = self._private.get(record.kid)
            if private is None:
                continue
            if active is None and record.retire_time is None:
                active = private
            if retiring is None:
                retiring = private
        active_kid = active.kid if active else None
        jwks.sort(key=lambda jwk: jwk["kid"] != active_kid)  # stable: the active key first
        with self._lock:
            self._published = published
            self._jwks = {"keys": jwks}
            self._active = active
            self._fallback = retiring

    @property
    def active(self) -> SigningKey:
        active = self._active or self._fallback
        if active is None:
            raise FailedPrecondition("the broker has no active signing key")
        return active

    def find(self, kid: str) -> PublicKey | None:
        return self._published.get(kid)

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The published public keys as a JWKS, the active key first (as of `refresh`)."""
        return self._jwks

    def sign(self, claims: Mapping[str, Any], typ: str) -> tuple[str, str]:
        """(compact JWS, kid) signed with the active key."""
        key = self.active
        token = jwt.encode(
            dict(claims), key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ}
        )
        return token, key.kid

    # -- rotation --------------------------------------------------------------------------

    def rotate(self, ctx: CallContext) -> tuple[str, list[str]]:
        """Make a new key active; the old ones stay published for `retire_after`."""
        self._authz.require(ctx, Op.ROTATE_KEYS)
        if self._external is not None:
            raise FailedPrecondition(
                "the signing key is managed outside the broker (--signing-key); rotate it there"
            )
        with self._lock:
            # Every published key, this replica's and the others': each other replica makes
            # its own new key when it sees its keys retiring (see `refresh`).
            old = [record.kid for record in self._store.public_keys() if record.retire_time is None]
            new = self._create(ctx, Action.KEY_ROTATED)
            retire_at = self._clock() + self._retire_after
            for kid in old:
                event = draft(
                    ctx,
                    self._clock(),
                    Action.KEY_RETIRED,
                    Outcome.SUCCESS,
                    details={"kid": kid, "unpublish_at_us": round(retire_at * 1e6)},
                )
                durable.commit(
                    self._store,
                    Write([event], RetireKey(kid, retire_at)),
                    "the old key was not scheduled to retire",
                )
        self.refresh()
        return new.kid, old


def _public_key(jwk: Mapping[str, Any]) -> Any:
    return jwt.PyJWK.from_dict(dict(jwk)).key


class CheckpointSigning:
    """The key ring as an audit `CheckpointSigner`: the active key signs checkpoints."""

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    def sign(self, claims: dict[str, Any], *, typ: str) -> str:
        return self._keys.sign(claims, typ)[0]
