"""Run lifecycle: start, renew, end, expire. Each change is committed with its audit event."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from broker import limits
from broker.audit.events import Action, Outcome, draft
from broker.auth.authz import Authorizer, Op
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.identity import Person
from broker.ids import new_run_id
from broker.runs.binding import NO_BINDING_POLICY, BindingPolicySource, refusal
from broker.runs.model import MAX_REASON, NO_IDS, PipelineIds, PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from broker.runs.registry import RunRegistry
from broker.store import (
    Committed,
    CreateRun,
    EndRun,
    ForgetIdempotencyKeys,
    IdempotencyClaim,
    IdempotencyKeyTaken,
    ParentNotActive,
    RenewLease,
    RunNotActive,
    RunQuery,
    Store,
    UnknownRun,
    Write,
    durable,
)
from broker.telemetry.observer import NULL_OBSERVER, Observer

HOUR = 3600.0
DEFAULT_DEADLINE = 6 * HOUR
MAX_DEADLINE = 24 * HOUR
MIN_DEADLINE = 1.0
MIN_LEASE = 1.0
MAX_LEASE = HOUR
MAX_IDEMPOTENCY_KEY = limits.IDEMPOTENCY_KEY.max_chars
MAX_PAGE_SIZE = limits.MAX_PAGE_SIZE
DEFAULT_PAGE_SIZE = 50


@dataclass(frozen=True)
class RunSpec:
    """A validated request to start a run."""

    pipeline: PipelineRef
    ceiling: PermissionSet
    deadline_seconds: float = DEFAULT_DEADLINE
    lease_seconds: float | None = None
    inputs: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    idempotency_key: str = ""
    ids: PipelineIds = NO_IDS
    environment: str = ""

    def __post_init__(self) -> None:
        violations = []
        if not self.ceiling:
            violations.append(
                FieldViolation("permission_ceiling", "at least one permission above 'none'")
            )
        if not MIN_DEADLINE <= self.deadline_seconds <= MAX_DEADLINE:
            violations.append(
                FieldViolation("deadline", f"must be between {MIN_DEADLINE:g}s and 24h")
            )
        if self.lease_seconds is not None and not MIN_LEASE <= self.lease_seconds <= MAX_LEASE:
            violations.append(FieldViolation("lease", f"must be between {MIN_LEASE:g}s and 1h"))
        if len(self.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            violations.append(
                FieldViolation("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY} characters")
            )
        if violations:
            raise InvalidArgument(violations)

    def fingerprint(self, person: Person | None, parent_run_id: str) -> str:
        """Identifies the parameters, so a reused idempotency key can be told apart."""
        data = {
            "pipeline": str(self.pipeline),
            "ceiling": self.ceiling.as_dict(),
            "deadline": self.deadline_seconds,
            "lease": self.lease_seconds,
            "inputs": dict(self.inputs),
            "person": None if person is None else [person.subject, person.issuer],
            "parent": parent_run_id,
        }
        # Only when given, so that keys recorded before ids existed still match their runs.
        if self.ids:
            data["ids"] = self.ids.as_dict()
        if self.environment:
            data["environment"] = self.environment
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# The ids a run of a pipeline may carry under the policy in force: the given ones, with the
# org's id filled in where the policy pins it; PermissionDenied when the policy pins the org
# to another id, or the given org id to another org (a caller trusted for one org must not
# borrow another org's id, which relying parties trust).
OrgIds = Callable[[PipelineRef, PipelineIds], PipelineIds]


def _as_given(pipeline: PipelineRef, ids: PipelineIds) -> PipelineIds:
    return ids


@dataclass(frozen=True)
class Started:
    run: Run
    replayed: bool


class RunLifecycle:
    def __init__(
        self,
        store: Store,
        registry: RunRegistry,
        clock: Clock,
        authorizer: Authorizer,
        observer: Observer = NULL_OBSERVER,
        org_ids: OrgIds = _as_given,
        binding_policy: BindingPolicySource = lambda: NO_BINDING_POLICY,
    ) -> None:
        self._binding_policy = binding_policy
        self._store = store
        self._registry = registry
        self._clock = clock
        self._authz = authorizer
        self._observer = observer
        self._org_ids = org_ids

    def start(
        self,
        ctx: CallContext,
        spec: RunSpec,
        *,
        person: Person | None = None,
        parent: Run | None = None,
        actor_chain: tuple[str, ...] = (),
        action: str = Action.RUN_STARTED,
        op: Op = Op.START_RUN,
        credential_bound: bool | None = None,
    ) -> Started:
        """Start a run; a child run (`parent` given) is cut to its parent's deadline and lease.

        The caller has checked everything else a child needs (see `broker.runs.delegation`);
        the store refuses it if the parent ends first."""
        self._authz.require(ctx, op, pipeline=spec.pipeline)
        now = self._clock()
        spec = self._checked_ids(ctx, spec, op, now)
        if credential_bound is not None:
            try:
                self.require_binding(ctx, actor_chain, credential_bound)
            except PermissionDenied as refused:
                why = {"reason": refused.message, "binding": "required"}
                event = draft(ctx, now, Action.RUN_REFUSED, Outcome.DENIED, details=why)
                self._commit(Write([replace(event, pipeline=spec.pipeline)]))
                raise
        parent_run_id = "" if parent is None else parent.run_id
        claim = None
        if spec.idempotency_key:
            claim = IdempotencyClaim(
                ctx.principal.name,
                spec.idempotency_key,
                spec.fingerprint(person, parent_run_id),
            )
            replay = self._replay(claim)
            if replay is not None:
                self._observer.call_started_run(replay.run)
                return replay
        deadline = now + spec.deadline_seconds
        lease_expire_time = None if spec.lease_seconds is None else now + spec.lease_seconds
        if parent is not None:
            deadline, lease_expire_time = self._within_parent(
                parent, now, deadline, lease_expire_time
            )
        run = Run(
            run_id=new_run_id(),
            pipeline=spec.pipeline,
            state=RunState.ACTIVE,
            create_time=now,
            deadline=deadline,
            triggered_via=ctx.principal.name,
            permission_ceiling=spec.ceiling,
            on_behalf_of=person,
            inputs=spec.inputs,
            lease_seconds=spec.lease_seconds,
            lease_expire_time=lease_expire_time,
            parent_run_id=parent_run_id,
            actor_chain=actor_chain,
            ids=spec.ids,
            environment=spec.environment,
        )
        details = {
            "permission_ceiling": run.permission_ceiling.as_dict(),
            "deadline_us": round(run.deadline * 1e6),
            "lease_seconds": run.lease_seconds,
            "parent_run_id": parent_run_id,
            "actor_chain": list(actor_chain),
            "idempotency_key": spec.idempotency_key,
        }
        if run.ids:
            details["pipeline_ids"] = run.ids.as_dict()
        if run.environment:
            details["environment"] = run.environment
        if parent is not None and run.deadline < now + spec.deadline_seconds:
            details["deadline_cut_to_parent"] = True
        event = draft(ctx, now, action, Outcome.SUCCESS, details=details, run=run)
        try:
            committed = self._commit(Write([event], CreateRun(run, claim)))
        except ParentNotActive:
            raise FailedPrecondition(
                f"parent run {parent_run_id} has ended; it can start no child runs"
            ) from None
        except IdempotencyKeyTaken:
            # A concurrent duplicate won the race; answer with its run.
            assert claim is not None
            replay = self._replay(claim)
            assert replay is not None
            self._observer.call_started_run(replay.run)
            return replay
        assert committed.run is not None
        self._observer.call_started_run(committed.run)
        return Started(committed.run, replayed=False)

    def _checked_ids(self, ctx: CallContext, spec: RunSpec, op: Op, now: float) -> RunSpec:
        try:
            ids = self._org_ids(spec.pipeline, spec.ids)
        except PermissionDenied as refused:
            if op is Op.START_RUN:  # ExecuteOnBehalfOf records its refusals itself
                details = {"reason": refused.message, "pipeline_ids": spec.ids.as_dict()}
                event = draft(ctx, now, Action.RUN_REFUSED, Outcome.DENIED, details=details)
                self._commit(Write([replace(event, pipeline=spec.pipeline)]))
            raise
        return spec if ids == spec.ids else replace(spec, ids=ids)

    def require_binding(
        self, ctx: CallContext, actor_chain: tuple[str, ...], credential_bound: bool
    ) -> None:
        """PermissionDenied when the policy requires the credential of a run started (at its
        chain's root) by this caller to be bound, and it is not."""
        if credential_bound:
            return
        root = actor_chain[0] if actor_chain else ctx.principal.name
        reason = self._binding_policy().run_reason(root)
        if reason is not None:
            raise PermissionDenied(refusal(reason, "run credential"))

    def _within_parent(
        self, parent: Run, now: float, deadline: float, lease_expire_time: float | None
    ) -> tuple[float, float | None]:
        """A child's deadline and lease, cut so that neither outlives its parent's."""
        parent_lapse = self._registry.lapsed_at(parent)
        if not parent.is_active or parent_lapse <= now:
            raise FailedPrecondition(
                f"parent run {parent.run_id} has ended; it can start no child runs"
            )
        deadline = min(deadline, parent.deadline)
        if lease_expire_time is not None:
            lease_expire_time = min(lease_expire_time, parent_lapse)
        return deadline, lease_expire_time

    def _replay(self, claim: IdempotencyClaim) -> Started | None:
        found = self._store.find_idempotent_run(claim.scope, claim.key)
        if found is None:
            return None
        run_id, fingerprint = found
        if fingerprint != claim.fingerprint:
            raise AlreadyExists(
                f"idempotency key {limits.shown(claim.key)!r} was already used by this caller "
                f"for run {run_id} with different parameters; use a new key for a different run"
            )
        run = self._registry.get(run_id)
        assert run is not None, "idempotency key points at a missing run"
        return Started(run, replayed=True)

    def read(self, ctx: CallContext, run_id: str) -> Run:
        """The run, for a caller allowed to read it."""
        run = self.get(run_id)
        self._authz.require(ctx, Op.READ_RUN, run=run)
        self._observer.call_touched_run(run)
        return run

    def get(self, run_id: str) -> Run:
        """The run, without an authorization check (for the broker's own use)."""
        if not run_id:
            raise InvalidArgument.field("run_id", "required")
        run = self._registry.get(run_id)
        if run is None:
            raise NotFound(f"run {limits.shown(run_id)!r} not found")
        return run

    def end(self, ctx: CallContext, run_id: str, reason: str) -> tuple[Run, bool]:
        """End a run; (run, already_ended). Idempotent."""
        if len(reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"at most {MAX_REASON} characters")
        run = self.get(run_id)
        self._authz.require(ctx, Op.REVOKE_RUN, run=run)
        return self.end_unchecked(ctx, run, reason or "ended by caller")

    def end_unchecked(self, ctx: CallContext, run: Run, reason: str) -> tuple[Run, bool]:
        """End a run without an authorization check: for the broker's own decisions."""
        if not run.is_active:
            self._observer.run_revoked(run, already_ended=True)
            return run, True
        now = self._clock()
        mutation = EndRun(
            run.run_id,
            RunState.ENDED,
            now,
            reason,
            ctx.principal.name,
            descendant_event=draft(ctx, now, Action.RUN_ENDED, Outcome.SUCCESS),
        )
        event = draft(
            ctx, now, Action.RUN_ENDED, Outcome.SUCCESS, run=run, details={"reason": reason}
        )
        try:
            committed = self._commit(Write([event], mutation))
        except RunNotActive:
            run = self.get(run.run_id)
            self._observer.run_revoked(run, already_ended=True)
            return run, True
        assert committed.run is not None
        self._observer.run_revoked(committed.run, already_ended=False)
        return committed.run, False

    def renew(self, ctx: CallContext, run_id: str) -> Run:
        run = self.get(run_id)
        self._authz.require(ctx, Op.RENEW_RUN, run=run)
        self._observer.call_touched_run(run)
        if run.lease_seconds is None:
            raise FailedPrecondition(f"run {run_id} was started without a lease; nothing to renew")
        now = self._clock()
        lapse = self._registry.lapsed_at(run)
        if not run.is_active or lapse <= now:
            raise FailedPrecondition(f"run {run_id} is no longer active ({run.state.value})")
        expires = min(run.deadline, now + run.lease_seconds)
        if run.parent_run_id:
            # A child's lease never outlives its parent's (nor any ancestor's).
            parent = self._registry.get(run.parent_run_id)
            expires = min(expires, lapse if parent is None else self._registry.lapsed_at(parent))
        event = draft(
            ctx,
            now,
            Action.RUN_RENEWED,
            Outcome.SUCCESS,
            run=run,
            details={"lease_expire_time_us": round(expires * 1e6)},
        )
        try:
            committed = self._commit(Write([event], RenewLease(run_id, expires)))
        except RunNotActive:
            raise FailedPrecondition(f"run {run_id} is no longer active") from None
        assert committed.run is not None
        return committed.run

    def expire_due(self, ctx: CallContext) -> list[Run]:
        """Expire every active run past its deadline or lease; the reaper calls this."""
        expired = []
        now = self._clock()
        for run in self._registry.due(now):
            own_lapse = run.lapsed_at() <= now
            reason = run.expiry_reason().value if own_lapse else "an ancestor run ended"
            # The run ended when it (or an ancestor) lapsed, not when this pass noticed:
            # recorded as every reader was already told (Run.as_of, RunRegistry.get).
            mutation = EndRun(
                run.run_id,
                RunState.EXPIRED,
                self._registry.lapsed_at(run),
                reason,
                "",
                descendant_event=draft(ctx, now, Action.RUN_EXPIRED, Outcome.SUCCESS),
            )
            event = draft(
                ctx,
                now,
                Action.RUN_EXPIRED,
                Outcome.SUCCESS,
                run=run,
                details={"reason": reason},
            )
            try:
                committed = self._commit(Write([event], mutation))
            except (RunNotActive, UnknownRun):
                continue
            assert committed.run is not None
            expired.append(committed.run)
        self._registry.prune(now)
        return expired

    def forget_idempotency_keys(self, ctx: CallContext, retention: float) -> None:
        """Retention: forget the idempotency keys of runs that ended over `retention` seconds
        ago, so that keys cannot pile up for ever (a retry that late starts a new run)."""
        now = self._clock()
        cutoff = now - retention
        details = {"ended_before_us": round(cutoff * 1e6)}
        event = draft(ctx, now, Action.IDEMPOTENCY_FORGOTTEN, Outcome.SUCCESS, details=details)
        self._commit(Write([event], ForgetIdempotencyKeys(cutoff)))

    def list(self, ctx: CallContext, query: RunQuery) -> list[Run]:
        # What the query may return; "*" where it does not filter. The caller's scope must
        # cover all of it (results are not trimmed to the scope afterwards).
        selection = PipelineRef(query.org or "*", query.project or "*", query.pipeline or "*")
        self._authz.require(ctx, Op.LIST_RUNS, pipeline=selection)
        if not 1 <= query.limit <= MAX_PAGE_SIZE:
            raise InvalidArgument.field("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        # States as of one instant, in the filter and in the answer alike (see Run.as_of).
        now = self._clock()
        return [run.as_of(now) for run in self._store.list_runs(replace(query, as_of=now))]

    def _commit(self, write: Write) -> Committed:
        return durable.commit(self._store, write, "nothing was changed")
