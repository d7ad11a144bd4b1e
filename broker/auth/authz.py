"""Authorization: which caller may do what, on which pipeline or run.

The domain asks before it acts: `authorizer.require(ctx, Op.X, pipeline=..., run=...)`
raises `PermissionDenied` (and audits the denial) or returns. Deny by default: `ROLE_GRANTS`
and `RUN_GRANTS` list everything a role or a run credential may do, and under which condition.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Protocol

from broker.audit.events import Action, Outcome, draft
from broker.audit.refusals import RefusalLedger
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import PermissionDenied
from broker.identity import BROKER, Principal, PrincipalKind
from broker.policy.model import EVERYTHING, WILDCARD, Policy, Role, ServiceAccount
from broker.runs.model import PipelineRef, Run
from broker.store import Store

log = logging.getLogger(__name__)


class Op(enum.Enum):
    """What a caller asks to do. Each RPC maps to exactly one, except StreamAudit: reading
    the audit log, or (asking for run endings only) following run endings."""

    START_RUN = "start_run"
    EXECUTE_ON_BEHALF = "execute_on_behalf"
    RENEW_RUN = "renew_run"
    ISSUE_TOKEN = "issue_token"
    VERIFY_TOKEN = "verify_token"
    REVOKE_RUN = "revoke_run"
    READ_RUN = "read_run"
    LIST_RUNS = "list_runs"
    READ_AUDIT = "read_audit"
    # Which runs ended, and when: what offline verifiers need, without people or inputs.
    FOLLOW_RUN_ENDINGS = "follow_run_endings"
    # Tree heads and consistency proofs: hashes and sizes only, never an event's content.
    PROVE_AUDIT = "prove_audit"
    ROTATE_KEYS = "rotate_keys"


class Authorizer(Protocol):
    def require(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> None:
        """Return if allowed; otherwise audit the denial and raise PermissionDenied."""
        ...

    def allows(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> bool:
        """Whether `require` would return: a question, neither audited nor raised."""
        ...


class Grant(enum.Enum):
    """The condition under which a role may perform an operation."""

    IN_SCOPE = "in_scope"  # the pipeline or run lies inside the account's scopes
    STARTED_BY_CALLER = "started_by_caller"  # the run was started by this account
    OWN_RUN = "own_run"  # a run credential, acting on its own run
    ANYWHERE = "anywhere"


# Deny by default: an operation not listed for any of the caller's roles is refused.
ROLE_GRANTS: Mapping[Role, Mapping[Op, Grant]] = MappingProxyType(
    {
        Role.ORCHESTRATOR: {
            Op.START_RUN: Grant.IN_SCOPE,
            Op.ISSUE_TOKEN: Grant.IN_SCOPE,
            Op.RENEW_RUN: Grant.IN_SCOPE,
            Op.REVOKE_RUN: Grant.IN_SCOPE,
            Op.READ_RUN: Grant.IN_SCOPE,
            Op.LIST_RUNS: Grant.IN_SCOPE,
        },
        Role.DELEGATOR: {
            Op.EXECUTE_ON_BEHALF: Grant.IN_SCOPE,
            Op.READ_RUN: Grant.STARTED_BY_CALLER,
        },
        Role.AUDITOR: {
            Op.READ_AUDIT: Grant.IN_SCOPE,
            Op.FOLLOW_RUN_ENDINGS: Grant.IN_SCOPE,
            Op.PROVE_AUDIT: Grant.ANYWHERE,
            Op.READ_RUN: Grant.IN_SCOPE,
            Op.LIST_RUNS: Grant.IN_SCOPE,
        },
        # Least privilege for APIs that verify tokens offline: signing keys (open to every
        # caller) and which runs ended — never who acted, for whom, or with what inputs.
        Role.VERIFIER: {Op.FOLLOW_RUN_ENDINGS: Grant.IN_SCOPE},
        Role.ADMIN: {Op.ROTATE_KEYS: Grant.ANYWHERE},
    }
)
RUN_GRANTS: Mapping[Op, Grant] = MappingProxyType(
    {
        Op.ISSUE_TOKEN: Grant.OWN_RUN,
        Op.RENEW_RUN: Grant.OWN_RUN,
        Op.REVOKE_RUN: Grant.OWN_RUN,
        Op.READ_RUN: Grant.OWN_RUN,
        Op.READ_AUDIT: Grant.OWN_RUN,
        # Child runs; the delegation rules narrow this further.
        Op.EXECUTE_ON_BEHALF: Grant.ANYWHERE,
    }
)
ANY_CALLER = frozenset({Op.VERIFY_TOKEN})

DOING: Mapping[Op, str] = MappingProxyType(
    {
        Op.START_RUN: "start runs",
        Op.EXECUTE_ON_BEHALF: "execute runs on behalf of people",
        Op.RENEW_RUN: "renew runs",
        Op.ISSUE_TOKEN: "issue tokens",
        Op.VERIFY_TOKEN: "verify tokens",
        Op.REVOKE_RUN: "end runs",
        Op.READ_RUN: "read runs",
        Op.LIST_RUNS: "list runs",
        Op.READ_AUDIT: "read the audit log",
        Op.FOLLOW_RUN_ENDINGS: "follow run endings",
        Op.PROVE_AUDIT: "read the audit log's tree heads and consistency proofs",
        Op.ROTATE_KEYS: "rotate signing keys",
    }
)


def roles_granting(op: Op) -> list[Role]:
    return [role for role, grants in ROLE_GRANTS.items() if op in grants]


def decide(
    policy: Policy,
    principal: Principal,
    op: Op,
    pipeline: PipelineRef | None = None,
    run: Run | None = None,
) -> str | None:
    """None when allowed; otherwise why not, in words safe to show the caller.

    A reason names the role or scope that is missing, the caller's own scopes and what
    the caller asked for, never another tenant's data (not even a run's pipeline).
    """
    if principal.is_anonymous:
        return "authentication required"
    if op in ANY_CALLER:
        return None
    if principal.kind is PrincipalKind.RUN:
        return _decide_run(principal, op, run)
    account = policy.account(principal.name)
    if account is None:
        return f"service account {principal.name} is not in the policy in force"
    granting = [(role, ROLE_GRANTS[role][op]) for role in roles_granting(op)]
    held = [(role, grant) for role, grant in granting if role in account.roles]
    if not held:
        needed = " or ".join(role.value for role, _ in granting)
        return f"{account.name} may not {DOING[op]}: that needs role {needed}"
    reasons = [_check(account, op, grant, pipeline, run) for _, grant in held]
    return None if None in reasons else reasons[0]


def _decide_run(principal: Principal, op: Op, run: Run | None) -> str | None:
    grant = RUN_GRANTS.get(op)
    if grant is None:
        return f"a run credential may not {DOING[op]}"
    if grant is Grant.OWN_RUN and (run is None or run.run_id != principal.run_id):
        return f"a run credential acts only on its own run ({principal.run_id})"
    return None


def _check(
    account: ServiceAccount,
    op: Op,
    grant: Grant,
    pipeline: PipelineRef | None,
    run: Run | None,
) -> str | None:
    doing = f"{account.name} may not {DOING[op]}"
    if grant is Grant.ANYWHERE:
        return None
    if grant is Grant.STARTED_BY_CALLER:
        if run is not None and run.triggered_via == account.name:
            return None
        which = f"run {run.run_id}" if run is not None else "this run"
        return f"{doing}: {which} was not started by {account.name}"
    scopes = account.scope_text()
    if run is not None and not account.covers(run.pipeline):
        return f"{doing}: run {run.run_id} is outside its scope ({scopes})"
    target = pipeline if pipeline is not None else (None if run is not None else EVERYTHING)
    if target is None or account.covers(target):
        return None
    if WILDCARD not in str(target):
        return f"{doing}: {target} is outside its scope ({scopes})"
    what = "all pipelines" if target == EVERYTHING else str(target)
    return (
        f"{doing} across {what}: outside its scope ({scopes}); "
        "filter the request to pipelines within it"
    )


class PolicyAuthorizer:
    """Decides against the policy in force; audits and raises each denial."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        store: Store,
        clock: Clock,
        refusals: RefusalLedger | None = None,
    ) -> None:
        self._policy = policy
        self._store = store
        self._clock = clock
        # Repeated denials of one principal for one reason are counted, not each written.
        self._refusals = refusals if refusals is not None else RefusalLedger(store, clock)

    def require(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> None:
        if ctx.principal == BROKER:  # the broker's own work (reaper); never a remote caller
            return
        reason = decide(self._policy(), ctx.principal, op, pipeline, run)
        if reason is None:
            return
        self._audit(ctx, op, reason, pipeline, run)
        raise PermissionDenied(reason)

    def allows(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> bool:
        if ctx.principal == BROKER:
            return True
        return decide(self._policy(), ctx.principal, op, pipeline, run) is None

    def _audit(
        self, ctx: CallContext, op: Op, reason: str, pipeline: PipelineRef | None, run: Run | None
    ) -> None:
        details = {
            "op": op.value,
            "reason": reason,
            "auth_method": ctx.principal.auth_method,
            "requested": "" if pipeline is None else str(pipeline),
        }
        event = draft(ctx, self._clock(), Action.AUTHZ_DENIED, Outcome.DENIED, run, details)
        if run is None and pipeline is not None and WILDCARD not in str(pipeline):
            event = replace(event, pipeline=pipeline)
        self._refusals.record(event, source=ctx.principal.name, reason=reason)
