"""Signing keys: per algorithm (ES256, RS256) one key signs; a rotated-in key is published
before it signs, and older keys stay published until every token they signed has expired.

A key's schedule lives in the store, so that every replica reads the same one:
published from `create_time`, signing from `activate_time`, stopping at `stop_signing_time`,
unpublished at `retire_time`. A rotation publishes the new key now and lets it sign only
after `prepublish` (verifiers that cached the JWKS before the rotation then already hold it
when it signs), while the old key signs on until then; an emergency rotation stops the old
key and starts the new one at once.

Private keys live in `<data-dir>/keys/<kid>.pem` (0600) or in a file the operator names
with `--signing-key`; the store holds only public halves (so every replica of a shared
database publishes the same JWKS). Key ids are RFC 7638 JWK thumbprints.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from broker.keyfile import write_private_key
from broker.store import PublicKeyRecord, PublishKey, RetireKey, Store, Write, durable
from tokenbroker.verification import PublicKey

log = logging.getLogger(__name__)

KEY_ACTIONS = frozenset(
    {Action.KEY_CREATED, Action.KEY_ROTATED, Action.KEY_ROTATED_EMERGENCY, Action.KEY_RETIRED}
)

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


def key_id(private_key: PrivateKey) -> str:
    """The kid the broker publishes `private_key` under (its JWK thumbprint)."""
    return public_jwk(private_key, _alg_of(private_key))["kid"]


def load_private_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: signing keys must be EC P-256 or RSA")
    return key


@dataclass(frozen=True)
class KeyStatus:
    """One published key and where it stands in its schedule (the same on every replica)."""

    kid: str
    alg: str
    state: str  # "signing", "prepublished" or "retiring"
    publish_time: float
    activate_time: float
    stop_signing_time: float | None
    retire_time: float | None


SIGNING, PREPUBLISHED, RETIRING = "signing", "prepublished", "retiring"


def key_state(record: PublicKeyRecord, now: float) -> str:
    # A key stopped before it ever signed (an emergency overtook its rotation) is retiring.
    if record.stop_signing_time is not None and record.stop_signing_time <= now:
        return RETIRING
    if record.activate_time > now:
        return PREPUBLISHED
    return SIGNING


_STATE_ORDER = {SIGNING: 0, PREPUBLISHED: 1, RETIRING: 2}


def published_schedule(
    records: Sequence[PublicKeyRecord], now: float, default_alg: str = "ES256"
) -> list[tuple[KeyStatus, dict[str, Any]]]:
    """The keys published at `now` with their JWKs, in the JWKS's order: keys that sign
    first (the default algorithm's first), then pre-published ones, then retiring ones."""
    published = []
    for record in records:
        if not record.published_at(now):
            continue
        status = KeyStatus(
            record.kid,
            record.alg,
            key_state(record, now),
            record.create_time,
            record.activate_time,
            record.stop_signing_time,
            record.retire_time,
        )
        published.append((status, json.loads(record.public_jwk)))
    published.sort(key=lambda pair: (_STATE_ORDER[pair[0].state], pair[0].alg != default_alg))
    return published


def export_jwks(records: Sequence[PublicKeyRecord], now: float) -> dict[str, Any]:
    """The JWKS a broker on these records publishes at `now`, pre-published keys included:
    for relying parties that read a copy instead of the broker's endpoint."""
    return {"keys": [jwk for _, jwk in published_schedule(records, now)]}


@dataclass(frozen=True)
class Rotation:
    """What `KeyRing.rotate` did: the new keys (default algorithm first), the keys it
    scheduled to stop, and when the new keys sign."""

    new_kids: tuple[str, ...]
    retiring_kids: tuple[str, ...]
    signs_from: float
    emergency: bool


@dataclass(frozen=True)
class _Own:
    """A published key whose private half this replica holds."""

    record: PublicKeyRecord
    key: SigningKey


def _signer(own: Sequence[_Own], now: float) -> SigningKey | None:
    """The key this replica signs with now, of one algorithm: the newest key scheduled to
    sign now; failing that (a successor not yet made or active), the newest that has
    activated — better than not signing; failing that, a pre-published one."""
    live = [o for o in own if o.record.published_at(now)]
    tests: tuple[Callable[[PublicKeyRecord], bool], ...] = (
        lambda record: record.signs_at(now),
        lambda record: record.activate_time <= now,
        lambda record: True,
    )
    for test in tests:
        candidates = [o for o in live if test(o.record)]
        if candidates:
            chosen = max(candidates, key=lambda o: (o.record.create_time, o.record.activate_time))
            return chosen.key
    return None


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
        prepublish: float = 0.0,
        algorithms: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        """`alg`: the default algorithm (run credentials, checkpoints, audiences the policy
        names no algorithm for). `algorithms`: the others a key is kept for (the policy's
        per-audience choices, read again at every refresh so a reload adds keys).
        `retire_after`: how long a key stays published after it stops signing (the longest
        lifetime of anything it signed). `prepublish`: how long a rotated-in key is
        published before it signs."""
        self._store = store
        self._clock = clock
        self._key_dir = key_dir
        self._alg = alg
        self._algorithms = algorithms
        self._retire_after = retire_after
        self._prepublish = prepublish
        self._external = external_key
        self._authz = authorizer
        self._lock = threading.Lock()
        # One refresh at a time, read to install: a refresh that read the store before a
        # rotation must not install its stale view after the rotation's own refresh.
        self._refreshing = threading.Lock()
        self._private: dict[str, SigningKey] = {}
        self._published: dict[str, PublicKey] = {}
        self._jwks: dict[str, list[dict[str, Any]]] = {"keys": []}
        self._own: dict[str, tuple[_Own, ...]] = {}  # by algorithm
        self._schedule: tuple[KeyStatus, ...] = ()

    def wanted_algorithms(self) -> list[str]:
        """The algorithms this ring keeps a signing key for, the default first."""
        others = sorted(set(self._algorithms()) - {self._alg})
        return [self._alg, *others]

    # -- start-up --------------------------------------------------------------------------

    def load(self, ctx: CallContext) -> None:
        """Load key files, publish any not yet published, create a first key of each wanted
        algorithm that has none (signing at once: nothing else could sign it)."""
        for key in self._read_key_files():
            self._private[key.kid] = key
        records = {r.kid: r for r in self._store.public_keys()}
        for key in self._private.values():
            if key.kid not in records:
                self._publish(ctx, key, Action.KEY_CREATED, self._clock())
        if self._external is not None:
            external_alg = next(iter(self._private.values())).alg
            for alg in self.wanted_algorithms():
                if alg != external_alg:
                    log.warning(
                        "the policy names an algorithm the external signing key cannot sign; "
                        "tokens for its audiences are refused",
                        extra={"alg": alg, "signing_key_alg": external_alg},
                    )
        self.refresh(ctx, action=Action.KEY_CREATED)

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

    def _create(self, ctx: CallContext, alg: str, action: str, activate_time: float) -> SigningKey:
        private = generate_private_key(alg)
        key = self._signing_key(private)
        write_private_key(self._key_dir / f"{key.kid}.pem", private)
        self._private[key.kid] = key
        self._publish(ctx, key, action, activate_time)
        log.info(
            "signing key created",
            extra={"kid": key.kid, "alg": key.alg, "activate_time": activate_time},
        )
        return key

    def _publish(self, ctx: CallContext, key: SigningKey, action: str, activate: float) -> None:
        now = self._clock()
        details = {"kid": key.kid, "alg": key.alg, "signs_from_us": round(activate * 1e6)}
        if action == Action.KEY_ROTATED_EMERGENCY:
            details["emergency"] = True
        event = draft(ctx, now, action, Outcome.SUCCESS, details=details)
        mutation = PublishKey(key.kid, key.alg, json.dumps(dict(key.public_jwk)), now, activate)
        durable.commit(self._store, Write([event], mutation), "the signing keys were not changed")

    # -- serving ---------------------------------------------------------------------------

    def on_events(self, events: Sequence[AuditEvent]) -> None:
        """A key was created, rotated or retired (here or by another replica): re-read."""
        if any(e.draft.action in KEY_ACTIONS for e in events):
            self.refresh()

    def refresh(self, ctx: CallContext | None = None, action: str = Action.KEY_ROTATED) -> None:
        """Re-read the published keys (after a change here or by another replica).

        Keys are per replica: each signs with its own keys, published through the store, so
        every replica's JWKS lists every key in use. A rotation on any replica schedules every
        published key to stop signing; a replica with no key of a wanted algorithm left that
        is not scheduled to stop makes a new one here, signing when its predecessors stop
        (so one `keys rotate` rotates the whole service, with the same pre-publication).
        Refreshes are serialised: one that read the store before a rotation must not
        reinstate the old key after it.
        """
        with self._refreshing:
            records = self._rebuild()
            if self._external is not None:
                return
            missing = self._successors_due(records)
            if not missing:
                return
            ctx = ctx or CallContext(principal=BROKER)
            try:
                with self._lock:
                    for alg, activate, superseded in missing:
                        self._create(ctx, alg, action, activate)
                        if superseded:
                            self._retire(ctx, superseded, activate, emergency=False)
            except Unavailable:
                log.warning("could not make a new signing key; signing with a retiring one")
            self._rebuild()

    def _successors_due(
        self, records: Sequence[PublicKeyRecord]
    ) -> list[tuple[str, float, tuple[str, ...]]]:
        """(algorithm, activate_time, superseded kids) of each key this replica must make
        now; a superseded key would sign only after its successor (see below) and is
        stopped with it."""
        now = self._clock()
        due = []
        for alg in self.wanted_algorithms():
            own = [
                r
                for r in records
                if r.alg == alg and r.kid in self._private and r.published_at(now)
            ]
            # The hand-over: when the last of the keys scheduled to stop stops (a rotation's
            # window), or now if that has passed or there was none.
            handover = max([now, *(r.stop_signing_time or now for r in own)])
            # A key not scheduled to stop takes over in time; one that would sign only later
            # (made for a normal rotation that an emergency overtook) does not, and is
            # superseded by the new one.
            if any(r.stop_signing_time is None and r.activate_time <= handover for r in own):
                continue
            late = tuple(r.kid for r in own if r.stop_signing_time is None)
            due.append((alg, handover, late))
        return due

    def _rebuild(self) -> list[PublicKeyRecord]:
        now = self._clock()
        records = self._store.public_keys()  # newest first
        schedule = published_schedule(records, now, self._alg)
        published: dict[str, PublicKey] = {}
        own: dict[str, list[_Own]] = {}
        by_kid = {record.kid: record for record in records}
        for status, jwk in schedule:
            published[status.kid] = PublicKey(status.kid, status.alg, _public_key(jwk))
            private = self._private.get(status.kid)
            if private is not None:
                own.setdefault(status.alg, []).append(_Own(by_kid[status.kid], private))
        with self._lock:
            self._published = published
            self._jwks = {"keys": [jwk for _, jwk in schedule]}
            self._own = {alg: tuple(keys) for alg, keys in own.items()}
            self._schedule = tuple(status for status, _ in schedule)
        return records

    @property
    def active(self) -> SigningKey:
        """The key that signs now with the default algorithm."""
        return self.signer(self._alg)

    def signer(self, alg: str) -> SigningKey:
        """This replica's key that signs `alg` now (by the schedule, read at this instant)."""
        key = _signer(self._own.get(alg, ()), self._clock())
        if key is None and alg in self.wanted_algorithms() and self._external is None:
            self.refresh()  # an algorithm the policy named since the last refresh
            key = _signer(self._own.get(alg, ()), self._clock())
        if key is None:
            if self._external is not None:
                raise FailedPrecondition(
                    f"no {alg} signing key: the signing key is managed outside the broker "
                    "(--signing-key) and has another algorithm"
                )
            raise FailedPrecondition(f"the broker has no active {alg} signing key")
        return key

    def own_kids(self) -> frozenset[str]:
        """The published keys whose private halves this replica holds (as of `refresh`)."""
        return frozenset(o.key.kid for keys in self._own.values() for o in keys)

    def find(self, kid: str) -> PublicKey | None:
        return self._published.get(kid)

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The published public keys as a JWKS: keys that sign first, then pre-published,
        then retiring ones (as of `refresh`)."""
        return self._jwks

    def schedule(self) -> tuple[KeyStatus, ...]:
        """Every published key's schedule, in the JWKS's order (as of `refresh`)."""
        return self._schedule

    def sign(self, claims: Mapping[str, Any], typ: str, alg: str | None = None) -> tuple[str, str]:
        """(compact JWS, kid) signed with this replica's key of `alg` (default: the
        default algorithm) that signs now."""
        key = self.signer(alg or self._alg)
        token = jwt.encode(
            dict(claims), key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ}
        )
        return token, key.kid

    # -- rotation --------------------------------------------------------------------------

    def rotate(self, ctx: CallContext, *, emergency: bool = False) -> Rotation:
        """Publish a new key of each wanted algorithm, signing after the pre-publication
        window (at once in an emergency); every key published before it stops signing then
        and stays published for `retire_after` after that."""
        self._authz.require(ctx, Op.ROTATE_KEYS)
        if self._external is not None:
            raise FailedPrecondition(
                "the signing key is managed outside the broker (--signing-key); rotate it there"
            )
        with self._lock:
            now = self._clock()
            stop = now if emergency else now + self._prepublish
            # Every key that would sign past `stop`, this replica's and the others': each
            # other replica makes its own successor when it sees its keys stopping.
            old = [
                record.kid
                for record in self._store.public_keys()
                if record.published_at(now)
                and (record.stop_signing_time is None or record.stop_signing_time > stop)
            ]
            action = Action.KEY_ROTATED_EMERGENCY if emergency else Action.KEY_ROTATED
            new = [self._create(ctx, alg, action, stop) for alg in self.wanted_algorithms()]
            if old:
                self._retire(ctx, old, stop, emergency=emergency)
        self.refresh()
        return Rotation(tuple(k.kid for k in new), tuple(old), stop, emergency)

    def _retire(
        self, ctx: CallContext, kids: Sequence[str], stop: float, *, emergency: bool
    ) -> None:
        """Schedule `kids` to stop signing at `stop` and leave the JWKS `retire_after` later,
        in one transaction with one `key.retired` event each."""
        retire_at = stop + self._retire_after
        events = []
        for kid in kids:
            details: dict[str, Any] = {
                "kid": kid,
                "stops_signing_us": round(stop * 1e6),
                "unpublish_at_us": round(retire_at * 1e6),
            }
            if emergency:
                details["emergency"] = True
            events.append(
                draft(ctx, self._clock(), Action.KEY_RETIRED, Outcome.SUCCESS, details=details)
            )
        durable.commit(
            self._store,
            Write(events, RetireKey(tuple(kids), retire_at, stop)),
            "the old keys were not scheduled to retire",
        )


def _public_key(jwk: Mapping[str, Any]) -> Any:
    return jwt.PyJWK.from_dict(dict(jwk)).key


class CheckpointSigning:
    """The key ring as an audit `CheckpointSigner`: the active key signs checkpoints."""

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    def sign(self, claims: dict[str, Any], *, typ: str) -> str:
        return self._keys.sign(claims, typ)[0]
