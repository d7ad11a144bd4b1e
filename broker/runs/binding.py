"""Sender-constrained tokens: what a token is bound to, what the policy requires bound, and
the store-backed memory of DPoP proofs seen.

A step token or run credential bound to a key carries `cnf.jkt` (RFC 9449), one bound to a
client certificate `cnf["x5t#S256"]` (RFC 8705). The checking itself is
`tokenbroker.dpop` — one implementation for the broker and for offline verifiers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import limits
from broker.errors import InvalidArgument
from broker.runs.model import Run
from broker.runs.permissions import PermissionSet, ladder_for, rank
from broker.store import ProofReplayed, RecordProof, Store, Write, durable
from tokenbroker import dpop

MAX_JWK_CHARS = 4096


@dataclass(frozen=True)
class Binding:
    """What a token is to be bound to: a key thumbprint, a certificate thumbprint, or neither."""

    jkt: str = ""
    x5t: str = ""

    @property
    def bound(self) -> bool:
        return bool(self.jkt or self.x5t)

    def cnf(self) -> dict[str, str] | None:
        """The `cnf` claim (RFC 7800), None when unbound."""
        cnf = {}
        if self.jkt:
            cnf[dpop.CNF_JKT] = self.jkt
        if self.x5t:
            cnf[dpop.CNF_X5T] = self.x5t
        return cnf or None


UNBOUND = Binding()


def jkt_of_jwk_file(path: Path) -> str:
    """The thumbprint of the public JWK in a file (an executor's key, from the settings);
    ValueError saying what is wrong (OSError for a file that cannot be read)."""
    text = path.read_text()
    try:
        return jkt_of_jwk(text.strip(), "jwk")
    except InvalidArgument as exc:
        raise ValueError(exc.violations[0].rule) from None


def jkt_of_jwk(text: str, field: str) -> str:
    """The RFC 7638 thumbprint of a caller's public JWK (JSON), or InvalidArgument saying
    what is wrong with it. Only keys a proof may be signed with are accepted."""
    if not text:
        return ""
    if len(text) > MAX_JWK_CHARS:
        raise InvalidArgument.field(field, f"at most {MAX_JWK_CHARS} characters")
    try:
        jwk: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidArgument.field(field, "not JSON: a public JWK as a JSON object") from None
    alg = dpop.ALG_OF_KTY.get(str(jwk.get("kty"))) if isinstance(jwk, dict) else None
    if alg is None:
        raise InvalidArgument.field(field, "a public JWK of kty EC (P-256), OKP (Ed25519) or RSA")
    found = dpop.key_of(jwk, alg)
    if isinstance(found, str):
        raise InvalidArgument.field(field, limits.shown(found, 160))
    return found[1]


class StoreReplayCache:
    """`tokenbroker.dpop.ReplayCache` in the store: a proof accepted by one replica or worker
    is refused by every other (`RecordProof`); a store that refuses the write fails the call
    as UNAVAILABLE rather than accept a proof it could not remember."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def first_use(self, jkt: str, jti: str, expires: float, now: float) -> bool:
        try:
            durable.commit(
                self._store,
                Write([], RecordProof(jkt, jti, expires, now)),
                "the DPoP proof could not be remembered, so it was not accepted",
            )
        except ProofReplayed:
            return False
        return True


@dataclass(frozen=True)
class BindingPolicy:
    """Which tokens must be bound, from the policy: step tokens for these audiences, step
    tokens carrying a permission at or above one of these levels, and every credential and
    token of runs whose chain an account listed here started."""

    audiences: frozenset[str] = frozenset()
    levels: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()

    def step_token_reason(self, run: Run, audience: str, permissions: PermissionSet) -> str | None:
        """Why a step token for this request must be bound, or None."""
        if audience in self.audiences:
            return f"the policy requires bound tokens for audience {limits.shown(audience)!r}"
        for resource, level in permissions.items():
            for required in sorted(self.levels):
                if required in ladder_for(resource) and rank(resource, level) >= rank(
                    resource, required
                ):
                    return (
                        f"the policy requires bound tokens for {required!r} permissions and "
                        f"above ({resource}:{level})"
                    )
        return self.run_reason(run.root_account())

    def run_reason(self, root_account: str) -> str | None:
        """Why the credential and tokens of a run started (at its root) by this account must
        be bound, or None."""
        if root_account in self.accounts:
            return f"the policy requires bound credentials for runs started by {root_account}"
        return None


NO_BINDING_POLICY = BindingPolicy()
BindingPolicySource = Callable[[], BindingPolicy]


def refusal(reason: str, what: str) -> str:
    """The message of a refused unbound request: why, and how to ask properly."""
    how = (
        "send the step's public key (dpop_jwk), or bind_proof_key with a DPoP proof, or "
        "bind_client_certificate over mTLS"
        if what == "token"
        else "send the runner's public key (dpop_jwk) to bind the run credential"
    )
    return f"an unbound {what} was refused: {reason}; {how}"
