"""PostgreSQL backend: several broker replicas on one database.

Writes go through one writer connection per process in *group commits*, as in the SQLite
store: every write queued while the previous transaction was committing shares the next
transaction, each in its own savepoint. Every write transaction first locks the chain's head
row (`audit_head ... FOR UPDATE`), so appends from all replicas are serialised by the database
and the global sequence stays gapless; the head is read inside that transaction, never cached.
The commit sends `NOTIFY tokenbroker_audit` with the new head, which wakes followers in every
replica at once (`wait_for_events`); a follower still reads by sequence after every wake-up, so
a lost notification delays a change but never drops it.

Readers share a small connection pool (psycopg_pool).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from broker.audit import events as audit
from broker.audit.merkle import Frontier, MissingNodes, Node
from broker.runs.model import Run
from broker.store import (
    CheckpointConflict,
    CheckpointRecord,
    CommitListener,
    Committed,
    Conflict,
    CreateRun,
    EndRun,
    ForgetIdempotencyKeys,
    IdempotencyKeyTaken,
    Mutation,
    NewerSchema,
    ParentNotActive,
    ProofReplayed,
    PruneAudit,
    PruneConflict,
    PublishKey,
    RecordCheckpoint,
    RecordCosignature,
    RecordProof,
    RenewLease,
    RetireKey,
    RunNotActive,
    StoredEvent,
    StoreNotFound,
    StoreRefused,
    StoreUnavailable,
    StoreUrlInvalid,
    UnknownRun,
    Write,
    descendant_end,
    treerows,
)
from broker.store.codec import (
    CHECKPOINT_COLUMNS,
    POSTGRESQL,
    RUN_COLUMNS,
    Table,
    columns_of,
    descendants_query,
    live_parent_query,
    numbered_migrations,
    run_from_row,
    run_to_row,
)
from broker.store.factory import OpenOptions, StoreUrl
from broker.store.groupcommit import Pending, WriteQueue
from broker.store.sqlreads import SqlReads

log = logging.getLogger(__name__)

CHANNEL = "tokenbroker_audit"
# One key for the advisory lock that serialises migrations of replicas starting together.
_MIGRATION_LOCK = 0x746F6B656E62
_RUN_PLACEHOLDERS = ", ".join(["%s"] * len(RUN_COLUMNS.split(",")))


def migrations() -> list[tuple[int, str]]:
    """(version, sql) for every migration in broker/store/migrations/postgresql, in order."""
    return numbered_migrations("postgresql")


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Apply pending migrations (each in its own transaction, under an advisory lock so that
    replicas starting together migrate once); return the schema version."""
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = check_version(conn)
        known = migrations()
        for version, text in known:
            if version <= current:
                continue
            log.info("applying schema migration", extra={"version": version})
            with conn.transaction():
                conn.execute(text.encode())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            current = version
        return current
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def check_version(conn: psycopg.Connection[Any]) -> int:
    """The schema version (0 for an empty database); NewerSchema if this broker is older."""
    exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
    if exists is None or exists[0] is None:
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    current = int(row[0]) if row else 0
    known = migrations()
    newest = known[-1][0] if known else 0
    if current > newest:
        # An older broker must never write to a schema it does not know (a rollback).
        raise NewerSchema(
            f"the database schema is version {current}, newer than this broker knows "
            f"({newest}): upgrade the broker, or restore a backup taken before the upgrade"
        )
    return current


def check_url(url: StoreUrl) -> None:
    if not url.location.startswith("//"):
        raise StoreUrlInvalid(
            f"store {str(url)!r}: a PostgreSQL store is a libpq URL, "
            "postgresql://USER@HOST[:PORT]/DATABASE[?sslmode=...]"
        )
    try:
        psycopg.conninfo.conninfo_to_dict(str(url))
    except psycopg.ProgrammingError as exc:
        raise StoreUrlInvalid(f"store URL is not a valid libpq URL: {_first_line(exc)}") from None


def open_url(url: StoreUrl, options: OpenOptions) -> PostgresStore:
    """Open the store; StoreRefused (nothing changed) when the database cannot be reached or
    its schema is newer than this broker knows. Read-only: never migrates nor writes."""
    try:
        return PostgresStore(str(url), read_only=options.read_only)
    except StoreUnavailable as exc:
        raise StoreRefused(str(exc)) from exc


class PostgresStore(SqlReads):
    """The `Store` on a PostgreSQL database named by a libpq URL (postgresql://…)."""

    dialect = POSTGRESQL

    def __init__(self, dsn: str, pool_size: int = 8, *, read_only: bool = False) -> None:
        """`read_only` (offline tools): no migration, no writer, every session read-only."""
        self.dsn = dsn
        self.read_only = read_only
        session = "-c default_transaction_read_only=on" if read_only else ""
        try:
            self._writer: psycopg.Connection[Any] = psycopg.connect(
                dsn, autocommit=True, options=session
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot open the PostgreSQL store: {_first_line(exc)}") from exc
        try:
            self.schema_version = (
                check_version(self._writer) if read_only else migrate(self._writer)
            )
            if read_only and self.schema_version == 0:
                raise StoreNotFound(f"{_safe(dsn)}: holds no token-broker store")
            self._pool = ConnectionPool(
                dsn,
                min_size=1,
                max_size=pool_size,
                kwargs={"autocommit": True, "options": session},
                open=True,
                name="tokenbroker-readers",
            )
        except psycopg.Error as exc:
            self._writer.close()
            raise StoreUnavailable(f"cannot open the PostgreSQL store: {_first_line(exc)}") from exc
        except BaseException:
            self._writer.close()
            raise
        self._tree = treerows.FrontierCache()
        self._frontier = Frontier(0, [])
        if not read_only:
            try:
                self._build_tree()
            except psycopg.Error as exc:
                self.close_connections()
                raise StoreUnavailable(f"cannot build the audit tree: {_first_line(exc)}") from exc
        self._listeners: list[CommitListener] = []
        self._writes = WriteQueue(self._apply_batch, "pg-writer")
        self._closed = False
        self._notified = threading.Condition()
        self._notified_head = 0
        self._listener = threading.Thread(target=self._listen_loop, name="pg-listen", daemon=True)
        if not read_only:
            self._writes.start()
            self._listener.start()

    # -- writes --------------------------------------------------------------------------

    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def commit(self, write: Write) -> Committed:
        if self._closed or self.read_only:
            raise StoreUnavailable("store is closed" if self._closed else "store is read-only")
        return self._writes.submit(write)

    def _writer_connection(self) -> psycopg.Connection[Any]:
        if self._writer.closed or self._writer.broken:
            self._writer = psycopg.connect(self.dsn, autocommit=True)
        return self._writer

    def _apply_batch(self, batch: list[Pending]) -> None:
        outcomes: list[tuple[Pending, Committed | BaseException]] = []
        try:
            conn = self._writer_connection()
            with conn.transaction():
                head = _lock_head(conn)
                self._frontier = self._tree.frontier(
                    head, self._tree_base, _executor(conn), POSTGRESQL
                )
                for pending in batch:
                    write_frontier = self._frontier.copy()
                    try:
                        with conn.transaction():  # a savepoint: one conflict undoes one write
                            committed, head = self._apply(conn, pending.write, head)
                        outcomes.append((pending, committed))
                    except (Conflict, psycopg.errors.IntegrityError) as refused:
                        self._frontier = write_frontier
                        conflict = (
                            refused
                            if isinstance(refused, Conflict)
                            else Conflict(_first_line(refused))
                        )
                        outcomes.append((pending, conflict))
                conn.execute(
                    "UPDATE audit_head SET sequence=%s, hash=%s WHERE id=1", (head[0], head[1])
                )
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(head[0])))
            self._tree.keep(head, self._frontier)
        except (psycopg.Error, MissingNodes) as exc:
            self._tree.forget()
            log.error(
                "storage write failed", extra={"error": _first_line(exc), "writes": len(batch)}
            )
            failure = StoreUnavailable(f"storage refused the write: {_first_line(exc)}")
            for pending in batch:
                pending.settle(failure)
            return
        for pending, outcome in outcomes:
            if not isinstance(outcome, BaseException):
                self._notify(outcome, pending.write.mutation)
            pending.settle(outcome)

    def _notify(self, committed: Committed, mutation: Mutation | None) -> None:
        for listener in self._listeners:
            try:
                listener(committed, mutation)
            except Exception:
                log.exception("commit listener failed")

    def _apply(
        self, conn: psycopg.Connection[Any], write: Write, head: tuple[int, str]
    ) -> tuple[Committed, tuple[int, str]]:
        run = _apply_mutation(conn, write.mutation) if write.mutation else None
        cascaded: list[Run] = []
        drafts = list(write.events)
        if isinstance(write.mutation, EndRun):
            # Under the head lock every replica's writes are serialised, so a child created
            # concurrently is either found here or refused by its parent check.
            rows = conn.execute(descendants_query(POSTGRESQL).encode(), (write.mutation.run_id,))
            for descendant in [run_from_row(row) for row in rows.fetchall()]:
                ended, draft = descendant_end(write.mutation, descendant)
                _end_run(conn, ended)
                cascaded.append(ended)
                drafts.append(draft)
        events = []
        nodes: list[Node] = []
        for draft in drafts:
            sequence = head[0] + 1
            event, body = audit.seal_with_record(draft, sequence, head[1])
            conn.execute(
                "INSERT INTO audit_events (sequence, record, prev_hash, hash, action, run_id, "
                "principal, time_us) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    sequence,
                    body.decode(),
                    event.prev_hash,
                    event.hash,
                    draft.action,
                    draft.run_id,
                    draft.principal,
                    audit.time_us(draft.time),
                ),
            )
            nodes.extend(self._frontier.append(body))
            head = (sequence, event.hash)
            events.append(event)
        with conn.cursor() as cursor:
            cursor.executemany(treerows.insert_sql(POSTGRESQL).encode(), nodes)
        return Committed(run, events, tuple(cascaded)), head

    def _build_tree(self, page: int = 5000) -> None:
        """Append to the tree every event it lacks (a store from before the tree), a page per
        transaction under the head lock, so replicas starting together build it once."""
        conn = self._writer
        built = 0
        while True:
            with conn.transaction():
                _lock_head(conn)
                frontier, rows = treerows.missing_events(_executor(conn), POSTGRESQL, page)
                nodes = treerows.append_rows(frontier, rows)
                with conn.cursor() as cursor:
                    cursor.executemany(treerows.insert_sql(POSTGRESQL).encode(), nodes)
            if not rows:
                break
            built += len(rows)
            treerows.log_progress(built, built)
        self._tree_base = treerows.tree_base(_executor(conn))

    # -- following -----------------------------------------------------------------------

    def wait_for_events(self, after: int, timeout: float) -> int:
        with self._notified:
            if self._notified_head <= after:
                self._notified.wait(timeout)
            if self._notified_head > after:
                return self._notified_head
        # Woken without news, or timed out: read the head itself, so a lost notification
        # (or a listener reconnecting) delays a change by at most one wait, never drops it.
        return self.head_sequence()

    def _listen_loop(self) -> None:
        while not self._closed:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    self._heard(_head_of(conn))  # anything committed before LISTEN took hold
                    while not self._closed:
                        for notice in conn.notifies(timeout=1.0):
                            self._heard(int(notice.payload))
            except (psycopg.Error, ValueError) as exc:
                if not self._closed:
                    log.warning(
                        "LISTEN connection lost; reconnecting", extra={"error": _first_line(exc)}
                    )
                    time.sleep(0.5)

    def _heard(self, sequence: int) -> None:
        with self._notified:
            if sequence > self._notified_head:
                self._notified_head = sequence
            self._notified.notify_all()

    # -- reads ---------------------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StoreUnavailable(f"storage read failed: {_first_line(exc)}") from exc

    def _query(self, text: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._reader() as conn:
            return conn.execute(text.encode(), params).fetchall()

    # -- bulk copy (`token-broker store migrate`) ------------------------------------------

    def table_rows(self, table: Table, batch: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
        """Every row of a table, as stored, in batches (one read snapshot)."""
        sql = f"SELECT {columns_of(table)} FROM {table.name} ORDER BY {table.order}"  # noqa: S608
        with self._reader() as conn, conn.transaction(), conn.cursor(name="copy") as cursor:
            cursor.execute(sql.encode())
            while rows := cursor.fetchmany(batch):
                yield [tuple(row) for row in rows]

    def load_rows(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        """Insert rows as they are (a copy into an empty store; the chain is not re-sealed)."""
        marks = ", ".join(["%s"] * len(columns_of(table).split(",")))
        sql = f"INSERT INTO {table.name} ({columns_of(table)}) VALUES ({marks})"  # noqa: S608
        with self._reader() as conn, conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(sql.encode(), rows)

    def finish_load(self, pruned_through: int, head: tuple[int, str], tree_base: int) -> None:
        """After a copy: the chain's head row, the retention boundary, the tree's start."""
        with self._reader() as conn, conn.transaction():
            conn.execute("UPDATE audit_head SET sequence=%s, hash=%s WHERE id=1", head)
            conn.execute("UPDATE audit_retention SET tree_base=%s WHERE id=1", (tree_base,))
            if pruned_through:
                conn.execute(
                    "UPDATE audit_retention SET pruned_through=%s WHERE id=1", (pruned_through,)
                )
        self._tree_base = tree_base

    def stored_events(self, after: int, limit: int) -> list[StoredEvent]:
        rows = self._query(
            "SELECT sequence, record, prev_hash, hash FROM audit_events WHERE sequence>%s "
            "ORDER BY sequence LIMIT %s",
            (after, limit),
        )
        return [StoredEvent(int(r[0]), json.loads(r[1]), r[2], r[3]) for r in rows]

    def head_sequence(self) -> int:
        with self._reader() as conn:
            return _head_of(conn)

    def close_connections(self) -> None:
        self._pool.close()
        self._writer.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writes.stop()
        if self._listener.is_alive():
            self._listener.join(timeout=5)
        self._pool.close()
        self._writer.close()


def _safe(dsn: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the PostgreSQL store"
    return f"postgresql://{parts.get('user', '')}@{parts.get('host', '')}/{parts.get('dbname', '')}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _as_conflict(refused: Exception) -> Conflict:
    return refused if isinstance(refused, Conflict) else Conflict(_first_line(refused))


def _executor(conn: psycopg.Connection[Any]) -> treerows.Execute:
    def execute(text: str, params: tuple[Any, ...]) -> list[Any]:
        return conn.execute(text.encode(), params).fetchall()

    return execute


def _lock_head(conn: psycopg.Connection[Any]) -> tuple[int, str]:
    row = conn.execute("SELECT sequence, hash FROM audit_head WHERE id=1 FOR UPDATE").fetchone()
    assert row is not None, "audit_head is created by the first migration"
    return int(row[0]), str(row[1])


def _head_of(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT sequence FROM audit_head WHERE id=1").fetchone()
    return int(row[0]) if row else 0


def _apply_mutation(conn: psycopg.Connection[Any], mutation: Mutation) -> Run | None:
    match mutation:
        case CreateRun(run=run, idempotency=claim):
            if run.parent_run_id:
                params = (run.parent_run_id, run.create_time, run.create_time)
                if conn.execute(live_parent_query(POSTGRESQL).encode(), params).fetchone() is None:
                    raise ParentNotActive(run.parent_run_id)
            if claim is not None:
                taken = conn.execute(
                    "SELECT run_id, fingerprint FROM idempotency_keys WHERE scope=%s AND key=%s",
                    (claim.scope, claim.key),
                ).fetchone()
                if taken is not None:
                    raise IdempotencyKeyTaken(taken[0], taken[1])
            conn.execute(
                f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({_RUN_PLACEHOLDERS})".encode(),  # noqa: S608
                run_to_row(run),
            )
            if claim is not None:
                conn.execute(
                    "INSERT INTO idempotency_keys (scope, key, run_id, fingerprint) "
                    "VALUES (%s, %s, %s, %s)",
                    (claim.scope, claim.key, run.run_id, claim.fingerprint),
                )
            return run
        case EndRun():
            cursor = conn.execute(
                "UPDATE runs SET state=%s, end_time=%s, end_reason=%s, ended_by=%s "
                "WHERE run_id=%s AND state='active'",
                (
                    mutation.state.value,
                    mutation.end_time,
                    mutation.reason,
                    mutation.ended_by,
                    mutation.run_id,
                ),
            )
            return _changed_run(conn, cursor.rowcount, mutation.run_id)
        case RenewLease():
            cursor = conn.execute(
                "UPDATE runs SET lease_expire_time=%s WHERE run_id=%s AND state='active'",
                (mutation.lease_expire_time, mutation.run_id),
            )
            return _changed_run(conn, cursor.rowcount, mutation.run_id)
        case PublishKey():
            activate = mutation.activate_time
            conn.execute(
                "INSERT INTO signing_keys (kid, alg, public_jwk, create_time, activate_time) "
                "VALUES (%s, %s, %s, %s, %s)",
                (
                    mutation.kid,
                    mutation.alg,
                    mutation.public_jwk,
                    mutation.create_time,
                    mutation.create_time if activate is None else activate,
                ),
            )
            return None
        case RetireKey():
            for kid in mutation.kids:
                conn.execute(
                    "UPDATE signing_keys SET retire_time=%s, stop_signing_time=%s WHERE kid=%s "
                    "AND (stop_signing_time IS NULL OR stop_signing_time > %s)",
                    (
                        mutation.retire_time,
                        mutation.stop_signing_time,
                        kid,
                        mutation.stop_signing_time,
                    ),
                )
            return None
        case RecordCheckpoint(checkpoint=checkpoint):
            _record_checkpoint(conn, checkpoint)
            return None
        case PruneAudit(through=through):
            _prune_audit(conn, through)
            return None
        case RecordProof():
            seen = conn.execute(
                "SELECT expires FROM dpop_proofs WHERE jkt=%s AND jti=%s FOR UPDATE",
                (mutation.jkt, mutation.jti),
            ).fetchone()
            if seen is not None and seen[0] >= mutation.now:
                raise ProofReplayed(mutation.jti)
            # A bounded sweep per write keeps the table to the proofs still in their window.
            conn.execute(
                "DELETE FROM dpop_proofs WHERE ctid IN (SELECT ctid FROM dpop_proofs "
                "WHERE expires < %s LIMIT 8)",
                (mutation.now,),
            )
            conn.execute(
                "INSERT INTO dpop_proofs (jkt, jti, expires) VALUES (%s, %s, %s) "
                "ON CONFLICT (jkt, jti) DO UPDATE SET expires = EXCLUDED.expires",
                (mutation.jkt, mutation.jti, mutation.expires),
            )
            return None
        case RecordCosignature(cosignature=c):
            conn.execute(
                "INSERT INTO audit_cosignatures (tree_size, root, witness, line) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (tree_size, witness) DO NOTHING",
                (c.tree_size, c.root, c.witness, c.line),
            )
            return None
        case ForgetIdempotencyKeys(ended_before=cutoff):
            conn.execute(
                "DELETE FROM idempotency_keys WHERE run_id IN (SELECT run_id FROM runs "
                "WHERE state <> 'active' AND end_time < %s)",
                (cutoff,),
            )
            return None
    raise TypeError(f"unknown mutation {mutation!r}")


def _end_run(conn: psycopg.Connection[Any], run: Run) -> None:
    conn.execute(
        "UPDATE runs SET state=%s, end_time=%s, end_reason=%s, ended_by=%s "
        "WHERE run_id=%s AND state='active'",
        (run.state.value, run.end_time, run.end_reason, run.ended_by, run.run_id),
    )


def _changed_run(conn: psycopg.Connection[Any], rowcount: int, run_id: str) -> Run:
    row = conn.execute(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id=%s".encode(),  # noqa: S608
        (run_id,),
    ).fetchone()
    if row is None:
        raise UnknownRun(run_id)
    if rowcount == 0:
        raise RunNotActive(run_id)
    return run_from_row(row)


def _record_checkpoint(conn: psycopg.Connection[Any], checkpoint: CheckpointRecord) -> None:
    row = conn.execute("SELECT COALESCE(MAX(sequence), 0) FROM audit_checkpoints").fetchone()
    latest = int(row[0]) if row else 0
    if latest != checkpoint.prev_sequence or checkpoint.sequence <= latest:
        raise CheckpointConflict(
            f"the newest checkpoint is at {latest}, not {checkpoint.prev_sequence}"
        )
    found = conn.execute(
        "SELECT hash FROM audit_events WHERE sequence=%s", (checkpoint.sequence,)
    ).fetchone()
    if found is None or found[0] != checkpoint.hash:
        raise CheckpointConflict(f"event {checkpoint.sequence} does not have the claimed hash")
    conn.execute(
        f"INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) "  # noqa: S608
        "VALUES (%s, %s, %s, %s, %s, %s)".encode(),
        (
            checkpoint.sequence,
            checkpoint.hash,
            checkpoint.time,
            checkpoint.kid,
            checkpoint.jws,
            checkpoint.prev_sequence,
        ),
    )


def _prune_audit(conn: psycopg.Connection[Any], through: int) -> None:
    row = conn.execute("SELECT pruned_through FROM audit_retention WHERE id=1").fetchone()
    pruned = int(row[0]) if row else 0
    if through <= pruned:
        raise PruneConflict(f"events through {pruned} are already pruned")
    if (
        conn.execute("SELECT 1 FROM audit_checkpoints WHERE sequence=%s", (through,)).fetchone()
        is None
    ):
        raise PruneConflict(f"sequence {through} is not checkpointed")
    conn.execute("UPDATE audit_retention SET pruned_through=%s WHERE id=1", (through,))
    conn.execute("DELETE FROM audit_events WHERE sequence<=%s", (through,))
