"""What only the SQLite backend does: its triggers, its file, its lock, its modes, and the
store URLs and factory that open it. Everything every backend does is in
test_store_contract.py."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from broker.app import build_broker
from broker.audit import events as audit
from broker.settings import Settings, SettingsError
from broker.store import (
    Committed,
    Conflict,
    CreateRun,
    Mutation,
    RecordCheckpoint,
    Store,
    StoreInUse,
    StoreUnavailable,
    StoreUrlInvalid,
    Write,
)
from broker.store import sqlite_guard as guard
from broker.store.factory import OpenOptions, StoreUrl, open_store, parse
from broker.store.memory import MemoryStore
from broker.store.sqlite import DB_FILENAME, KEY_SCHEDULE_VERSION, SqliteStore, migrations
from tests.storage_support import holding_write_lock
from tests.support import eventually
from tests.test_store_contract import checkpoint_of, event, make_run


def sqlite_store(data_dir: Path, url: str = "sqlite:", **options: object) -> Store:
    return open_store(url, OpenOptions(data_dir=data_dir, **options))  # type: ignore[arg-type]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# -- URLs and the factory ----------------------------------------------------------------


def test_store_urls_name_a_backend_and_its_location() -> None:
    assert parse("sqlite") == StoreUrl("sqlite")
    assert parse("memory") == StoreUrl("memory")
    assert parse("memory:") == StoreUrl("memory")
    assert parse("sqlite:/srv/tb/state.db") == StoreUrl("sqlite", "/srv/tb/state.db")
    assert parse("sqlite:?busy_timeout=0.5") == StoreUrl("sqlite", "", {"busy_timeout": "0.5"})


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://db/tb", "unknown store 'mysql:': use one of memory:, sqlite:"),
        ("postgresql:tb", "a PostgreSQL store is a libpq URL"),
        ("broker.db", "not a store URL"),
        ("memory:/somewhere", "a memory store takes no path"),
        ("sqlite:x.db?busy_timeout=forever", "busy_timeout must be 0 to 600 seconds"),
        ("sqlite:x.db?cache=big", "unknown option 'cache'"),
        ("sqlite:x.lock", "files are the store's own"),
    ],
)
def test_a_malformed_store_url_is_refused_by_settings_with_the_reason(url: str, says: str) -> None:
    with pytest.raises(StoreUrlInvalid, match=says):
        parse(url)
    with pytest.raises(SettingsError, match="--store: "):
        Settings(store=url)


def test_sqlite_path_naming_a_directory_is_refused_with_the_file_it_probably_meant(
    tmp_path: Path,
) -> None:
    with pytest.raises(SettingsError, match=f"e.g. sqlite:{tmp_path / DB_FILENAME}"):
        Settings(store=f"sqlite:{tmp_path}")


def test_plain_sqlite_opens_the_data_dirs_database_and_a_path_opens_that_file(
    tmp_path: Path,
) -> None:
    for url, expected in (
        ("sqlite", tmp_path / "a" / DB_FILENAME),
        (f"sqlite:{tmp_path / 'b' / 'state.db'}", tmp_path / "b" / "state.db"),
    ):
        store = sqlite_store(tmp_path / "a", url)
        assert isinstance(store, SqliteStore) and store.path == expected
        store.close()
        assert expected.stat().st_size > 0
        assert (expected.parent / f"{expected.stem}.lock").exists()


def test_memory_urls_open_a_memory_store_and_refuse_offline_reading(tmp_path: Path) -> None:
    assert isinstance(sqlite_store(tmp_path, "memory:"), MemoryStore)
    with pytest.raises(StoreUrlInvalid, match="nothing to read offline"):
        sqlite_store(tmp_path, "memory:", read_only=True)


def test_backends_are_imported_only_when_a_url_names_them() -> None:
    probe = (
        "import sys\n"
        "from broker.settings import Settings\n"
        "from broker.store.factory import BACKENDS, parse\n"
        "Settings(store='memory:')\n"
        "print(sorted(m for m in BACKENDS.values() if m in sys.modules))\n"
        "parse('sqlite:')\n"
        "print(sorted(m for m in BACKENDS.values() if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split("\n")[:2] == [
        "['broker.store.memory']",
        "['broker.store.memory', 'broker.store.sqlite']",
    ]


def test_migrations_live_in_the_backends_own_folder() -> None:
    versions = [version for version, _ in migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert (
        Path(__file__)
        .parent.parent.joinpath("broker/store/migrations/sqlite/0001_initial.sql")
        .is_file()
    )


# -- triggers and history ------------------------------------------------------------------


def test_sqlite_audit_rows_cannot_be_updated_or_deleted(data_dir: Path) -> None:
    store = sqlite_store(data_dir)
    store.commit(Write([event("x")], CreateRun(make_run("r-1"))))
    store.close()
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_events SET action='y'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_events")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        conn.execute("UPDATE runs SET triggered_via='someone-else'")
    conn.execute("UPDATE runs SET state='ended'")
    with pytest.raises(sqlite3.IntegrityError, match="cannot change state"):
        conn.execute("UPDATE runs SET state='active'")
    conn.close()


def test_sqlite_reopens_with_its_history_and_continues_the_chain(data_dir: Path) -> None:
    store = sqlite_store(data_dir)
    store.commit(Write([event("x"), event("y")], CreateRun(make_run("r-1"))))
    store.close()
    reopened = sqlite_store(data_dir)
    reopened.commit(Write([event("z")]))
    rows = [(s.sequence, s.record, s.prev_hash, s.hash) for s in reopened.stored_events(0, 10)]
    assert [r[0] for r in rows] == [1, 2, 3]
    assert audit.verify_chain(rows, start_prev_hash=audit.GENESIS_HASH) is None
    assert reopened.get_run("r-1") == make_run("r-1")
    reopened.close()


def test_sqlite_checkpoints_and_retention_boundary_are_guarded(data_dir: Path) -> None:
    store = sqlite_store(data_dir)
    store.commit(Write([event("x") for _ in range(5)]))
    store.commit(Write([], RecordCheckpoint(checkpoint_of(store, 2))))
    store.close()
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_checkpoints SET hash='x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_checkpoints")
    with pytest.raises(sqlite3.IntegrityError, match="checkpointed sequence"):
        conn.execute("UPDATE audit_retention SET pruned_through=3")
    conn.execute("UPDATE audit_retention SET pruned_through=2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_events WHERE sequence=3")
    conn.execute("DELETE FROM audit_events WHERE sequence<=2")
    conn.close()


# -- group commit ---------------------------------------------------------------------------


def test_writes_queued_behind_a_commit_share_one_transaction_and_a_conflict_undoes_only_itself(
    data_dir: Path,
) -> None:
    store = sqlite_store(data_dir)
    assert isinstance(store, SqliteStore)
    store.commit(Write([event("run.started")], CreateRun(make_run("r-taken"))))
    # Hold the writer inside its next commit (listeners run on it) while writes queue up.
    release, holding = threading.Event(), threading.Event()

    def hold_first_commit(committed: Committed, mutation: Mutation | None) -> None:
        if not holding.is_set():
            holding.set()
            release.wait(10)

    store.add_listener(hold_first_commit)
    transactions: list[str] = []
    store._writer.set_trace_callback(
        lambda sql: transactions.append(sql) if sql == "COMMIT" else None
    )
    first = threading.Thread(target=store.commit, args=(Write([event("first")]),))
    first.start()
    assert holding.wait(10)
    outcomes: dict[str, str] = {}

    def write(run_id: str) -> None:
        try:
            store.commit(Write([event("run.started")], CreateRun(make_run(run_id))))
            outcomes[run_id] = "committed"
        except Conflict:
            outcomes[run_id] = "conflict"

    names = ["r-1", "r-2", "r-taken", "r-3", "r-4"]
    writers = [threading.Thread(target=write, args=(name,)) for name in names]
    for thread in writers:
        thread.start()
    eventually(
        lambda: store._writes.waiting() >= len(names),
        interval=0.005,
        what="every writer queued behind the held commit",
    )
    transactions.clear()
    release.set()
    for thread in (first, *writers):
        thread.join(10)
    store._writer.set_trace_callback(None)
    assert outcomes == {name: "conflict" if name == "r-taken" else "committed" for name in names}
    assert transactions == ["COMMIT"]  # five writes, one transaction, one fsync
    assert store.head_sequence() == 6
    assert [store.get_run(n) is not None for n in ("r-1", "r-2", "r-3", "r-4")] == [True] * 4
    store.close()


# -- identity and the lock -----------------------------------------------------------------


def application_id(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("PRAGMA application_id").fetchone()[0])
    finally:
        conn.close()


def test_a_new_store_carries_the_token_broker_application_id(data_dir: Path) -> None:
    sqlite_store(data_dir).close()
    assert application_id(data_dir / DB_FILENAME) == guard.APPLICATION_ID


def test_a_store_made_before_the_application_id_still_opens_and_gets_it_stamped(
    data_dir: Path,
) -> None:
    store = sqlite_store(data_dir)
    store.commit(Write([event("x")], CreateRun(make_run("r-1"))))
    store.close()
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    conn.execute("PRAGMA application_id=0")
    conn.commit()
    conn.close()
    (data_dir / "broker.created").unlink()  # nor had it the mark beside it
    reopened = sqlite_store(data_dir)
    assert reopened.get_run("r-1") == make_run("r-1")
    reopened.close()
    assert application_id(data_dir / DB_FILENAME) == guard.APPLICATION_ID
    assert (data_dir / "broker.created").exists()


def test_a_second_opener_of_the_same_store_is_refused_until_the_first_closes(
    data_dir: Path,
) -> None:
    first = sqlite_store(data_dir)
    assert (data_dir / "broker.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(StoreInUse, match=f"in use by another broker \\(pid {os.getpid()}"):
        sqlite_store(data_dir)
    reader = sqlite_store(data_dir, read_only=True)  # offline tools take no lock
    reader.close()
    first.close()
    sqlite_store(data_dir).close()


def test_a_write_lock_held_by_another_process_at_start_refuses_the_store(
    data_dir: Path,
) -> None:
    sqlite_store(data_dir).close()
    with (
        holding_write_lock(data_dir / DB_FILENAME),
        pytest.raises(StoreInUse, match="locked by another process"),
    ):
        sqlite_store(data_dir, "sqlite:?busy_timeout=0.2")


# -- read-only ---------------------------------------------------------------------------


def test_a_read_only_open_reads_one_snapshot_and_never_writes(data_dir: Path) -> None:
    writer = sqlite_store(data_dir)
    writer.commit(Write([event("a"), event("b")]))
    reader = sqlite_store(data_dir, read_only=True)
    writer.commit(Write([event("c")]))
    assert reader.head_sequence() == 2  # the snapshot taken at open
    assert [e.sequence for e in reader.stored_events(0, 10)] == [1, 2]
    with pytest.raises(StoreUnavailable, match="read-only"):
        reader.commit(Write([event("d")]))
    reader.close()
    writer.close()


def test_a_read_only_open_of_a_store_before_checkpoints_existed_reads_none(
    data_dir: Path,
) -> None:
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.executescript(migrations()[0][1])
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO schema_migrations VALUES (1)")
    conn.close()
    reader = sqlite_store(data_dir, read_only=True)
    assert reader.checkpoints(0, 10) == [] and reader.latest_checkpoint() is None
    reader.close()
    assert application_id(data_dir / DB_FILENAME) == 0  # read-only: not even stamped


# -- data at rest ------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_files_are_owner_only_and_directories_too_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    data_dir = tmp_path / "new" / "data"
    previous = os.umask(umask)
    try:
        broker = build_broker(Settings(data_dir=data_dir, http_listen=""))
        try:
            broker.store.commit(Write([event("x")]))
            made = sorted(data_dir.rglob("*"))
            names = {p.relative_to(data_dir).as_posix() for p in made}
            expected = {"broker.db", "broker.db-wal", "broker.db-shm", "broker.lock", "keys"}
            assert names >= expected | {"dev-policy.toml", "dev-admin-key.pem", "broker.created"}
            modes = {
                p.relative_to(data_dir).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in made
            }
        finally:
            broker.close()
    finally:
        os.umask(previous)
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (data_dir / name).is_dir() else 0o600)
    }
    assert wrong == {}
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_database_files_from_before_are_made_owner_only_when_opened(data_dir: Path) -> None:
    sqlite_store(data_dir).close()
    os.chmod(data_dir / DB_FILENAME, 0o644)
    store = sqlite_store(data_dir)
    store.commit(Write([event("x")]))
    assert stat.S_IMODE((data_dir / DB_FILENAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "broker.db-wal").stat().st_mode) == 0o600
    store.close()


def test_keys_of_a_store_before_key_schedules_sign_from_creation_and_retiring_ones_have_stopped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
        "applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    for version, sql in migrations():
        if version < KEY_SCHEDULE_VERSION:
            conn.executescript(sql)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
    conn.execute(f"PRAGMA application_id={guard.APPLICATION_ID}")
    conn.execute(
        "INSERT INTO signing_keys (kid, alg, public_jwk, create_time, retire_time) VALUES "
        "('old', 'ES256', '{}', 1000.0, 91000.0), ('new', 'ES256', '{}', 2000.0, NULL)"
    )
    conn.close()
    url = f"sqlite:{path}"

    def schedules(store: Store) -> dict[str, tuple[float, float | None]]:
        return {k.kid: (k.activate_time, k.stop_signing_time) for k in store.public_keys()}

    expected = {"old": (1000.0, 1000.0), "new": (2000.0, None)}
    reader = sqlite_store(tmp_path, url, read_only=True)  # offline tools do not migrate
    try:
        assert schedules(reader) == expected
    finally:
        reader.close()
    writer = sqlite_store(tmp_path, url)  # the broker migrates
    try:
        assert schedules(writer) == expected
        [new] = [k for k in writer.public_keys() if k.kid == "new"]
        assert new.signs_at(2001.0)
    finally:
        writer.close()


def _as_before_the_tree(db: Path) -> None:
    """Turn a store back into one written before migration 0007 (no tree, no tree_base, and
    none of the later migrations' tables)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TABLE audit_cosignatures")
    conn.execute("DELETE FROM schema_migrations WHERE version = 8")
    conn.execute("DROP TABLE audit_tree")
    conn.execute("ALTER TABLE audit_retention DROP COLUMN tree_base")
    conn.execute("DELETE FROM schema_migrations WHERE version = 7")
    conn.close()


def test_opening_a_store_from_before_the_tree_builds_it_over_every_existing_event(
    tmp_path: Path,
) -> None:
    from broker.audit import merkle
    from broker.store import all_stored_events
    from tokenbroker.merkle import root_of_leaves

    store = SqliteStore(tmp_path)
    for _ in range(3):
        store.commit(Write([event("run.started") for _ in range(4001)]))
    store.close()
    _as_before_the_tree(tmp_path / DB_FILENAME)

    store = SqliteStore(tmp_path)  # migrates, then builds the tree a page at a time
    try:
        store.commit(Write([event("run.ended")]))  # and keeps it growing from there
        leaves = [
            merkle.leaf_hash(audit.canonical_bytes(e.record)) for e in all_stored_events(store)
        ]
        assert len(leaves) == 12004
        assert merkle.root_at(12004, store.tree_nodes) == root_of_leaves(leaves)
        assert store.tree_base() == 0
    finally:
        store.close()
    assert (
        subprocess.run(
            [sys.executable, "-m", "broker", "audit", "verify", "--data-dir", str(tmp_path)],
            capture_output=True,
            check=False,
            timeout=120,
        ).returncode
        == 0
    )


def test_migrations_are_numbered_once_each_so_none_is_silently_skipped(tmp_path: Path) -> None:
    from broker.store.codec import numbered_migrations

    for backend in ("sqlite", "postgresql"):
        versions = [version for version, _ in numbered_migrations(backend)]
        assert versions == list(range(1, len(versions) + 1)), backend
    for name in ("0001_initial.sql", "0002_a.sql", "0002_b.sql"):
        (tmp_path / name).write_text("-- nothing")
    with pytest.raises(RuntimeError, match=re.escape("0002_a.sql, 0002_b.sql")):
        numbered_migrations("sqlite", tmp_path)
    (tmp_path / "0002_b.sql").rename(tmp_path / "0004_b.sql")
    with pytest.raises(RuntimeError, match=re.escape("numbered 1..N")):
        numbered_migrations("sqlite", tmp_path)
