"""Runs: the unit a token belongs to. A run is active until it is ended or expires;
its state is the one thing every token check consults."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from broker import limits
from broker.errors import FieldViolation, InvalidArgument
from broker.identity import Person, VerificationMethod
from broker.runs.permissions import PermissionSet

SEGMENT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_INPUTS = limits.MAX_INPUTS
MAX_INPUT_KEY = limits.INPUT_KEY.max_chars
MAX_INPUT_VALUE = limits.INPUT_VALUE.max_chars
MAX_INPUTS_BYTES = limits.MAX_INPUTS_BYTES
MAX_REASON = limits.REASON.max_chars


class RunState(enum.Enum):
    """Stored as its value; never renumber."""

    ACTIVE = "active"
    ENDED = "ended"
    EXPIRED = "expired"


class ExpiryReason(enum.Enum):
    """Why a run expired without anyone ending it. The value is the run's stored `end_reason`;
    never reword."""

    LEASE_LAPSED = "lease lapsed"
    DEADLINE_PASSED = "deadline passed"

    @property
    def label(self) -> str:
        """A short, bounded name for metrics: "lease" or "deadline"."""
        return "lease" if self is ExpiryReason.LEASE_LAPSED else "deadline"


@dataclass(frozen=True)
class PipelineRef:
    org: str
    project: str
    pipeline: str

    @classmethod
    def parse(cls, org: str, project: str, pipeline: str, field: str = "pipeline") -> PipelineRef:
        violations = [
            FieldViolation(
                f"{field}.{name}",
                "required: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
            for name, value in (("org", org), ("project", project), ("pipeline", pipeline))
            if not SEGMENT_PATTERN.match(value)
        ]
        if violations:
            raise InvalidArgument(violations)
        return cls(org, project, pipeline)

    def __str__(self) -> str:
        return f"{self.org}/{self.project}/{self.pipeline}"


@dataclass(frozen=True)
class PipelineIds:
    """Immutable ids of a pipeline's org, project and pipeline, each optional ("" when the
    orchestrator did not send it). Names can be freed and taken by someone else; ids cannot."""

    org_id: str = ""
    project_id: str = ""
    pipeline_id: str = ""

    @classmethod
    def parse(
        cls, org_id: str, project_id: str, pipeline_id: str, field: str = "pipeline_ids"
    ) -> PipelineIds:
        violations = [
            FieldViolation(f"{field}.{name}", limits.IMMUTABLE_ID.rule)
            for name, value in (
                ("org_id", org_id),
                ("project_id", project_id),
                ("pipeline_id", pipeline_id),
            )
            if limits.IMMUTABLE_ID.problem(value) is not None
        ]
        if violations:
            raise InvalidArgument(violations)
        return cls(org_id, project_id, pipeline_id)

    def as_dict(self) -> dict[str, str]:
        """The ids that are set, by claim name (`org_id`, `project_id`, `pipeline_id`)."""
        return {name: value for name, value in vars(self).items() if value}

    def __bool__(self) -> bool:
        return bool(self.org_id or self.project_id or self.pipeline_id)


NO_IDS = PipelineIds()


def parse_environment(value: str, field: str = "environment") -> str:
    if limits.ENVIRONMENT.problem(value) is not None:
        raise InvalidArgument.field(field, limits.ENVIRONMENT.rule)
    return value


@dataclass(frozen=True)
class Run:
    """A pipeline run. Times are POSIX seconds (float)."""

    run_id: str
    pipeline: PipelineRef
    state: RunState
    create_time: float
    deadline: float
    triggered_via: str
    permission_ceiling: PermissionSet
    on_behalf_of: Person | None = None
    inputs: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    lease_seconds: float | None = None
    lease_expire_time: float | None = None
    parent_run_id: str = ""
    actor_chain: tuple[str, ...] = ()
    end_time: float | None = None
    end_reason: str = ""
    ended_by: str = ""
    ids: PipelineIds = NO_IDS
    environment: str = ""

    @property
    def is_active(self) -> bool:
        return self.state is RunState.ACTIVE

    def lapsed_at(self) -> float:
        """When the run expires if nothing happens: its deadline or its lease, whichever first."""
        if self.lease_expire_time is None:
            return self.deadline
        return min(self.deadline, self.lease_expire_time)

    def expiry_reason(self) -> ExpiryReason:
        """Which of the two `lapsed_at` is: the lease, when it runs out before the deadline."""
        if self.lease_expire_time is not None and self.lease_expire_time < self.deadline:
            return ExpiryReason.LEASE_LAPSED
        return ExpiryReason.DEADLINE_PASSED

    def as_of(self, now: float) -> Run:
        """The run as it stands at `now`: an active run past its deadline or lease *is*
        expired, whether or not the reaper has recorded it yet.

        Every answer about a run — GetRun, ListRuns, VerifyToken, IssueToken, RenewRun,
        RevokeRun — reads it through here, so none can call a lapsed run active in the
        moments before the reaper commits its expiry (which records the same end time
        and reason)."""
        if self.state is not RunState.ACTIVE or now < self.lapsed_at():
            return self
        return self.ended(RunState.EXPIRED, self.lapsed_at(), self.expiry_reason().value, "")

    def ended(self, state: RunState, at: float, reason: str, by: str) -> Run:
        return replace(self, state=state, end_time=at, end_reason=reason, ended_by=by)

    def root_account(self) -> str:
        """The service account that started this run's chain: itself for a run started by an
        account, the first actor for delegated runs and their child runs."""
        return self.actor_chain[0] if self.actor_chain else self.triggered_via

    def subject(self) -> str:
        """The `sub` of this run's tokens."""
        return f"run:{self.pipeline}:{self.run_id}"


def attribution(run: Run) -> tuple[str, str, str]:
    """(executed_by, triggered_via, one-line summary) for display.

    The stored identity is the person's subject + issuer; the email is shown when known.
    Every part is passed through `limits.printable` (inputs were checked on the way in; this
    is defence in depth): no field can add a line or a forged "Executed by" to the summary.
    """
    person = run.on_behalf_of
    via = limits.printable(run.triggered_via)
    if person is None:
        return via, via, f"Executed by: {via}"
    if person.method is VerificationMethod.IDP_VERIFIED:
        how = f"verified by {limits.printable(person.issuer)}"
    else:
        how = f"asserted by {via}, not verified"
    executed_by = limits.printable(person.label())
    summary = f"Executed by: {executed_by} ({how}) · Triggered via: {via}"
    return executed_by, via, summary


def validate_inputs(inputs: Mapping[str, str], field: str = "inputs") -> Mapping[str, str]:
    violations = []
    if len(inputs) > MAX_INPUTS:
        violations.append(FieldViolation(field, f"at most {MAX_INPUTS} entries"))
    size = 0
    for key, value in inputs.items():
        size += len(key.encode(errors="replace")) + len(value.encode(errors="replace"))
        where = f"{field}[{limits.shown(key, 32)!r}]"
        if limits.INPUT_KEY.problem(key) is not None or not key:
            violations.append(FieldViolation(where, f"keys: {limits.INPUT_KEY.rule}"))
        elif limits.INPUT_VALUE.problem(value) is not None:
            violations.append(FieldViolation(where, f"values: {limits.INPUT_VALUE.rule}"))
    if size > MAX_INPUTS_BYTES:
        violations.append(
            FieldViolation(field, f"keys and values together at most {MAX_INPUTS_BYTES} bytes")
        )
    if violations:
        raise InvalidArgument(violations)
    return MappingProxyType(dict(sorted(inputs.items())))
