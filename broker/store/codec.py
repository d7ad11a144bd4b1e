"""Runs and events to and from plain rows (JSON-able dicts), shared by the SQL backends."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from broker.audit.events import AuditEvent, from_record
from broker.identity import Person
from broker.runs.model import PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet


def person_to_json(person: Person | None) -> str | None:
    return None if person is None else json.dumps(person.as_record(), sort_keys=True)


def person_from_json(text: str | None) -> Person | None:
    return None if text is None else Person.from_record(json.loads(text))


RUN_COLUMNS = (
    "run_id, org, project, pipeline, state, create_time, deadline, triggered_via, on_behalf_of, "
    "permission_ceiling, inputs, lease_seconds, lease_expire_time, parent_run_id, actor_chain, "
    "end_time, end_reason, ended_by"
)


def run_to_row(run: Run) -> tuple[Any, ...]:
    return (
        run.run_id,
        run.pipeline.org,
        run.pipeline.project,
        run.pipeline.pipeline,
        run.state.value,
        run.create_time,
        run.deadline,
        run.triggered_via,
        person_to_json(run.on_behalf_of),
        json.dumps(run.permission_ceiling.as_dict(), sort_keys=True),
        json.dumps(dict(run.inputs), sort_keys=True),
        run.lease_seconds,
        run.lease_expire_time,
        run.parent_run_id,
        json.dumps(list(run.actor_chain)),
        run.end_time,
        run.end_reason,
        run.ended_by,
    )


def run_from_row(row: tuple[Any, ...] | Mapping[str, Any]) -> Run:
    (
        run_id,
        org,
        project,
        pipeline,
        state,
        create_time,
        deadline,
        triggered_via,
        on_behalf_of,
        ceiling,
        inputs,
        lease_seconds,
        lease_expire_time,
        parent_run_id,
        actor_chain,
        end_time,
        end_reason,
        ended_by,
    ) = tuple(row)
    return Run(
        run_id=run_id,
        pipeline=PipelineRef(org, project, pipeline),
        state=RunState(state),
        create_time=create_time,
        deadline=deadline,
        triggered_via=triggered_via,
        on_behalf_of=person_from_json(on_behalf_of),
        permission_ceiling=PermissionSet.of(json.loads(ceiling)),
        inputs=MappingProxyType(json.loads(inputs)),
        lease_seconds=lease_seconds,
        lease_expire_time=lease_expire_time,
        parent_run_id=parent_run_id,
        actor_chain=tuple(json.loads(actor_chain)),
        end_time=end_time,
        end_reason=end_reason,
        ended_by=ended_by,
    )


def event_from_row(record: str, prev_hash: str, hash_: str) -> AuditEvent:
    data = json.loads(record)
    return AuditEvent(data["sequence"], from_record(data), prev_hash, hash_)
