"""Runs and events to and from plain rows (JSON-able dicts), shared by the SQL backends."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from types import MappingProxyType
from typing import Any

import orjson

from broker.audit.events import AuditEvent, RecordedEvent, from_record
from broker.identity import Person
from broker.runs.model import PipelineIds, PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from broker.store import RunQuery


def person_to_json(person: Person | None) -> str | None:
    return None if person is None else json.dumps(person.as_record(), sort_keys=True)


def person_from_json(text: str | None) -> Person | None:
    return None if text is None else Person.from_record(json.loads(text))


CHECKPOINT_COLUMNS = "sequence, hash, time, kid, jws, prev_sequence"
EVENT_COLUMNS = "sequence, record, prev_hash, hash, action, run_id, principal, time_us"

RUN_COLUMNS = (
    "run_id, org, project, pipeline, state, create_time, deadline, triggered_via, on_behalf_of, "
    "permission_ceiling, inputs, lease_seconds, lease_expire_time, parent_run_id, actor_chain, "
    "end_time, end_reason, ended_by, attributes"
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
        attributes_to_json(run),
    )


def attributes_to_json(run: Run) -> str:
    """The run's optional attributes (immutable ids, environment) as one JSON object; only
    those that are set, so a run without them stores '{}' like the rows before them."""
    data: dict[str, str] = run.ids.as_dict()
    if run.environment:
        data["environment"] = run.environment
    return json.dumps(data, sort_keys=True)


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
        attributes,
    ) = tuple(row)
    extra = json.loads(attributes)
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
        ids=PipelineIds(
            extra.get("org_id", ""), extra.get("project_id", ""), extra.get("pipeline_id", "")
        ),
        environment=extra.get("environment", ""),
    )


def event_from_row(record: str, prev_hash: str, hash_: str) -> AuditEvent:
    data = _json_record(record)
    return AuditEvent(data["sequence"], from_record(data), prev_hash, hash_)


def recorded_event_from_row(record: str, prev_hash: str, hash_: str) -> RecordedEvent:
    """The event of a row, its draft rebuilt only when first used."""
    return RecordedEvent(_json_record(record), prev_hash, hash_)


def _json_record(text: str) -> Any:
    """json.loads(text), by orjson where it can (a stored record parses ~3× faster, the
    largest cost of reading events for a stream). Anything orjson refuses — numbers out of its
    range, lone surrogates, whatever is not JSON — goes to json.loads, which parses or refuses
    it as always: the value is json.loads', whichever parses it."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


@dataclass(frozen=True)
class Dialect:
    """What differs between the SQL backends in the SQL they share."""

    mark: str  # the driver's placeholder
    least: str  # the scalar minimum of two values


SQLITE = Dialect(mark="?", least="MIN")
POSTGRESQL = Dialect(mark="%s", least="LEAST")


def run_filter(query: RunQuery, dialect: Dialect) -> tuple[list[str], list[Any]]:
    """WHERE clauses and their parameters for a run query."""
    mark = dialect.mark
    # When an active run lapses (Run.lapsed_at, Run.as_of): its lease or deadline, whichever
    # first, whether or not the reaper has recorded its expiry yet.
    lapse = f"{dialect.least}(deadline, COALESCE(lease_expire_time, deadline))"
    state_as_of = {
        RunState.ACTIVE: f"(state='active' AND {lapse} > {mark})",
        RunState.EXPIRED: f"(state='expired' OR (state='active' AND {lapse} <= {mark}))",
    }
    clauses: list[str] = []
    params: list[Any] = []
    for column in ("org", "project", "pipeline"):
        value = getattr(query, column)
        if value:
            clauses.append(f"{column}={mark}")
            params.append(value)
    if query.state in state_as_of and query.as_of is not None:
        clauses.append(state_as_of[query.state])
        params.append(query.as_of)
    elif query.state is not None:
        clauses.append(f"state={mark}")
        params.append(query.state.value)
    if query.before is not None:
        clauses.append(f"(create_time < {mark} OR (create_time = {mark} AND run_id < {mark}))")
        params.extend([query.before[0], query.before[0], query.before[1]])
    return clauses, params


def descendants_query(dialect: Dialect) -> str:
    """Every active run below one (parameter: its run id), nearest first: a recursive walk
    of parent_run_id, through ended runs too."""
    columns = ", ".join("runs." + c.strip() for c in RUN_COLUMNS.split(","))
    return f"""
WITH RECURSIVE below(run_id, depth) AS (
    SELECT run_id, 1 FROM runs WHERE parent_run_id = {dialect.mark}
    UNION ALL
    SELECT runs.run_id, below.depth + 1 FROM runs JOIN below ON runs.parent_run_id = below.run_id
)
SELECT {columns}
FROM runs JOIN below ON runs.run_id = below.run_id
WHERE runs.state = 'active'
ORDER BY below.depth, runs.create_time, runs.run_id
"""  # noqa: S608


def live_parent_query(dialect: Dialect) -> str:
    """A row when the parent (parameters: its run id, then the child's create time twice) is
    active and neither past its deadline nor its lease at that time."""
    mark = dialect.mark
    return (
        f"SELECT 1 FROM runs WHERE run_id={mark} AND state='active' AND deadline>{mark} "  # noqa: S608
        f"AND (lease_expire_time IS NULL OR lease_expire_time>{mark})"
    )


@dataclass(frozen=True)
class Table:
    """A table both SQL backends keep alike, copied row by row by `store migrate`."""

    name: str
    columns: str
    order: str


# In the order a copy loads them: runs before the keys that name them, checkpoints before
# the retention boundary that must sit on one.
TABLES = (
    Table(
        "signing_keys",
        "kid, alg, public_jwk, create_time, retire_time, activate_time, stop_signing_time",
        "kid",
    ),
    Table("runs", "", "create_time, run_id"),
    Table("idempotency_keys", "scope, key, run_id, fingerprint", "scope, key"),
    Table("audit_checkpoints", CHECKPOINT_COLUMNS, "sequence"),
    Table("audit_events", EVENT_COLUMNS, "sequence"),
    Table("audit_tree", "level, idx, hash", "level, idx"),
    # Witnesses' cosignatures: a copy keeps the heads that were final final. (DPoP proofs seen
    # are not copied: they matter for a minute, and a copy is made with the brokers stopped.)
    Table("audit_cosignatures", "tree_size, root, witness, line", "tree_size, witness"),
)


def columns_of(table: Table) -> str:
    return table.columns or RUN_COLUMNS


def numbered_migrations(backend: str, folder: Traversable | None = None) -> list[tuple[int, str]]:
    """(version, sql) of every file in broker/store/migrations/<backend>, in order, numbered
    1..N without a gap or a repeat: two branches that both add "0004_…" would otherwise apply
    one of them and silently skip the other on every store that already reached 4."""
    if folder is None:
        folder = resources.files("broker.store").joinpath("migrations", backend)
    found = sorted(
        (int(entry.name.split("_", 1)[0]), entry.name, entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        names = ", ".join(name for _, name, _ in found)
        raise RuntimeError(f"{backend} migrations must be numbered 1..N once each: {names}")
    return [(version, sql) for version, _, sql in found]
