"""Pre-filling a broker's SQLite file with history, before the broker starts.

The growth figures compare a broker holding 10^3 stored events with one holding 10^6. The
history is written straight into the file in large transactions (minutes of RPCs otherwise):
runs that ended two days ago, each with its `run.started`, `token.issued` and `run.ended`
events, sealed into one valid hash chain exactly as the store seals them, with the Merkle
tree's nodes as the store writes them, so that `token-broker audit verify` still passes on
the result and the broker starts without building a tree.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

from broker.audit import events as audit
from broker.audit.events import Action, AuditDraft, Outcome
from broker.audit.merkle import Frontier, Node
from broker.bench.accounts import ORCHESTRATOR, ORG
from broker.ids import new_run_id, new_token_id
from broker.runs.model import PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from broker.store.codec import RUN_COLUMNS, run_to_row
from broker.store.sqlite import DB_FILENAME, migrate

TOKENS_PER_RUN = 98  # with run.started and run.ended: 100 events per run
BATCH = 20_000
AGE = 2 * 86400.0  # long enough ago that no token of these runs can be unexpired


def _runs(count_events: int, start: float) -> Iterator[tuple[Run, list[AuditDraft]]]:
    pipeline = PipelineRef(ORG, "history", "deploy")
    ceiling = PermissionSet.of({"artifacts": "write"})
    written = 0
    now = start
    while written < count_events:
        tokens = min(TOKENS_PER_RUN, max(count_events - written - 2, 0))
        run = Run(
            run_id=new_run_id(),
            pipeline=pipeline,
            state=RunState.ENDED,
            create_time=now,
            deadline=now + 3600,
            triggered_via=ORCHESTRATOR.name,
            permission_ceiling=ceiling,
            end_time=now + 60,
            end_reason="finished",
            ended_by=ORCHESTRATOR.name,
        )
        drafts = [_draft(run, now, Action.RUN_STARTED, {"deadline_us": round(run.deadline * 1e6)})]
        for i in range(tokens):
            details = {
                "jti": new_token_id(),
                "aud": "api.example.com",
                "permissions": {"artifacts": "write"},
                "exp_us": round((now + 600) * 1e6),
                "step": f"step-{i}",
                "kid": "history",
            }
            drafts.append(_draft(run, now + i * 0.5, Action.TOKEN_ISSUED, details))
        drafts.append(_draft(run, now + 60, Action.RUN_ENDED, {"reason": "finished"}))
        yield run, drafts[: count_events - written]
        written += len(drafts)
        now += 0.01


def _draft(run: Run, at: float, action: str, details: dict[str, object]) -> AuditDraft:
    return AuditDraft(
        time=at,
        action=action,
        outcome=Outcome.SUCCESS,
        principal=ORCHESTRATOR.name,
        run_id=run.run_id,
        pipeline=run.pipeline,
        details=MappingProxyType(details),
    )


def prefill(data_dir: Path, events: int) -> float:
    """Create the broker's database in `data_dir` holding `events` audit events (and the runs
    they belong to); return the seconds it took."""
    began = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        migrate(conn)
        _write(conn, events)
    finally:
        conn.close()
    return time.perf_counter() - began


def _write(conn: sqlite3.Connection, events: int) -> None:
    sequence, head = 0, audit.GENESIS_HASH
    frontier = Frontier(0, [])
    run_rows: list[tuple[object, ...]] = []
    event_rows: list[tuple[object, ...]] = []
    nodes: list[Node] = []
    placeholders = ", ".join("?" * len(RUN_COLUMNS.split(",")))
    for run, drafts in _runs(events, time.time() - AGE):
        run_rows.append(run_to_row(run))
        for d in drafts:
            sequence += 1
            event, body = audit.seal_with_record(d, sequence, head)
            event_rows.append(
                (
                    sequence,
                    body.decode(),
                    head,
                    event.hash,
                    d.action,
                    d.run_id,
                    d.principal,
                    audit.time_us(d.time),
                )
            )
            nodes.extend(frontier.append(body))
            head = event.hash
        if len(event_rows) >= BATCH:
            _flush(conn, placeholders, run_rows, event_rows, nodes)
    _flush(conn, placeholders, run_rows, event_rows, nodes)


def _flush(
    conn: sqlite3.Connection,
    placeholders: str,
    run_rows: list[tuple[object, ...]],
    event_rows: list[tuple[object, ...]],
    nodes: list[Node],
) -> None:
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({placeholders})", run_rows)  # noqa: S608
    conn.executemany(
        "INSERT INTO audit_events (sequence, record, prev_hash, hash, action, run_id, "
        "principal, time_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        event_rows,
    )
    conn.executemany("INSERT INTO audit_tree (level, idx, hash) VALUES (?, ?, ?)", nodes)
    conn.execute("COMMIT")
    run_rows.clear()
    event_rows.clear()
    nodes.clear()
