"""IssueToken and VerifyToken: the hot path of every pipeline step."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from broker import limits
from broker.audit.events import Action, Outcome, draft
from broker.auth.authz import Authorizer, Op
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ScopeExceeded,
)
from broker.identity import PrincipalKind
from broker.runs.binding import (
    NO_BINDING_POLICY,
    Binding,
    BindingPolicySource,
    refusal,
)
from broker.runs.claims import DEFAULT_SHAPE, TokenShape
from broker.runs.model import Run
from broker.runs.permissions import PermissionSet
from broker.runs.registry import RunRegistry
from broker.runs.tokens import MintedToken, TokenService
from broker.store import Store, StoreUnavailable, Write, durable
from broker.telemetry.observer import NULL_OBSERVER, Observer
from tokenbroker.dpop import Presentation
from tokenbroker.verification import CheckResult, TokenStatus

NOTHING_PRESENTED = Presentation()

log = logging.getLogger(__name__)

MIN_TTL = 30.0
MAX_TTL = 3600.0
DEFAULT_TTL = 600.0
AUDIENCE_PATTERN = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces
STEP_PATTERN = re.compile(r"^[A-Za-z0-9._:/-]{0,128}$")
MAX_TOKEN_LENGTH = 16 * 1024

# Verification failures that suggest forgery or misuse rather than ordinary expiry; these
# are audited. (Expired tokens and ended runs are everyday events and are not.)
SUSPICIOUS = frozenset(
    {
        TokenStatus.BAD_SIGNATURE,
        TokenStatus.DISALLOWED_ALGORITHM,
        TokenStatus.UNKNOWN_KEY,
        TokenStatus.WRONG_TYPE,
        TokenStatus.WRONG_ISSUER,
        # A bound token shown without its key: most likely leaked, or a proof replayed.
        TokenStatus.PROOF_MISSING,
        TokenStatus.PROOF_WRONG_KEY,
        TokenStatus.PROOF_BAD_SIGNATURE,
        TokenStatus.PROOF_REPLAYED,
        TokenStatus.PROOF_WRONG_TOKEN_HASH,
        TokenStatus.CERTIFICATE_MISMATCH,
    }
)

# Permissions the policy grants a service account, for the "inherit" mode; None if unknown.
AccountPermissions = Callable[[str], PermissionSet | None]
# What the policy in force adds to a run's step tokens (sub template, custom claims, tags).
ShapeFor = Callable[[Run], TokenShape]


def _default_shape(run: Run) -> TokenShape:
    return DEFAULT_SHAPE


@dataclass(frozen=True)
class TokenRequest:
    """A validated IssueToken request."""

    run_id: str
    audience: str
    permissions: PermissionSet
    inherit_from: str
    ttl: float
    step: str
    # Binding asked for: the step's key thumbprint (from its public JWK), the key of this
    # call's DPoP proof, the client certificate of this call.
    bind_jkt: str = ""
    bind_proof_key: bool = False
    bind_certificate: bool = False

    def __post_init__(self) -> None:
        violations = []
        if not AUDIENCE_PATTERN.match(self.audience):
            violations.append(
                FieldViolation("audience", "required: 1-256 printable characters, no spaces")
            )
        if not MIN_TTL <= self.ttl <= MAX_TTL:
            violations.append(
                FieldViolation("ttl", f"must be between {MIN_TTL:g}s and {MAX_TTL:g}s (1h)")
            )
        if not STEP_PATTERN.match(self.step):
            violations.append(
                FieldViolation("step", "at most 128 letters, digits, '.', '_', ':', '/' or '-'")
            )
        if violations:
            raise InvalidArgument(violations)


def _same_issuer(audience: str, issuer: str) -> bool:
    return audience.rstrip("/").lower() == issuer.rstrip("/").lower()


class Issuance:
    def __init__(
        self,
        store: Store,
        registry: RunRegistry,
        tokens: TokenService,
        authorizer: Authorizer,
        clock: Clock,
        account_permissions: AccountPermissions,
        observer: Observer = NULL_OBSERVER,
        shape_for: ShapeFor = _default_shape,
        binding_policy: BindingPolicySource = lambda: NO_BINDING_POLICY,
    ) -> None:
        self._store = store
        self._registry = registry
        self._tokens = tokens
        self._authz = authorizer
        self._clock = clock
        self._account_permissions = account_permissions
        self._observer = observer
        self._shape_for = shape_for
        self._binding_policy = binding_policy

    def issue(self, ctx: CallContext, request: TokenRequest) -> MintedToken:
        if _same_issuer(request.audience, self._tokens.issuer):
            # A step token must never look like a credential for the broker itself.
            raise InvalidArgument.field(
                "audience", "cannot be this broker's own issuer: step tokens are for other APIs"
            )
        run = self._run_for(ctx, request.run_id)
        self._authz.require(ctx, Op.ISSUE_TOKEN, run=run)
        self._observer.call_touched_run(run)
        now = self._clock()
        run = run.as_of(now)
        if not run.is_active:
            reason = run.end_reason or run.state.value
            raise FailedPrecondition(
                f"run {run.run_id} is no longer active ({reason}); no new tokens"
            )
        try:
            granted = self._grant(ctx, run, request, now)
            binding = self._binding(ctx, run, request, granted, now)
        except PermissionDenied:
            self._observer.token_issued(request.audience, "refused")
            raise
        try:
            shaped = self._shape_for(run).claims_for(run, request.step, request.audience)
        except FailedPrecondition as exc:
            # The policy's subject template or claim rules cannot be met by this run: a
            # decision like any refusal, recorded (the reason names rules, never values).
            self._refuse(ctx, run, now, exc.message)
            self._observer.token_issued(request.audience, "refused")
            raise
        minted = self._tokens.mint_step_token(
            run,
            audience=request.audience,
            permissions=granted,
            # Never beyond the lease it is issued under: an offline verifier, which cannot
            # know of renewals, then rejects it once the run lapses (docs/design.md).
            expire_time=min(now + request.ttl, run.lapsed_at()),
            step=request.step,
            shaped=shaped,
            binding=binding,
        )
        details = {
            "jti": minted.token_id,
            "aud": request.audience,
            "permissions": granted.as_dict(),
            "exp_us": round(minted.expire_time * 1e6),
            "step": request.step,
            "kid": minted.key_id,
            "sub": minted.subject,
        }
        if request.inherit_from:
            details["inherited_from"] = request.inherit_from
        cnf = binding.cnf()
        if cnf is not None:
            details["cnf"] = cnf
        # Durable before the token leaves: no token without its audit event.
        self._commit(Write([draft(ctx, now, Action.TOKEN_ISSUED, Outcome.SUCCESS, run, details)]))
        self._observer.token_issued(request.audience, "issued")
        return minted

    def _binding(
        self,
        ctx: CallContext,
        run: Run,
        request: TokenRequest,
        granted: PermissionSet,
        now: float,
    ) -> Binding:
        """What the token is bound to, as asked; PermissionDenied (audited) when the policy
        requires a binding and none was asked for."""
        jkt = request.bind_jkt
        if request.bind_proof_key:
            if not ctx.principal.proof_jkt:
                raise FailedPrecondition(
                    "bind_proof_key needs a DPoP proof with this call (metadata 'dpop')"
                )
            if jkt and jkt != ctx.principal.proof_jkt:
                raise InvalidArgument.field(
                    "dpop_jwk", "names another key than the DPoP proof of this call"
                )
            jkt = ctx.principal.proof_jkt
        x5t = ""
        if request.bind_certificate:
            if not ctx.principal.certificate_x5t:
                raise FailedPrecondition(
                    "bind_client_certificate needs a call over mTLS with a client certificate"
                )
            x5t = ctx.principal.certificate_x5t
        binding = Binding(jkt, x5t)
        if not binding.bound:
            reason = self._binding_policy().step_token_reason(run, request.audience, granted)
            if reason is not None:
                self._refuse(ctx, run, now, "binding required", {"binding": reason})
                raise PermissionDenied(refusal(reason, "token"))
        return binding

    def _run_for(self, ctx: CallContext, run_id: str) -> Run:
        run_id = run_id or ctx.principal.run_id
        if not run_id:
            raise InvalidArgument.field("run_id", "required (unless calling with a run credential)")
        run = self._registry.get(run_id)
        if run is None:
            raise NotFound(f"run {limits.shown(run_id)!r} not found")
        return run

    def _grant(
        self, ctx: CallContext, run: Run, request: TokenRequest, now: float
    ) -> PermissionSet:
        excess = request.permissions.excess_over(run.permission_ceiling)
        if excess:
            self._refuse(ctx, run, now, "permissions exceed the run's ceiling", {"excess": excess})
            raise ScopeExceeded(
                "requested permissions exceed the run's ceiling: " + "; ".join(excess)
            )
        if not request.inherit_from:
            return request.permissions
        return self._inherited(ctx, run, request)

    def _inherited(self, ctx: CallContext, run: Run, request: TokenRequest) -> PermissionSet:
        """Permissions inherited from a service account: only the caller's own, or those of
        the account that started the run's chain; never an empty token."""
        allowed = {run.root_account()}
        if ctx.principal.kind is PrincipalKind.SERVICE_ACCOUNT:
            allowed.add(ctx.principal.name)
        if request.inherit_from not in allowed:
            raise PermissionDenied(
                "inherit_from_service_account may name only the caller itself or the account "
                f"that started the run ({' or '.join(sorted(allowed))})"
            )
        inherited = self._account_permissions(request.inherit_from)
        if not inherited:
            raise FailedPrecondition(
                f"service account {limits.shown(request.inherit_from)!r} has no permissions in "
                "the policy "
                "in force to inherit"
            )
        base = request.permissions if request.permissions else inherited
        granted = base.intersect(inherited).intersect(run.permission_ceiling)
        if not granted:
            raise FailedPrecondition(
                f"nothing to grant: the permissions of {limits.shown(request.inherit_from)!r}, "
                "the request and "
                "the run's ceiling have nothing in common"
            )
        return granted

    def _refuse(
        self,
        ctx: CallContext,
        run: Run,
        now: float,
        reason: str,
        extra: dict[str, object] | None = None,
    ) -> None:
        event = draft(
            ctx, now, Action.TOKEN_REFUSED, Outcome.DENIED, run, {"reason": reason, **(extra or {})}
        )
        self._commit(Write([event]))

    def verify(
        self,
        ctx: CallContext,
        token: str,
        audience: str,
        presented: Presentation = NOTHING_PRESENTED,
    ) -> CheckResult:
        self._authz.require(ctx, Op.VERIFY_TOKEN)
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidArgument.field("token", f"at most {MAX_TOKEN_LENGTH} characters")
        if audience and not AUDIENCE_PATTERN.match(audience):
            raise InvalidArgument.field("audience", "1-256 printable characters, no spaces")
        result = self._tokens.check(token, audience=audience or None, presented=presented)
        self._observer.token_verified(result.status.name.lower())
        if result.status in SUSPICIOUS:
            # The reason may quote the token's own header (alg, typ, kid): a short prefix only.
            details = {
                "status": result.status.name.lower(),
                "reason": limits.shown(result.reason, 200),
            }
            event = draft(
                ctx, self._clock(), Action.TOKEN_VERIFY_FAILED, Outcome.DENIED, None, details
            )
            try:
                self._store.commit(Write([event]))
            except StoreUnavailable as exc:
                # Whether a token is valid must not depend on disk space: the verdict stands
                # (it changes nothing), and the log keeps what the audit could not.
                log.error(
                    "could not record a failed verification",
                    extra={**details, "error": str(exc)},
                )
        return result

    def _commit(self, write: Write) -> None:
        durable.commit(self._store, write, "nothing was issued or recorded")
