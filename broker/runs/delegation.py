"""ExecuteOnBehalfOf: a trusted service account starts a run for a person, and the record
keeps both identities — who called, who asked, and how the person's identity was known.

The person comes from one of:
- an OIDC ID token from an identity provider the policy trusts *for this delegator*
  (verified here: signature against the IdP's keys, issuer, audience, expiry, and a verified
  email when the email is the identity) → `idp_verified`;
- the delegator's own word, where the policy explicitly allows it for the user's domain
  → `asserted_by_caller`, never shown as verified;
- for a child run started with a delegated run's credential: the parent run's person,
  unchanged, with the actor chain extended (RFC 8693 `act` nesting) up to a depth limit.

A child run is confined by its chain's *root*: the delegator account that started the first
run, as the policy describes it *now* (a reload narrowing or removing it applies to the next
child at once). The child's pipeline must lie in the root's scopes (and in its parent's
project or pipeline where the root's `child_runs` says so), its person in the root's user
domains, its ceiling within its parent's; its deadline and lease are cut to its parent's
(`RunLifecycle.start`), and it ends with its parent (`EndRun` cascades in the store).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt

from broker import limits
from broker.audit.events import Action, Outcome, draft
from broker.auth.authz import Op
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import (
    BrokerError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from broker.identity import Person, PrincipalKind, VerificationMethod
from broker.runs.binding import UNBOUND, Binding
from broker.runs.lifecycle import RunLifecycle, RunSpec, Started
from broker.runs.model import PipelineIds, PipelineRef, Run
from broker.runs.registry import RunRegistry
from broker.runs.tokens import MintedToken, TokenService
from broker.store import Store, Write, durable
from broker.telemetry.observer import NULL_OBSERVER, Observer
from tokenbroker.verification import (
    PARSE_ERRORS,
    PublicKey,
    header_problem,
    read_claims,
    read_header,
)

ID_TOKEN_ALGORITHMS = ("RS256", "ES256", "PS256", "EdDSA")
ID_TOKEN_LEEWAY = 60.0
DEFAULT_CHAIN_DEPTH = 4
MAX_ID_TOKEN_LENGTH = 16 * 1024


@dataclass(frozen=True)
class TrustedIdp:
    """An identity provider a delegator may bring people from."""

    issuer: str
    audience: str
    find_key: Callable[[str], PublicKey | None]
    # When true (the default) the person is identified by email, which must be verified.
    email_is_identity: bool = True


class ChildScope(enum.Enum):
    """Where a child run may run, besides inside its root delegator's scopes."""

    IN_SCOPE = "in_scope"
    SAME_PROJECT = "same_project"
    SAME_PIPELINE = "same_pipeline"


def _nowhere(pipeline: PipelineRef) -> bool:
    return False


@dataclass(frozen=True)
class DelegationRules:
    """What one delegator account may do on people's behalf (from the policy)."""

    idps: Mapping[str, TrustedIdp] = field(default_factory=dict)
    user_domains: frozenset[str] = frozenset()
    asserted_domains: frozenset[str] = frozenset()
    max_chain_depth: int = DEFAULT_CHAIN_DEPTH
    # The delegator's scopes, for the child runs of its chains.
    covers: Callable[[PipelineRef], bool] = _nowhere
    scope_text: str = "none"
    child_scope: ChildScope = ChildScope.IN_SCOPE


@dataclass(frozen=True)
class AssertedIdentity:
    subject: str
    email: str
    display_name: str = ""


@dataclass(frozen=True)
class Executed:
    run: Run
    credential: MintedToken | None
    handed_off: bool
    replayed: bool


class Handoff(Protocol):
    """Gives a run and its credential to the system that executes pipelines. `binding`: the
    executor's own key, which the credential is bound to when the request named none."""

    binding: Binding

    def hand_off(self, run: Run, credential: str) -> str:
        """Return the executor's execution id; raise HandoffFailed if it did not accept."""
        ...

    def close(self) -> None: ...


class HandoffFailed(Exception):
    pass


class Refused(PermissionDenied):
    """A delegation refused because of who the person is or how they were vouched for."""


RulesLookup = Callable[[str], DelegationRules | None]


def _sha256(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def _domain(email: str) -> str:
    """The domain of a checked address, lower-cased: domains compare case-insensitively."""
    return email.rpartition("@")[2].lower()


def domain_allowed(domain: str, allowed: frozenset[str]) -> bool:
    """An email domain listed in the policy, or any domain where the policy says "*"."""
    return "*" in allowed or domain.lower() in {d.lower() for d in allowed}


def verify_id_token(token: str, rules: DelegationRules) -> Person:
    """The person an ID token proves, or Refused saying precisely why not."""
    if not token or len(token) > MAX_ID_TOKEN_LENGTH:
        raise InvalidArgument.field("id_token", f"required, at most {MAX_ID_TOKEN_LENGTH} chars")
    header, unverified = read_header(token), read_claims(token)
    if header is None or unverified is None:
        raise InvalidArgument.field("id_token", "not a JWT (JWS compact serialization)")
    issuer = unverified.get("iss")
    idp = rules.idps.get(issuer) if isinstance(issuer, str) else None
    if idp is None:
        shown = limits.shown(issuer) if isinstance(issuer, str) else type(issuer).__name__
        raise Refused(f"this delegator may not act for people from issuer {shown!r}")
    alg, kid = header.get("alg"), header.get("kid", "")
    problem = header_problem(header)
    if problem is not None:
        raise Refused(f"ID token refused: {problem}")
    key = idp.find_key(kid) if isinstance(kid, str) else None
    if alg not in ID_TOKEN_ALGORITHMS or key is None or key.alg != alg:
        raise Refused(f"ID token from {issuer} is not signed by a key of that issuer")
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.alg],
            audience=idp.audience,
            issuer=idp.issuer,
            leeway=ID_TOKEN_LEEWAY,
            options={"require": ["iss", "sub", "aud", "exp", "iat"]},
        )
    except jwt.InvalidSignatureError:
        raise Refused(f"ID token signature does not verify with {issuer}'s keys") from None
    except jwt.ExpiredSignatureError:
        raise Refused("ID token has expired") from None
    except jwt.InvalidAudienceError:
        raise Refused(f"ID token is not for this broker's audience {idp.audience!r}") from None
    except jwt.InvalidTokenError as exc:
        raise Refused(f"ID token rejected: {limits.shown(str(exc), 200)}") from None
    except PARSE_ERRORS:  # NaN or 1e400 in a time claim, deep nesting, ...
        raise Refused("ID token rejected: unreadable claims") from None
    return _person_from_claims(claims, idp, token)


def _person_from_claims(claims: Mapping[str, Any], idp: TrustedIdp, token: str) -> Person:
    # A trusted IdP's claims still become records people read: held to the request limits.
    email = claims.get("email", "")
    if not isinstance(email, str) or (email and limits.parse_email(email) is None):
        raise Refused("ID token has a malformed email claim")
    subject = claims["sub"]
    if not isinstance(subject, str) or limits.SUBJECT.problem(subject) is not None:
        raise Refused(f"ID token has a malformed sub claim ({limits.SUBJECT.rule})")
    if idp.email_is_identity:
        if not email:
            raise Refused("ID token carries no email, and this issuer identifies people by email")
        if claims.get("email_verified") is not True:
            raise Refused(f"the IdP has not verified the email address {email}")
    name = claims.get("name", "")
    if not isinstance(name, str) or limits.DISPLAY_NAME.problem(name) is not None:
        name = ""  # display only: a name that breaks the rules is dropped, not shown
    return Person(
        subject=subject,
        issuer=idp.issuer,
        email=email,
        display_name=name,
        method=VerificationMethod.IDP_VERIFIED,
        evidence_sha256=_sha256(token),
    )


def asserted_person(asserted: AssertedIdentity, rules: DelegationRules, caller: str) -> Person:
    violations = [
        FieldViolation(f"asserted.{name}", rule.rule)
        for name, value, rule in (
            ("subject", asserted.subject, limits.SUBJECT),
            ("email", asserted.email, limits.EMAIL),
        )
        if not value or rule.problem(value) is not None
    ]
    if limits.DISPLAY_NAME.problem(asserted.display_name) is not None:
        violations.append(FieldViolation("asserted.display_name", limits.DISPLAY_NAME.rule))
    if violations:
        raise InvalidArgument(violations)
    if not domain_allowed(_domain(asserted.email), rules.asserted_domains):
        raise Refused(
            f"this delegator may not assert identities in domain {_domain(asserted.email)!r}; "
            "send an ID token from a trusted identity provider instead"
        )
    evidence = json.dumps(
        {"subject": asserted.subject, "email": asserted.email, "asserted_by": caller},
        sort_keys=True,
    )
    return Person(
        subject=asserted.subject,
        issuer=caller,
        email=asserted.email,
        display_name=asserted.display_name,
        method=VerificationMethod.ASSERTED_BY_CALLER,
        evidence_sha256=_sha256(evidence),
    )


def claimed(id_token: str | None, asserted: AssertedIdentity | None) -> dict[str, str] | None:
    """The identity a request names, unverified: for the record of a refusal only."""
    if asserted is not None:
        return {"subject": asserted.subject, "email": asserted.email, "verified": "no"}
    if not id_token:
        return None
    claims = read_claims(id_token) if len(id_token) <= MAX_ID_TOKEN_LENGTH else None
    if claims is None:
        return None
    return {key: limits.shown(str(claims.get(key, "")), 256) for key in ("sub", "email", "iss")} | {
        "verified": "no"
    }


def _check_child_pipeline(
    target: PipelineRef, parent: Run, root: str, rules: DelegationRules
) -> None:
    if target.org != parent.pipeline.org:
        raise Refused("a child run must stay in its parent's organisation")
    if not rules.covers(target):
        raise Refused(
            f"a child run must stay within the scopes of {root}, which started its chain: "
            f"{target} is outside them ({rules.scope_text})"
        )
    if rules.child_scope is ChildScope.SAME_PROJECT and target.project != parent.pipeline.project:
        raise Refused(
            f"the policy keeps child runs of {root}'s chains in their parent's project "
            f"({parent.pipeline.org}/{parent.pipeline.project})"
        )
    if rules.child_scope is ChildScope.SAME_PIPELINE and target != parent.pipeline:
        raise Refused(
            f"the policy keeps child runs of {root}'s chains in their parent's pipeline "
            f"({parent.pipeline})"
        )


def _inherit_attributes(spec: RunSpec, parent: Run) -> RunSpec:
    """A child run's ids and environment come from its parent, never from the run credential
    that asks for it: a pipeline step must not choose the ids a relying party trusts. An id
    is inherited where the child shares what it names (the org always; the project and
    pipeline when it stays in them)."""
    if spec.ids or spec.environment:
        raise InvalidArgument.field(
            "pipeline_ids", "a child run takes its ids and environment from its parent"
        )
    same_project = spec.pipeline.project == parent.pipeline.project
    same_pipeline = same_project and spec.pipeline.pipeline == parent.pipeline.pipeline
    ids = PipelineIds(
        parent.ids.org_id,
        parent.ids.project_id if same_project else "",
        parent.ids.pipeline_id if same_pipeline else "",
    )
    return dataclasses.replace(spec, ids=ids, environment=parent.environment)


class Delegation:
    def __init__(
        self,
        runs: RunLifecycle,
        registry: RunRegistry,
        tokens: TokenService,
        store: Store,
        clock: Clock,
        rules_for: RulesLookup,
        handoff: Handoff | None = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self._runs = runs
        self._registry = registry
        self._tokens = tokens
        self._store = store
        self._clock = clock
        self._rules_for = rules_for
        self._handoff = handoff
        self._observer = observer

    def close(self) -> None:
        if self._handoff is not None:
            self._handoff.close()

    def execute(
        self,
        ctx: CallContext,
        spec: RunSpec,
        id_token: str | None,
        asserted: AssertedIdentity | None,
        binding: Binding = UNBOUND,
    ) -> Executed:
        """Start a run for a person; its credential is bound to `binding` (the runner's key),
        which the policy may require for runs of this delegator's chains."""
        if not spec.idempotency_key:
            raise InvalidArgument.field("idempotency_key", "required for ExecuteOnBehalfOf")
        person: Person | None = None
        try:
            parent: Run | None = None
            if ctx.principal.kind is PrincipalKind.RUN:
                parent = self._parent_run(ctx, spec, id_token, asserted)
                spec = _inherit_attributes(spec, parent)
                person = parent.on_behalf_of
                chain = (*parent.actor_chain, ctx.principal.name)
            else:
                rules = self._rules(ctx)
                person = self._establish(ctx, rules, id_token, asserted)
                self._check_domain(rules, person)
                chain = (ctx.principal.name,)
            if not binding.bound and self._handoff is not None:
                binding = self._handoff.binding  # the executor's key, if it has one
            self._runs.require_binding(ctx, chain, binding.bound)
            started = self._runs.start(
                ctx,
                spec,
                person=person,
                parent=parent,
                actor_chain=chain,
                action=Action.RUN_EXECUTED_ON_BEHALF,
                op=Op.EXECUTE_ON_BEHALF,
            )
        except (PermissionDenied, FailedPrecondition) as refusal:
            self._audit_refusal(ctx, spec, person, claimed(id_token, asserted), refusal)
            raise
        return self._deliver(ctx, started, binding)

    def _rules(self, ctx: CallContext) -> DelegationRules:
        rules = self._rules_for(ctx.principal.name)
        if rules is None:
            raise Refused(
                f"{ctx.principal.name} may not act on behalf of people: the policy gives it "
                "no delegator role or no delegation rules"
            )
        return rules

    def _establish(
        self,
        ctx: CallContext,
        rules: DelegationRules,
        id_token: str | None,
        asserted: AssertedIdentity | None,
    ) -> Person:
        if id_token is not None:
            return verify_id_token(id_token, rules)
        if asserted is not None:
            return asserted_person(asserted, rules, ctx.principal.name)
        raise InvalidArgument.field("person", "give id_token or asserted")

    def _check_domain(self, rules: DelegationRules, person: Person) -> None:
        if person.email and not domain_allowed(_domain(person.email), rules.user_domains):
            domain = _domain(person.email)
            raise Refused(f"this delegator may not act for users in domain {domain!r}")

    def _parent_run(
        self,
        ctx: CallContext,
        spec: RunSpec,
        id_token: str | None,
        asserted: AssertedIdentity | None,
    ) -> Run:
        parent = self._registry.get(ctx.principal.run_id)
        if (
            parent is None
            or not parent.is_active
            or self._registry.lapsed_at(parent) <= self._clock()
            or parent.on_behalf_of is None
        ):
            raise FailedPrecondition(
                "only an active run started on behalf of a person can start child runs for them"
            )
        if id_token is not None or asserted is not None:
            raise InvalidArgument.field(
                "person", "a child run keeps its parent's person; do not send another"
            )
        root = parent.root_account()
        rules = self._rules_for(root)
        if rules is None:
            raise Refused(
                f"{root}, which started this delegation chain, is no longer a delegator in the "
                "policy in force: its runs can start no child runs"
            )
        if len(parent.actor_chain) + 1 > rules.max_chain_depth:
            raise Refused(
                f"delegation chain would exceed the limit of {rules.max_chain_depth} actors"
            )
        _check_child_pipeline(spec.pipeline, parent, root, rules)
        assert parent.on_behalf_of is not None
        self._check_domain(rules, parent.on_behalf_of)
        excess = spec.ceiling.excess_over(parent.permission_ceiling)
        if excess:
            raise Refused("a child run cannot exceed its parent's ceiling: " + "; ".join(excess))
        return parent

    def _audit_refusal(
        self,
        ctx: CallContext,
        spec: RunSpec,
        person: Person | None,
        claim: dict[str, str] | None,
        refusal: BrokerError,
    ) -> None:
        details: dict[str, object] = {
            "reason": refusal.message,
            "idempotency_key": spec.idempotency_key,
        }
        if person is None and claim is not None:
            # Who the request *said* it was for; never verified, so kept apart from the
            # event's person.
            details["claimed_person"] = claim
        event = dataclasses.replace(
            draft(ctx, self._clock(), Action.RUN_REFUSED, Outcome.DENIED, details=details),
            on_behalf_of=person,
            pipeline=spec.pipeline,
        )
        durable.commit(self._store, Write([event]), "the refusal could not be recorded")

    def _deliver(self, ctx: CallContext, started: Started, binding: Binding) -> Executed:
        run = started.run
        if self._handoff is None:
            # A replay answers the same caller that started the run (the idempotency key is
            # per caller), so it may receive a credential for it again.
            credential = self._tokens.mint_run_credential(run, binding)
            return Executed(run, credential, handed_off=False, replayed=started.replayed)
        if started.replayed:
            if not run.is_active:
                # Most likely the executor refused it the first time: say so, never "success".
                raise FailedPrecondition(
                    f"run {run.run_id} for this idempotency key has ended ({run.end_reason}); "
                    "retry with a new idempotency key"
                )
            return Executed(run, None, handed_off=True, replayed=True)  # handed off already
        try:
            with self._observer.handing_off(run):
                credential = self._tokens.mint_run_credential(run, binding)
                self._handoff.hand_off(run, credential.token)
        except HandoffFailed as exc:
            self._runs.end_unchecked(ctx, run, f"executor did not accept the run: {exc}")
            raise Unavailable(
                f"the executor did not accept run {run.run_id} ({exc}); the run was ended — "
                "retry with a new idempotency key"
            ) from exc
        return Executed(run, None, handed_off=True, replayed=False)
