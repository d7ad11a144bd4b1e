"""Broker-signed JWTs: step tokens for APIs and run credentials for executors.

A step token (`typ: at+jwt`) is what a pipeline step presents to an API. A run credential
(`typ: tokenbroker-run+jwt`, audience = the broker itself) is what the run's executor
presents to the broker; it can only act on its own run. Both are valid only while their run
is active: every check consults the run's state, so ending the run kills them all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from broker import limits
from broker.clock import Clock
from broker.errors import Unauthenticated
from broker.identity import (
    RUN_CREDENTIAL_TYP,
    STEP_TOKEN_TYP,
    Person,
    Principal,
    PrincipalKind,
)
from broker.ids import new_token_id
from broker.runs.binding import UNBOUND, Binding, StoreReplayCache
from broker.runs.keys import KeyRing
from broker.runs.model import Run, RunState
from broker.runs.permissions import PermissionSet
from broker.runs.registry import RunRegistry
from broker.store import Store
from tokenbroker import dpop
from tokenbroker.verification import CheckCache, CheckResult, TokenStatus

# Tokens are checked with this much tolerance for clock drift between machines.
LEEWAY = 30.0


@dataclass(frozen=True)
class MintedToken:
    token: str
    token_id: str
    expire_time: float
    key_id: str
    permissions: PermissionSet
    subject: str = ""
    binding: Binding = UNBOUND


def person_claim(person: Person) -> dict[str, str]:
    claim = {"sub": person.subject, "iss": person.issuer, "verification": person.method.value}
    if person.email:
        claim["email"] = person.email
    return claim


def act_claim(actor_chain: tuple[str, ...]) -> dict[str, Any] | None:
    """RFC 8693 `act`: the current actor outermost, earlier actors nested inside it."""
    act: dict[str, Any] | None = None
    for actor in actor_chain:  # stored outermost (first) actor first
        act = {"sub": actor} if act is None else {"sub": actor, "act": act}
    return act


def run_claims(run: Run, issuer: str, now: float) -> dict[str, Any]:
    """Claims every token of `run` carries."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": run.subject(),
        "iat": int(now),
        "nbf": int(now),
        "run_id": run.run_id,
        "org": run.pipeline.org,
        "project": run.pipeline.project,
        "pipeline": run.pipeline.pipeline,
        "triggered_via": run.triggered_via,
        # The immutable ids and environment the orchestrator started the run with, if any.
        **run.ids.as_dict(),
    }
    if run.environment:
        claims["environment"] = run.environment
    if run.on_behalf_of is not None:
        claims["on_behalf_of"] = person_claim(run.on_behalf_of)
    act = act_claim(run.actor_chain)
    if act is not None:
        claims["act"] = act
    return claims


# The algorithm to sign a step token for an audience with; None: the key ring's default.
AlgorithmFor = Callable[[str], str | None]


class TokenService:
    def __init__(
        self,
        keys: KeyRing,
        registry: RunRegistry,
        issuer: str,
        clock: Clock,
        store: Store,
        algorithm_for: AlgorithmFor = lambda audience: None,
    ) -> None:
        self._keys = keys
        self._algorithm_for = algorithm_for
        # Proofs are remembered in the store: one accepted by any replica is refused by all.
        self.replay = StoreReplayCache(store)
        self._registry = registry
        self.issuer = issuer
        self._clock = clock
        # Steps present the same token on every call, executors their run credential.
        self._checked = CheckCache()

    def mint_step_token(
        self,
        run: Run,
        *,
        audience: str,
        permissions: PermissionSet,
        expire_time: float,
        step: str,
        shaped: Mapping[str, Any] | None = None,
        binding: Binding = UNBOUND,
    ) -> MintedToken:
        """`shaped`: the `sub` and custom claims the policy gives this token
        (`broker.runs.claims.TokenShape`); never any of the claims set below."""
        now = self._clock()
        token_id = new_token_id()
        claims = run_claims(run, self.issuer, now)
        claims.update(shaped or {})
        claims.update(
            aud=audience,
            exp=int(expire_time),
            jti=token_id,
            step=step,
            permissions=permissions.as_dict(),
        )
        cnf = binding.cnf()
        if cnf is not None:
            claims["cnf"] = cnf
        # Some relying parties accept only RS256: the policy chooses per audience.
        token, kid = self._keys.sign(claims, STEP_TOKEN_TYP, self._algorithm_for(audience))
        return MintedToken(
            token, token_id, int(expire_time), kid, permissions, claims["sub"], binding
        )

    def mint_run_credential(self, run: Run, binding: Binding = UNBOUND) -> MintedToken:
        """A run credential; bound to the runner's key when `binding` names one, so that it
        is refused without a fresh DPoP proof by that key on every call."""
        now = self._clock()
        token_id = new_token_id()
        claims = run_claims(run, self.issuer, now)
        claims.update(aud=self.issuer, exp=int(run.deadline), jti=token_id)
        cnf = binding.cnf()
        if cnf is not None:
            claims["cnf"] = cnf
        token, kid = self._keys.sign(claims, RUN_CREDENTIAL_TYP)
        return MintedToken(
            token, token_id, int(run.deadline), kid, run.permission_ceiling, binding=binding
        )

    def check_proof(
        self, proof: str, *, htu: str, credential: str | None, expected_jkt: str | None
    ) -> dpop.ProofVerdict:
        """A DPoP proof that came with a gRPC call to method path `htu`, at the broker's clock,
        against the store's memory of proofs seen."""
        return dpop.check_proof(
            proof,
            htm=dpop.GRPC_HTM,
            htu=htu,
            now=self._clock(),
            replay=self.replay,
            token=credential,
            expected_jkt=expected_jkt,
        )

    def check(
        self,
        token: str,
        *,
        audience: str | None,
        typ: str = STEP_TOKEN_TYP,
        presented: dpop.Presentation | None = None,
    ) -> CheckResult:
        """Signature, type, time, issuer, audience — and the run still active; with
        `presented`, a bound token's proof of possession too (see `tokenbroker.dpop`).

        The token's time claims and its run's state are judged at one instant of the
        broker's clock, the same instant GetRun would report the run at."""
        now = self._clock()
        result = self._checked.check(
            token,
            find_key=self._keys.find,
            issuer=self.issuer,
            audience=audience,
            expected_typ=typ,
            leeway=LEEWAY,
            now=now,
        )
        if not result.active:
            return result
        result = self._check_run(result, now)
        if presented is None:
            return result
        return dpop.check_binding(result, token, presented, now=now, replay=self.replay)

    def _check_run(self, result: CheckResult, now: float) -> CheckResult:
        run_id = str(result.claims["run_id"])
        run = self._registry.get(run_id, now)
        if run is None:
            return CheckResult(TokenStatus.UNKNOWN_RUN, f"run {run_id} is not known", result.claims)
        if run.state is RunState.ENDED:
            return CheckResult(TokenStatus.RUN_ENDED, "run ended", result.claims)
        if run.state is RunState.EXPIRED:
            return CheckResult(TokenStatus.RUN_EXPIRED, "run expired", result.claims)
        return result

    def authenticate_run_credential(self, token: str) -> Principal:
        """The run principal a run credential proves, or Unauthenticated saying why."""
        result = self.check(token, audience=self.issuer, typ=RUN_CREDENTIAL_TYP)
        if not result.active:
            # The reason may quote the credential's header: a short prefix only.
            raise Unauthenticated(f"run credential rejected: {limits.shown(result.reason, 200)}")
        run_id = str(result.claims["run_id"])
        cnf = dpop.confirmation(result.claims)
        if isinstance(cnf, str):
            raise Unauthenticated(f"run credential rejected: {cnf}")
        bound = str(cnf.get(dpop.CNF_JKT, "")) if cnf is not None else ""
        return Principal(
            PrincipalKind.RUN, f"run:{run_id}", run_id=run_id, auth_method="run", bound_jkt=bound
        )
