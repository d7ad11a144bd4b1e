"""Runs: the unit a token belongs to. A run is active until it is ended or expires;
its state is the one thing every token check consults."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from broker.errors import FieldViolation, InvalidArgument
from broker.identity import Person, VerificationMethod
from broker.runs.permissions import PermissionSet

SEGMENT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_INPUTS = 64
MAX_INPUT_KEY = 128
MAX_INPUT_VALUE = 4096
MAX_REASON = 512


class RunState(enum.Enum):
    """Stored as its value; never renumber."""

    ACTIVE = "active"
    ENDED = "ended"
    EXPIRED = "expired"


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

    @property
    def is_active(self) -> bool:
        return self.state is RunState.ACTIVE

    def lapsed_at(self) -> float:
        """When the run expires if nothing happens: its deadline or its lease, whichever first."""
        if self.lease_expire_time is None:
            return self.deadline
        return min(self.deadline, self.lease_expire_time)

    def ended(self, state: RunState, at: float, reason: str, by: str) -> Run:
        return replace(self, state=state, end_time=at, end_reason=reason, ended_by=by)

    def subject(self) -> str:
        """The `sub` of this run's tokens."""
        return f"run:{self.pipeline}:{self.run_id}"


def attribution(run: Run) -> tuple[str, str, str]:
    """(executed_by, triggered_via, one-line summary) for display.

    The stored identity is the person's subject + issuer; the email is shown when known.
    """
    person = run.on_behalf_of
    if person is None:
        return run.triggered_via, run.triggered_via, f"Executed by: {run.triggered_via}"
    if person.method is VerificationMethod.IDP_VERIFIED:
        how = f"verified by {person.issuer}"
    else:
        how = f"asserted by {run.triggered_via}, not verified"
    executed_by = person.label()
    summary = f"Executed by: {executed_by} ({how}) · Triggered via: {run.triggered_via}"
    return executed_by, run.triggered_via, summary


def validate_inputs(inputs: Mapping[str, str], field: str = "inputs") -> Mapping[str, str]:
    violations = []
    if len(inputs) > MAX_INPUTS:
        violations.append(FieldViolation(field, f"at most {MAX_INPUTS} entries"))
    for key, value in inputs.items():
        if not key or len(key) > MAX_INPUT_KEY:
            violations.append(
                FieldViolation(f"{field}[{key[:32]!r}]", f"keys must be 1-{MAX_INPUT_KEY} chars")
            )
        elif len(value) > MAX_INPUT_VALUE:
            violations.append(
                FieldViolation(
                    f"{field}[{key!r}]", f"values must be at most {MAX_INPUT_VALUE} chars"
                )
            )
    if violations:
        raise InvalidArgument(violations)
    return MappingProxyType(dict(sorted(inputs.items())))
