"""SQLite backend: the embedded default (`sqlite:` or `sqlite:PATH`).

WAL mode with `synchronous=FULL`, so an acknowledged write survives `kill -9` and power loss.
Writes are applied in *group commits* led by the callers (broker.store.groupcommit): every
write queued while the previous transaction was syncing shares the next transaction and its
single fsync, each in its own savepoint so that one write's conflict does not undo another's.
Readers use their own per-thread connections and never block the writer.

Opening checks the file first (broker.store.sqlite_guard): a store that must not be served
is refused before anything is written to it. Opened read-only (offline tools), the store
takes no lock, writes nothing and reads one snapshot taken when it was opened.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    StoreUnavailable,
    StoreUrlInvalid,
    UnknownRun,
    Write,
    descendant_end,
    treerows,
)
from broker.store import sqlite_guard as guard
from broker.store.codec import (
    CHECKPOINT_COLUMNS,
    RUN_COLUMNS,
    SQLITE,
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
from broker.store.recent import RecentCommits
from broker.store.sqlreads import SqlReads

log = logging.getLogger(__name__)

Sealed = tuple[audit.AuditEvent, bytes]

DB_FILENAME = "broker.db"
# How long a write waits for a write lock held by another process (a backup tool, an
# sqlite3 shell) before it fails as UNAVAILABLE. Within one broker writes never contend.
BUSY_TIMEOUT = 5.0
MAX_BUSY_TIMEOUT = 600.0
# Worker processes of one `serve --workers` share the file: each looks this often whether
# another committed (PRAGMA data_version reads SQLite's shared memory: no I/O), which bounds
# how late one worker learns of another's revocation.
SHARED_POLL = 0.005


def check_url(url: StoreUrl) -> None:
    unknown = sorted(set(url.options) - {"busy_timeout"})
    if unknown:
        raise StoreUrlInvalid(f"store {str(url)!r}: unknown option {unknown[0]!r}")
    _busy_timeout(url)
    if not url.location:
        return
    path = Path(url.location).expanduser()
    if path.is_dir():
        raise StoreUrlInvalid(
            f"store {str(url)!r}: {path} is a directory; sqlite:PATH names the database "
            f"file (e.g. sqlite:{path / DB_FILENAME}), and plain sqlite: the data dir's"
        )
    if path.suffix in (".lock", ".created"):
        raise StoreUrlInvalid(f"store {str(url)!r}: {path.suffix} files are the store's own")


def database_path(url: StoreUrl, data_dir: Path) -> Path:
    return Path(url.location).expanduser() if url.location else data_dir / DB_FILENAME


def open_url(url: StoreUrl, options: OpenOptions) -> SqliteStore:
    return SqliteStore(
        options.data_dir,
        database=database_path(url, options.data_dir),
        read_only=options.read_only,
        create=options.create,
        history=options.history,
        busy_timeout=_busy_timeout(url),
        held_lock=options.held_lock,
    )


def hold_for_workers(url: StoreUrl, options: OpenOptions) -> guard.StoreLock:
    """The store's lock, taken by the supervisor of `serve --workers` for its workers."""
    database = database_path(url, options.data_dir)
    guard.make_private_dirs(database.parent)
    return guard.StoreLock(database)


def _busy_timeout(url: StoreUrl) -> float:
    raw = url.options.get("busy_timeout")
    if raw is None:
        return BUSY_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_BUSY_TIMEOUT:
        raise StoreUrlInvalid(
            f"store {str(url)!r}: busy_timeout must be 0 to {MAX_BUSY_TIMEOUT:g} seconds"
        )
    return value


def _configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


# The migration that gave signing keys their activation and stop times.
KEY_SCHEDULE_VERSION = 4


def _connect(path: Path, busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    return sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )


def migrations() -> list[tuple[int, str]]:
    """(version, sql) for every migration in broker/store/migrations/sqlite, in order."""
    return numbered_migrations("sqlite")


def latest_version() -> int:
    return max(version for version, _ in migrations())


def migrate(conn: sqlite3.Connection, database: object = "the database") -> int:
    """Mark the file as a token-broker store, apply pending migrations (each in its own
    transaction) and return the schema version. Raises NewerSchema, writing nothing, for a
    store written by a newer broker."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        current = int(
            conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
        )
        guard.check_version(database, current, latest_version())
        if conn.execute("PRAGMA application_id").fetchone()[0] != guard.APPLICATION_ID:
            # Stamped at creation; stores made before the id existed get it on first open.
            conn.execute(f"PRAGMA application_id={guard.APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    for version, sql in migrations():
        if version <= current:
            continue
        log.info("applying schema migration", extra={"version": version})
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = version
    return current


def _statements(sql: str) -> Iterator[str]:
    # sqlite3.complete_statement understands BEGIN...END bodies of triggers.
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip() and not buffer.strip().startswith("--"):
        raise ValueError("migration ends with an incomplete statement")


class SqliteStore(SqlReads):
    """The `Store` on one SQLite file: `database`, by default `data_dir`/broker.db.

    `create` allows an empty store where `history` (or the store's own marks) shows that
    one was kept before; `read_only` opens one snapshot for offline tools. Raises
    StoreRefused, leaving the file untouched, when the file must not be served.
    """

    dialect = SQLITE

    def __init__(
        self,
        data_dir: Path,
        *,
        database: Path | None = None,
        read_only: bool = False,
        create: bool = False,
        history: Sequence[Path] = (),
        busy_timeout: float = BUSY_TIMEOUT,
        held_lock: int | None = None,
    ) -> None:
        """`held_lock`: the store lock inherited from a `serve --workers` supervisor; the file
        is then shared with sibling processes whose commits this one follows."""
        self.path = database if database is not None else data_dir / DB_FILENAME
        self.shared = held_lock is not None
        self.read_only = read_only
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._listeners: list[CommitListener] = []
        self._writes = WriteQueue(self._apply_batch, "sqlite-writer")
        self._committed = threading.Condition()
        self._closed = False
        self._lock: guard.StoreLock | None = None
        self._turns: guard.WriterTurns | None = None
        self._snapshot: sqlite3.Connection | None = None
        self._tree = treerows.FrontierCache()
        self._frontier = Frontier(0, [])
        # The file's only writer answers reads of what it just committed from memory; the
        # workers of one `serve --workers` share the file and read it.
        self._recent = RecentCommits() if held_lock is None and not read_only else None
        if read_only:
            self._snapshot, self.schema_version, self._tables = _open_snapshot(self.path)
            return
        guard.make_private_dirs(self.path.parent)
        self._lock = (
            guard.StoreLock(self.path)
            if held_lock is None
            else guard.StoreLock.adopt(self.path, held_lock)
        )
        self._turns = guard.WriterTurns(self.path) if held_lock is not None else None
        try:
            self._writer, self.schema_version = _open_writer(
                self.path, create=create, history=history, busy_timeout=busy_timeout
            )
            self._tables = _tables(self._writer)
            _build_tree(self._writer)
            self._tree_base = treerows.tree_base(self._on_writer)
            self._head_seq, self._head_hash = self._read_head()
        except sqlite3.Error as exc:
            self._abandon()
            raise guard.refusal(self.path, exc) from None
        except BaseException:
            self._abandon()
            raise
        self._writes.start()

    def _abandon(self) -> None:
        writer: sqlite3.Connection | None = getattr(self, "_writer", None)
        if writer is not None:
            writer.close()
        if self._lock is not None:
            self._lock.release()

    # -- writes --------------------------------------------------------------------------

    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def commit(self, write: Write) -> Committed:
        if self._closed:
            raise StoreUnavailable("store is closed")
        if self.read_only:
            raise StoreUnavailable("store is opened read-only")
        return self._writes.submit(write)

    def _apply_batch(self, batch: list[Pending]) -> None:
        if self._turns is None:
            self._apply_in_transaction(batch)
            return
        with self._turns:
            self._apply_in_transaction(batch)

    def _apply_in_transaction(self, batch: list[Pending]) -> None:
        conn = self._writer
        outcomes: list[tuple[Pending, Committed | BaseException]] = []
        sealed: list[Sealed] = []
        nodes: list[Node] = []  # the tree's, inserted once for the batch
        try:
            conn.execute("BEGIN IMMEDIATE")
            # The head is read inside the writing transaction, never trusted across
            # transactions: whatever else wrote to the file since is continued, not forked.
            self._head_seq, self._head_hash = self._read_head()
            if self._recent is not None and self._recent.last() not in (None, self._head_seq):
                self._recent.forget()  # someone else wrote to the file: what is kept is old
            self._frontier = self._tree.frontier(
                (self._head_seq, self._head_hash), self._tree_base, self._on_writer, SQLITE
            )
            for pending in batch:
                if pending.write.mutation is None:
                    # Events alone cannot conflict (the head is this transaction's): no
                    # savepoint, two statements fewer, each of which lets go of the
                    # interpreter lock. Should one fail all the same, the batch fails.
                    outcomes.append((pending, self._apply(conn, pending.write, sealed, nodes)))
                    continue
                conn.execute("SAVEPOINT w")
                write_head = (self._head_seq, self._head_hash)
                write_frontier = self._frontier.copy()
                write_sealed: list[Sealed] = []
                write_nodes: list[Node] = []
                try:
                    committed = self._apply(conn, pending.write, write_sealed, write_nodes)
                    conn.execute("RELEASE w")
                    outcomes.append((pending, committed))
                    sealed.extend(write_sealed)
                    nodes.extend(write_nodes)
                except (Conflict, sqlite3.IntegrityError) as refused:
                    # Only this write is undone; its neighbours in the batch still commit.
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    self._head_seq, self._head_hash = write_head
                    self._frontier = write_frontier
                    conflict = refused if isinstance(refused, Conflict) else Conflict(str(refused))
                    outcomes.append((pending, conflict))
            if nodes:
                conn.executemany(treerows.insert_sql(SQLITE), nodes)
            conn.execute("COMMIT")
            self._tree.keep((self._head_seq, self._head_hash), self._frontier)
        except (sqlite3.Error, MissingNodes) as exc:
            self._tree.forget()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("storage write failed", extra={"error": str(exc), "writes": len(batch)})
            failure = StoreUnavailable(f"storage refused the write: {exc}")
            for pending in batch:
                pending.settle(failure)
            return
        except BaseException:
            # Anything else (a draft whose details JSON cannot encode) fails the batch with it
            # (WriteQueue settles every write); the transaction must not stay open, or every
            # later write would fail to begin its own.
            self._tree.forget()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._keep_recent(outcomes, sealed)
        for pending, outcome in outcomes:
            if not isinstance(outcome, BaseException):
                self._notify(outcome, pending.write.mutation)
            pending.settle(outcome)
        with self._committed:
            self._committed.notify_all()

    def _keep_recent(
        self, outcomes: list[tuple[Pending, Committed | BaseException]], sealed: list[Sealed]
    ) -> None:
        if self._recent is None:
            return
        if any(
            isinstance(pending.write.mutation, PruneAudit)
            and not isinstance(outcome, BaseException)
            for pending, outcome in outcomes
        ):
            self._recent.forget()  # pruned events must not be read from memory
        self._recent.keep(sealed)

    def read_events(self, after: int, limit: int) -> list[audit.AuditEvent]:
        if self._recent is not None and not self._closed:
            kept = self._recent.read(after, limit)
            if kept is not None:
                return kept
        return super().read_events(after, limit)

    def wait_for_events(self, after: int, timeout: float) -> int:
        # This process's commits wake waiters at once; a commit by another process on the
        # same file is seen when the wait times out and the head is read again — or, for
        # the workers of one `serve --workers`, at the next look at the file's data version.
        if self.shared:
            return self._wait_shared(after, timeout)
        with self._committed:
            if self._head_seq > after or self._committed.wait(timeout):
                return self._head_seq  # known from this process's own commit: no query
        return self.head_sequence()

    def _wait_shared(self, after: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        seen = self._data_version()
        while True:
            with self._committed:
                if self._head_seq > after or self._committed.wait(SHARED_POLL):
                    return self._head_seq
            version = self._data_version()
            if version != seen or time.monotonic() >= deadline:
                return self.head_sequence()

    def _data_version(self) -> int:
        """Changes whenever another connection (this process's writer or a sibling's)
        commits to the file."""
        return int(self._query("PRAGMA data_version")[0][0])

    def _notify(self, committed: Committed, mutation: Mutation | None) -> None:
        for listener in self._listeners:
            try:
                listener(committed, mutation)
            except Exception:
                log.exception("commit listener failed")

    def _apply(
        self, conn: sqlite3.Connection, write: Write, sealed: list[Sealed], nodes: list[Node]
    ) -> Committed:
        """Apply `write`; its events' (event, bytes) go to `sealed`, their tree nodes to
        `nodes` (inserted by the caller, once per batch)."""
        run = self._apply_mutation(conn, write.mutation) if write.mutation else None
        cascaded: list[Run] = []
        drafts = list(write.events)
        if isinstance(write.mutation, EndRun):
            for descendant in _active_descendants(conn, write.mutation.run_id):
                ended, draft = descendant_end(write.mutation, descendant)
                _end_run(conn, ended)
                cascaded.append(ended)
                drafts.append(draft)
        events = []
        for draft in drafts:
            sequence = self._head_seq + 1
            event, body = audit.seal_with_record(draft, sequence, self._head_hash)
            conn.execute(
                "INSERT INTO audit_events (sequence, record, prev_hash, hash, action, run_id, "
                "principal, time_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
            self._head_seq, self._head_hash = sequence, event.hash
            events.append(event)
            sealed.append((event, body))
        return Committed(run, events, tuple(cascaded))

    def _apply_mutation(self, conn: sqlite3.Connection, mutation: Mutation) -> Run | None:
        match mutation:
            case CreateRun(run=run, idempotency=claim):
                if run.parent_run_id:
                    _require_live_parent(conn, run)
                if claim is not None:
                    taken = conn.execute(
                        "SELECT run_id, fingerprint FROM idempotency_keys WHERE scope=? AND key=?",
                        (claim.scope, claim.key),
                    ).fetchone()
                    if taken is not None:
                        raise IdempotencyKeyTaken(taken[0], taken[1])
                placeholders = ", ".join("?" * len(RUN_COLUMNS.split(",")))
                conn.execute(
                    f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({placeholders})",  # noqa: S608
                    run_to_row(run),
                )
                if claim is not None:
                    conn.execute(
                        "INSERT INTO idempotency_keys (scope, key, run_id, fingerprint) "
                        "VALUES (?, ?, ?, ?)",
                        (claim.scope, claim.key, run.run_id, claim.fingerprint),
                    )
                return run
            case EndRun():
                cursor = conn.execute(
                    "UPDATE runs SET state=?, end_time=?, end_reason=?, ended_by=? "
                    "WHERE run_id=? AND state='active'",
                    (
                        mutation.state.value,
                        mutation.end_time,
                        mutation.reason,
                        mutation.ended_by,
                        mutation.run_id,
                    ),
                )
                return self._changed_run(conn, cursor.rowcount, mutation.run_id)
            case RenewLease():
                cursor = conn.execute(
                    "UPDATE runs SET lease_expire_time=? WHERE run_id=? AND state='active'",
                    (mutation.lease_expire_time, mutation.run_id),
                )
                return self._changed_run(conn, cursor.rowcount, mutation.run_id)
            case PublishKey():
                activate = mutation.activate_time
                conn.execute(
                    "INSERT INTO signing_keys (kid, alg, public_jwk, create_time, activate_time) "
                    "VALUES (?, ?, ?, ?, ?)",
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
                        "UPDATE signing_keys SET retire_time=?, stop_signing_time=? WHERE kid=? "
                        "AND (stop_signing_time IS NULL OR stop_signing_time > ?)",
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
                    "SELECT expires FROM dpop_proofs WHERE jkt=? AND jti=?",
                    (mutation.jkt, mutation.jti),
                ).fetchone()
                if seen is not None and seen[0] >= mutation.now:
                    raise ProofReplayed(mutation.jti)
                # A bounded sweep per write keeps the table to the proofs still in their window.
                conn.execute(
                    "DELETE FROM dpop_proofs WHERE rowid IN (SELECT rowid FROM dpop_proofs "
                    "WHERE expires < ? LIMIT 8)",
                    (mutation.now,),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO dpop_proofs (jkt, jti, expires) VALUES (?, ?, ?)",
                    (mutation.jkt, mutation.jti, mutation.expires),
                )
                return None
            case RecordCosignature(cosignature=c):
                conn.execute(
                    "INSERT OR IGNORE INTO audit_cosignatures (tree_size, root, witness, line) "
                    "VALUES (?, ?, ?, ?)",
                    (c.tree_size, c.root, c.witness, c.line),
                )
                return None
            case ForgetIdempotencyKeys(ended_before=cutoff):
                conn.execute(
                    "DELETE FROM idempotency_keys WHERE run_id IN (SELECT run_id FROM runs "
                    "WHERE state != 'active' AND end_time < ?)",
                    (cutoff,),
                )
                return None
        raise TypeError(f"unknown mutation {mutation!r}")

    def _changed_run(self, conn: sqlite3.Connection, rowcount: int, run_id: str) -> Run:
        row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id=?", (run_id,)).fetchone()  # noqa: S608
        if row is None:
            raise UnknownRun(run_id)
        if rowcount == 0:
            raise RunNotActive(run_id)
        return run_from_row(row)

    def _on_writer(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return self._writer.execute(sql, params).fetchall()

    def _read_head(self) -> tuple[int, str]:
        row = self._writer.execute(
            "SELECT sequence, hash FROM audit_events ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        if row is None:
            # Retention may have pruned every event up to a checkpoint: the chain continues
            # from that checkpoint's (sequence, hash), never from the genesis again.
            row = self._writer.execute(
                "SELECT sequence, hash FROM audit_checkpoints ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
        return (0, audit.GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))

    # -- reads ---------------------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._snapshot is not None:
            # Read-only: one connection, one snapshot, shared by every thread in turn.
            with self._readers_lock:
                try:
                    yield self._snapshot
                except sqlite3.Error as exc:
                    raise StoreUnavailable(f"storage read failed: {exc}") from exc
            return
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _configure(_connect(self.path, self._busy_timeout))
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"storage read failed: {exc}") from exc

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._reader() as conn:
            return conn.execute(sql, params).fetchall()

    # -- bulk copy (`token-broker store migrate`) ------------------------------------------

    def table_rows(self, table: Table, batch: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
        """Every row of a table, as stored, in batches (one read snapshot)."""
        sql = f"SELECT {columns_of(table)} FROM {table.name} ORDER BY {table.order}"  # noqa: S608
        with self._reader() as conn:
            cursor = conn.execute(sql)
            while rows := cursor.fetchmany(batch):
                yield [tuple(row) for row in rows]

    def load_rows(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        """Insert rows as they are (a copy into an empty store; the chain is not re-sealed)."""
        if self._recent is not None:
            self._recent.forget()
        marks = ", ".join("?" * len(columns_of(table).split(",")))
        sql = f"INSERT INTO {table.name} ({columns_of(table)}) VALUES ({marks})"  # noqa: S608
        self._bulk(lambda conn: conn.executemany(sql, rows))

    def finish_load(self, pruned_through: int, head: tuple[int, str], tree_base: int) -> None:
        """After a copy: the retention boundary and where the tree starts (the head is read
        from the rows)."""
        self._bulk(
            lambda conn: conn.execute(
                "UPDATE audit_retention SET tree_base=? WHERE id=1", (tree_base,)
            )
        )
        self._tree_base = tree_base
        if pruned_through:
            self._bulk(
                lambda conn: conn.execute(
                    "UPDATE audit_retention SET pruned_through=? WHERE id=1", (pruned_through,)
                )
            )

    def _bulk(self, work: Callable[[sqlite3.Connection], object]) -> None:
        conn = _configure(_connect(self.path, self._busy_timeout))
        try:
            conn.execute("BEGIN IMMEDIATE")
            work(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"storage refused the copy: {exc}") from exc
        finally:
            conn.close()

    def stored_events(self, after: int, limit: int) -> list[StoredEvent]:
        rows = self._query(
            "SELECT sequence, record, prev_hash, hash FROM audit_events WHERE sequence>? "
            "ORDER BY sequence LIMIT ?",
            (after, limit),
        )
        return [StoredEvent(row[0], _json_object(row[1]), str(row[2]), str(row[3])) for row in rows]

    def head_sequence(self) -> int:
        head = int(self._query("SELECT COALESCE(MAX(sequence), 0) FROM audit_events")[0][0])
        if self._recent is not None:
            self._recent.saw_head(head)
        return head

    def _keeps_checkpoints(self) -> bool:
        return "audit_checkpoints" in self._tables  # read-only, on a schema before 0002

    def _keeps_key_schedule(self) -> bool:
        return self.schema_version >= KEY_SCHEDULE_VERSION  # read-only, before 0004

    def _keeps_tree(self) -> bool:
        return "audit_tree" in self._tables  # read-only, on a schema before 0007

    def _keeps_cosignatures(self) -> bool:
        return "audit_cosignatures" in self._tables  # read-only, on a schema before 0008

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._snapshot is not None:
            self._snapshot.close()
            return
        self._writes.stop()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._writer.close()
        if self._turns is not None:
            self._turns.close()
        if self._lock is not None:
            self._lock.release()


def _open_writer(
    path: Path, *, create: bool, history: Sequence[Path], busy_timeout: float
) -> tuple[sqlite3.Connection, int]:
    """The writer's connection to a checked, migrated store (created if allowed)."""
    guard.check_writable(path)
    fresh = guard.is_empty(path)
    if fresh:
        if not create:
            guard.check_no_history(path, history)
        guard.create_private_file(path)
    conn = _connect(path, busy_timeout)
    try:
        # Identify before the first write (even journal_mode writes): a refused file is left
        # exactly as it was.
        version = guard.identify(conn, path, latest_version())
        if version == 0 and not fresh and not create:
            guard.check_no_history(path, history)  # an SQLite file with nothing in it
        guard.tighten([path, *guard.sidecars(path)])  # made before files were owner-only
        version = migrate(_configure(conn), path)
        guard.mark_created(path)
    except BaseException:
        conn.close()
        raise
    return conn, version


def _build_tree(conn: sqlite3.Connection, page: int = 5000) -> None:
    """Append to the tree every event it lacks (a store from before the tree), a page per
    transaction: an interrupted build resumes where it stopped."""

    def execute(sql: str, params: tuple[Any, ...]) -> list[Any]:
        return conn.execute(sql, params).fetchall()

    built = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            frontier, rows = treerows.missing_events(execute, SQLITE, page)
            conn.executemany(treerows.insert_sql(SQLITE), treerows.append_rows(frontier, rows))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if not rows:
            return
        built += len(rows)
        treerows.log_progress(built, built + (0 if len(rows) < page else page))


def _open_snapshot(path: Path) -> tuple[sqlite3.Connection, int, set[str]]:
    if path.is_dir():
        raise StoreNotFound(f"{path}: is a directory, not a database file")
    if guard.is_empty(path):
        raise StoreNotFound(f"{path}: no token-broker database here")
    try:
        return _snapshot(path, "mode=ro")
    except sqlite3.Error as exc:
        cannot_share = getattr(exc, "sqlite_errorname", "").startswith(
            ("SQLITE_READONLY", "SQLITE_CANTOPEN")
        )
        if not cannot_share or any(p.exists() for p in guard.sidecars(path)):
            raise guard.refusal(path, exc) from None
    # A WAL database in a directory we cannot write, with no -wal/-shm beside it: SQLite
    # cannot set up its shared memory. No broker is writing it (a writer keeps its -wal
    # there, and one starting now writes to its new -wal first), so read it as immutable.
    try:
        return _snapshot(path, "mode=ro&immutable=1")
    except sqlite3.Error as exc:
        raise guard.refusal(path, exc) from None


def _snapshot(path: Path, query: str) -> tuple[sqlite3.Connection, int, set[str]]:
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?{query}",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute("BEGIN")  # one snapshot for every read, from the first one on
        version = guard.identify(conn, path, latest_version())
        if version == 0:
            raise StoreNotFound(f"{path}: an SQLite database with no token-broker store in it")
        return conn, version, _tables(conn)
    except BaseException:
        conn.close()
        raise


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
    return {str(row[0]) for row in rows}


def _json_object(text: object) -> dict[str, Any]:
    # A tampered row may hold anything; the verifier reports it rather than crash here.
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _active_descendants(conn: sqlite3.Connection, run_id: str) -> list[Run]:
    return [run_from_row(row) for row in conn.execute(descendants_query(SQLITE), (run_id,))]


def _end_run(conn: sqlite3.Connection, run: Run) -> None:
    conn.execute(
        "UPDATE runs SET state=?, end_time=?, end_reason=?, ended_by=? "
        "WHERE run_id=? AND state='active'",
        (run.state.value, run.end_time, run.end_reason, run.ended_by, run.run_id),
    )


def _require_live_parent(conn: sqlite3.Connection, child: Run) -> None:
    """The conditional check that makes a child and its parent's end race-free: both are
    decided inside the writer's transaction, so one of them sees the other."""
    params = (child.parent_run_id, child.create_time, child.create_time)
    if conn.execute(live_parent_query(SQLITE), params).fetchone() is None:
        raise ParentNotActive(child.parent_run_id)


def _record_checkpoint(conn: sqlite3.Connection, checkpoint: CheckpointRecord) -> None:
    latest = conn.execute("SELECT COALESCE(MAX(sequence), 0) FROM audit_checkpoints").fetchone()[0]
    if latest != checkpoint.prev_sequence or checkpoint.sequence <= latest:
        raise CheckpointConflict(
            f"the newest checkpoint is at {latest}, not {checkpoint.prev_sequence}"
        )
    row = conn.execute(
        "SELECT hash FROM audit_events WHERE sequence=?", (checkpoint.sequence,)
    ).fetchone()
    if row is None or row[0] != checkpoint.hash:
        raise CheckpointConflict(f"event {checkpoint.sequence} does not have the claimed hash")
    conn.execute(
        f"INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
        (
            checkpoint.sequence,
            checkpoint.hash,
            checkpoint.time,
            checkpoint.kid,
            checkpoint.jws,
            checkpoint.prev_sequence,
        ),
    )


def _prune_audit(conn: sqlite3.Connection, through: int) -> None:
    pruned = conn.execute("SELECT pruned_through FROM audit_retention WHERE id=1").fetchone()[0]
    if through <= pruned:
        raise PruneConflict(f"events through {pruned} are already pruned")
    if (
        conn.execute("SELECT 1 FROM audit_checkpoints WHERE sequence=?", (through,)).fetchone()
        is None
    ):
        raise PruneConflict(f"sequence {through} is not checkpointed")
    # Raise the boundary first: the delete trigger allows deleting only up to it.
    conn.execute("UPDATE audit_retention SET pruned_through=? WHERE id=1", (through,))
    conn.execute("DELETE FROM audit_events WHERE sequence<=?", (through,))
