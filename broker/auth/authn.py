"""Authentication: who is calling, proven without any secret stored in the broker.

Three ways, decided per call from what the call presents (`Presented`, filled in by the gRPC
edge in `broker.api.authn`):

1. `authorization: Bearer <JWT>` whose header `typ` is the run-credential type: a run's own
   credential, checked by the injected `run_credentials` verifier.
2. Any other bearer JWT: a service-account assertion (`broker.assertions`).
3. No bearer, but a client certificate the TLS layer verified against --client-ca: its URI
   or DNS SAN, mapped to a service account by the policy.

Nothing presented is ANONYMOUS, which only open methods accept. Every refusal is an
`authn.denied` audit event with the reason; the credential itself is never logged or stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from broker.audit.events import Action, Outcome, draft
from broker.audit.refusals import RefusalLedger
from broker.auth import assertions
from broker.auth.throttle import peer_source
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import Unauthenticated
from broker.identity import ANONYMOUS, RUN_CREDENTIAL_TYP, Principal, PrincipalKind
from broker.policy.model import Policy, ServiceAccount
from broker.store import Store
from tokenbroker.dpop import ProofVerdict
from tokenbroker.verification import PARSE_ERRORS, TokenStatus

log = logging.getLogger(__name__)

# Given a run credential, return the run's principal or raise Unauthenticated.
RunCredentialVerifier = Callable[[str], Principal]

# Checks the DPoP proof of a call: (proof, method path, bearer credential or None, the key the
# credential is bound to or None) -> verdict, replay included.
ProofChecker = Callable[[str, str, str | None, str | None], ProofVerdict]

# Called with (call, peer, method) before a refusal is audited; may raise ResourceExhausted.
RefusalHook = Callable[[CallContext, str, str], None]

DEFAULT_CACHE_ENTRIES = 4096
NO_CREDENTIAL = (
    "no credential: send 'authorization: Bearer <service-account assertion or run "
    "credential>', or connect with a client certificate"
)


@dataclass(frozen=True)
class Presented:
    """What a call presented, as the transport found it."""

    authorization: tuple[str, ...] = ()
    # SANs (URIs first, then DNS names) of a client certificate the TLS layer verified.
    certificate_sans: tuple[str, ...] = ()
    peer: str = ""
    # DPoP proofs (`dpop` metadata) and the full method path they must name (their htu).
    dpop: tuple[str, ...] = ()
    target: str = ""
    # x5t#S256 of the client certificate the TLS layer verified, "" without one.
    certificate_x5t: str = ""


class ProofRefused(Unauthenticated):
    """A credential presented without a valid proof of possession; `status` says which check
    failed (recorded in the refusal's audit event as `proof_status`)."""

    def __init__(self, status: TokenStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Attempt:
    """What is known about a refused caller, for the audit record."""

    mechanism: str = "none"
    claimed: str = ""
    proof_status: str = ""


def service_account_principal(account: ServiceAccount, auth_method: str) -> Principal:
    return Principal(
        PrincipalKind.SERVICE_ACCOUNT,
        account.name,
        roles=frozenset(r.value for r in account.roles),
        auth_method=auth_method,
    )


class VerificationCache:
    """Successful assertion checks, keyed by the credential's SHA-256 (never the credential).

    An entry lives until the assertion expires and only for the policy object it was
    checked against, so a reload that drops an account or key takes effect at once.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[Principal, float, Policy]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, policy: Policy, now: float) -> Principal | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            principal, valid_until, checked_against = entry
            if checked_against is not policy or now > valid_until:
                del self._entries[key]
                return None
            return principal

    def put(
        self, key: bytes, principal: Principal, valid_until: float, policy: Policy, now: float
    ) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                self._evict(now)
            self._entries[key] = (principal, valid_until, policy)

    def _evict(self, now: float) -> None:
        expired = [k for k, (_, until, _) in self._entries.items() if until < now]
        for key in expired:
            del self._entries[key]
        while len(self._entries) >= self._max:
            self._entries.popitem(last=False)


class Authenticator:
    def __init__(
        self,
        policy: Callable[[], Policy],
        audience: str,
        store: Store,
        clock: Clock,
        run_credentials: RunCredentialVerifier,
        cache: VerificationCache | None = None,
        refusals: RefusalLedger | None = None,
        before_refusal: RefusalHook = lambda ctx, peer, method: None,
        proofs: ProofChecker | None = None,
    ) -> None:
        self._policy = policy
        self._audience = audience
        self._store = store
        self._clock = clock
        self._run_credentials = run_credentials
        self.cache = cache if cache is not None else VerificationCache()
        # Repeated refusals from one source for one reason are counted, not each written.
        self._refusals = refusals if refusals is not None else RefusalLedger(store, clock)
        self._before_refusal = before_refusal
        self._proofs = proofs

    @property
    def audience(self) -> str:
        return self._audience

    def authenticate(
        self, presented: Presented, ctx: CallContext, method: str, *, required: bool
    ) -> Principal:
        """The caller's principal; Unauthenticated (audited) if it proves nothing valid."""
        attempt = _Attempt()
        try:
            principal = self._identify_safely(presented, attempt)
            if required and principal.is_anonymous:
                raise Unauthenticated(NO_CREDENTIAL)
            principal = self._possession(principal, presented)
        except Unauthenticated as refused:
            if isinstance(refused, ProofRefused):
                attempt.proof_status = refused.status.name.lower()
            # Over its peer's rate, the refusal is answered (and counted) as throttled instead.
            self._before_refusal(ctx, presented.peer, method)
            self._audit_refusal(ctx, method, refused.message, attempt, presented.peer)
            raise
        return principal

    def _possession(self, principal: Principal, presented: Presented) -> Principal:
        """The principal with what the call proved it holds: a DPoP proof's key (required, and
        by the bound key, when the credential is bound) and the client certificate."""
        if principal.is_anonymous:
            return principal
        if presented.certificate_x5t:
            principal = dataclasses.replace(principal, certificate_x5t=presented.certificate_x5t)
        if len(presented.dpop) > 1:
            raise ProofRefused(TokenStatus.PROOF_MALFORMED, "more than one dpop header")
        if not presented.dpop:
            if principal.bound_jkt:
                raise ProofRefused(
                    TokenStatus.PROOF_MISSING,
                    "run credential is bound to a key (cnf.jkt): every call must carry a fresh "
                    "DPoP proof by that key in the 'dpop' metadata",
                )
            return principal
        if self._proofs is None:
            raise ProofRefused(TokenStatus.PROOF_MALFORMED, "DPoP proofs are not accepted here")
        credential = _credential_of(presented)
        verdict = self._proofs(
            presented.dpop[0], presented.target, credential, principal.bound_jkt or None
        )
        if not verdict.ok:
            raise ProofRefused(verdict.status, f"credential refused: {verdict.reason}")
        return dataclasses.replace(principal, proof_jkt=verdict.jkt)

    def _identify_safely(self, presented: Presented, attempt: _Attempt) -> Principal:
        """`_identify`, with a backstop: whatever a credential's bytes make a parser raise is a
        malformed credential (UNAUTHENTICATED, audited), never an internal error. The precise
        checks come first; this only keeps a parser's surprise from becoming a crash."""
        try:
            return self._identify(presented, attempt)
        except PARSE_ERRORS as exc:
            log.warning(
                "credential could not be parsed",
                extra={"error": type(exc).__name__, "mechanism": attempt.mechanism},
            )
            raise Unauthenticated("malformed credential") from None

    def _identify(self, presented: Presented, attempt: _Attempt) -> Principal:
        if len(presented.authorization) > 1:
            raise Unauthenticated("more than one authorization header")
        if presented.authorization:
            attempt.mechanism = "bearer"
            return self._from_bearer(_bearer(presented.authorization[0]), attempt)
        if presented.certificate_sans:
            attempt.mechanism = "client_certificate"
            attempt.claimed = assertions.shown(presented.certificate_sans[0])
            account = self._policy().account_for_certificate(presented.certificate_sans)
            if account is None:
                raise Unauthenticated(
                    f"client certificate {attempt.claimed} is not mapped to any service account"
                )
            return service_account_principal(account, "mtls")
        return ANONYMOUS

    def _from_bearer(self, token: str, attempt: _Attempt) -> Principal:
        # Credentials seen before are recognised without parsing them again: an assertion in
        # the cache, a run credential by its header alone (its verifier caches checked tokens).
        if len(token) <= assertions.MAX_CREDENTIAL_LENGTH:
            key = hashlib.sha256(token.encode()).digest()
            cached = self.cache.get(key, self._policy(), self._clock())
            if cached is not None:
                return cached
            if assertions.routing_typ(token) == RUN_CREDENTIAL_TYP:
                return self._run_credential(token, attempt)
        header = assertions.unverified_header(token)
        if header.get("typ") == RUN_CREDENTIAL_TYP:
            attempt.mechanism = "run_credential"
            return self._run_credentials(token)
        attempt.mechanism = "assertion"
        attempt.claimed = assertions.claimed_account(token)
        return self._assertion(token)

    def _run_credential(self, token: str, attempt: _Attempt) -> Principal:
        """Refused as the full parse would refuse it: a credential that is not a JWT at all as
        malformed (mechanism "bearer"), any other with the run-credential verifier's reason."""
        attempt.mechanism = "run_credential"
        try:
            return self._run_credentials(token)
        except Unauthenticated:
            attempt.mechanism = "bearer"
            assertions.unverified_header(token)
            attempt.mechanism = "run_credential"
            raise

    def _assertion(self, token: str) -> Principal:
        policy = self._policy()
        now = self._clock()
        key = hashlib.sha256(token.encode()).digest()
        cached = self.cache.get(key, policy, now)
        if cached is not None:
            return cached
        verified = assertions.verify(token, policy, self._audience, now)
        principal = service_account_principal(verified.account, "assertion")
        self.cache.put(key, principal, verified.expires + assertions.CLOCK_SKEW, policy, now)
        return principal

    def _audit_refusal(
        self, ctx: CallContext, method: str, reason: str, attempt: _Attempt, peer: str
    ) -> None:
        details = {
            "reason": reason,
            "method": method,
            "mechanism": attempt.mechanism,
            "claimed_principal": attempt.claimed,
            "peer": peer,
        }
        # A proof's reason may hold numbers (how stale its iat is): its status is what
        # repeats, so refusals of one kind from one peer are counted, not each written.
        kind = reason
        if attempt.proof_status:
            details["proof_status"] = attempt.proof_status
            kind = f"proof refused: {attempt.proof_status}"
        event = draft(ctx, self._clock(), Action.AUTHN_DENIED, Outcome.DENIED, details=details)
        self._refusals.record(event, source=peer_source(peer), reason=kind)


def _bearer(value: str) -> str:
    scheme, _, credential = value.strip().partition(" ")
    credential = credential.strip()
    # RFC 9449 §7.1 names the scheme of a bound token DPoP; the proof is checked either way.
    if scheme.lower() not in ("bearer", "dpop") or not credential:
        raise Unauthenticated("authorization metadata must be 'Bearer <credential>'")
    return credential


def _credential_of(presented: Presented) -> str | None:
    """The bearer credential a proof's ath must hash, None for a certificate-only caller."""
    if not presented.authorization:
        return None
    return _bearer(presented.authorization[0])
