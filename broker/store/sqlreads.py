"""The reads both SQL stores share, in the SQL both speak (`Dialect` gives the placeholder;
it and the column lists are the only text interpolated into the queries).

A backend supplies `_query(sql, params) -> rows` and its dialect; what differs stays in the
backend: how it knows its head, and how it reads raw rows for verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from broker.audit.events import AuditEvent
from broker.audit.merkle import NodeId
from broker.runs.model import Run
from broker.store import CheckpointRecord, CosignatureRecord, PublicKeyRecord, RunQuery, treerows
from broker.store.codec import (
    CHECKPOINT_COLUMNS,
    RUN_COLUMNS,
    Dialect,
    event_from_row,
    recorded_event_from_row,
    run_filter,
    run_from_row,
)


class SqlReads:
    dialect: ClassVar[Dialect]

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        raise NotImplementedError

    def head_sequence(self) -> int:
        raise NotImplementedError

    def _keeps_checkpoints(self) -> bool:
        """False only for an old schema opened read-only (no checkpoint table yet)."""
        return True

    def _keeps_key_schedule(self) -> bool:
        """False only for an old schema opened read-only (keys without activation times)."""
        return True

    def _keeps_tree(self) -> bool:
        """False only for an old schema opened read-only (no audit tree yet)."""
        return True

    def tree_nodes(self, ids: Sequence[NodeId]) -> dict[NodeId, bytes]:
        if not self._keeps_tree():
            return {}
        return treerows.read_nodes(self._query, self.dialect, ids)

    def _keeps_cosignatures(self) -> bool:
        """False only for an old schema opened read-only (no cosignature table yet)."""
        return True

    def cosignatures(self, tree_size: int) -> list[CosignatureRecord]:
        if not self._keeps_cosignatures():
            return []
        m = self.dialect.mark
        sql = f"SELECT tree_size, root, witness, line FROM audit_cosignatures WHERE tree_size={m}"  # noqa: S608
        rows = self._query(sql + " ORDER BY witness", (tree_size,))
        return [CosignatureRecord(int(r[0]), bytes(r[1]), str(r[2]), str(r[3])) for r in rows]

    def tree_base(self) -> int:
        return treerows.tree_base(self._query) if self._keeps_tree() else 0

    def get_run(self, run_id: str) -> Run | None:
        m = self.dialect.mark
        rows = self._query(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id={m}", (run_id,))  # noqa: S608
        return run_from_row(rows[0]) if rows else None

    def find_idempotent_run(self, scope: str, key: str) -> tuple[str, str] | None:
        m = self.dialect.mark
        rows = self._query(
            f"SELECT run_id, fingerprint FROM idempotency_keys WHERE scope={m} AND key={m}",  # noqa: S608
            (scope, key),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def list_runs(self, query: RunQuery) -> list[Run]:
        clauses, params = run_filter(query, self.dialect)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {RUN_COLUMNS} FROM runs {where} "  # noqa: S608
            f"ORDER BY create_time DESC, run_id DESC LIMIT {self.dialect.mark}"
        )
        return [run_from_row(row) for row in self._query(sql, (*params, query.limit))]

    def live_runs(self, ended_since: float) -> list[Run]:
        rows = self._query(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE state='active' "  # noqa: S608
            f"UNION ALL SELECT {RUN_COLUMNS} FROM runs "
            f"WHERE state<>'active' AND end_time>={self.dialect.mark}",
            (ended_since,),
        )
        return [run_from_row(row) for row in rows]

    def read_events(self, after: int, limit: int) -> list[AuditEvent]:
        return [event_from_row(*row) for row in self._event_rows(after, limit)]

    def stream_events(self, after: int, limit: int) -> list[AuditEvent]:
        return [recorded_event_from_row(*row) for row in self._event_rows(after, limit)]

    def _event_rows(self, after: int, limit: int) -> list[Any]:
        m = self.dialect.mark
        return self._query(
            f"SELECT record, prev_hash, hash FROM audit_events WHERE sequence>{m} "  # noqa: S608
            f"ORDER BY sequence LIMIT {m}",
            (after, limit),
        )

    def oldest_sequence(self) -> int:
        row = self._query("SELECT MIN(sequence) FROM audit_events")[0]
        return int(row[0]) if row[0] is not None else self.head_sequence() + 1

    def public_keys(self) -> list[PublicKeyRecord]:
        # Before the schedule columns (an old store read offline) every key signed from its
        # creation, and a retiring one had stopped: what migration 0004 fills in.
        schedule = (
            "activate_time, stop_signing_time"
            if self._keeps_key_schedule()
            else "create_time, CASE WHEN retire_time IS NULL THEN NULL ELSE create_time END"
        )
        rows = self._query(
            f"SELECT kid, alg, public_jwk, create_time, retire_time, {schedule} "  # noqa: S608
            "FROM signing_keys "
            "ORDER BY create_time DESC"
        )
        return [PublicKeyRecord(*row) for row in rows]

    def latest_checkpoint(self, at_most: int | None = None) -> CheckpointRecord | None:
        if not self._keeps_checkpoints():
            return None
        bound = (1 << 62) if at_most is None else at_most
        rows = self._query(
            f"SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints "  # noqa: S608
            f"WHERE sequence<={self.dialect.mark} ORDER BY sequence DESC LIMIT 1",
            (bound,),
        )
        return _checkpoint(rows[0]) if rows else None

    def checkpoints(self, after: int, limit: int) -> list[CheckpointRecord]:
        if not self._keeps_checkpoints():
            return []
        m = self.dialect.mark
        rows = self._query(
            f"SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE sequence>{m} "  # noqa: S608
            f"ORDER BY sequence LIMIT {m}",
            (after, limit),
        )
        return [_checkpoint(row) for row in rows]

    def pruned_through(self) -> int:
        return int(self._query("SELECT pruned_through FROM audit_retention WHERE id=1")[0][0])

    def first_sequence_since(self, time: float) -> int | None:
        row = self._query(
            f"SELECT MIN(sequence) FROM audit_events WHERE time_us>={self.dialect.mark}",  # noqa: S608
            (round(time * 1_000_000),),
        )[0]
        return None if row[0] is None else int(row[0])


def _checkpoint(row: tuple[Any, ...]) -> CheckpointRecord:
    sequence, hash_, time_, kid, jws, prev = row
    return CheckpointRecord(int(sequence), hash_, time_, kid, jws, int(prev))
