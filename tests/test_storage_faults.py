"""Storage faults (issue 14): a store the broker must not open is refused — one line, a
non-zero exit, the file untouched — and a store that fails under a running broker answers
UNAVAILABLE, writes nothing by halves, and recovers.

Start-up refusals are checked on the real `token-broker serve` process."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.cli import main as cli
from broker.settings import Settings
from broker.store.sqlite import DB_FILENAME, SqliteStore, latest_version
from tests.audit_support import orchestrator
from tests.conftest import make_settings, standard_policy
from tests.storage_support import (
    Exit,
    fingerprint,
    holding_write_lock,
    serve,
    without_root_override,
)
from tests.support import REPO, details, rpc_error, start_broker_process, start_run_request
from tokenbroker.v1 import broker_pb2

pytestmark = pytest.mark.slow


def used_data_dir(tmp_path: Path) -> Path:
    """A data dir a broker has served from: development policy, keys, a store with history."""
    data_dir = tmp_path / "data"
    broker = build_broker(Settings(data_dir=data_dir, http_listen=""))
    broker.close()
    return data_dir


def audit_verify(data_dir: Path, prefix: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """`token-broker audit verify` as another process (and user) runs it."""
    command = [*prefix, sys.executable, "-m", "broker", "audit", "verify"]
    command += ["--data-dir", str(data_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def refused(result: Exit, says: str) -> str:
    """The refusal's one line (asserting it is one line, and the exit 1)."""
    assert result.code == 1, result.stderr
    # Besides log records (JSON, from a start that got that far), one line.
    said = [line for line in result.lines if not line.startswith('{"time"')]
    assert len(said) == 1, result.stderr
    line = said[0]
    assert line.startswith("token-broker serve: "), line
    assert says in line, line
    assert "Traceback" not in result.stderr
    return line


# -- refused at start -----------------------------------------------------------------------


def test_read_only_database_file_is_refused_at_start(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    db = data_dir / DB_FILENAME
    before = fingerprint(db)
    os.chmod(db, 0o400)
    try:
        result = serve(data_dir, prefix=without_root_override())
        verified = audit_verify(data_dir, prefix=without_root_override())
    finally:
        os.chmod(db, 0o600)
    refused(result, f"{db}: the database file is read-only")
    assert fingerprint(db) == before
    assert verified.returncode == 0, verified.stderr  # reading needs no write access


def test_read_only_data_dir_is_refused_at_start(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    before = fingerprint(data_dir / DB_FILENAME)
    os.chmod(data_dir, 0o500)
    try:
        result = serve(data_dir, prefix=without_root_override())
        verified = audit_verify(data_dir, prefix=without_root_override())
    finally:
        os.chmod(data_dir, 0o700)
    refused(result, f"{data_dir}: the store's directory is read-only")
    assert fingerprint(data_dir / DB_FILENAME) == before
    assert verified.returncode == 0, verified.stderr


def test_corrupt_database_file_is_refused_at_start_and_by_audit_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = used_data_dir(tmp_path)
    db = data_dir / DB_FILENAME
    with db.open("r+b") as handle:
        handle.write(os.urandom(4096))  # the header page, schema and all
    before = fingerprint(db)
    refused(serve(data_dir), f"{db}: not a readable SQLite database")
    assert fingerprint(db) == before
    assert cli.main(["audit", "verify", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable SQLite database" in err, err


def damage_table(db: Path, table: str) -> None:
    """Overwrite the root page of `table` with noise: the file still opens, reading the
    table fails with SQLite's `database disk image is malformed`."""
    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
    conn.close()
    with db.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(os.urandom(page_size))


def test_corrupt_page_found_at_start_is_refused_in_one_line_and_by_audit_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = used_data_dir(tmp_path)
    db = data_dir / DB_FILENAME
    damage_table(db, "runs")  # read at start: the live runs are loaded into memory
    before = fingerprint(db)
    refused(serve(data_dir), "cannot be read at start: storage read failed: database disk image")
    assert fingerprint(db) == before
    damage_table(db, "audit_events")  # read when the store opens: its chain's head
    before = fingerprint(db)
    refused(serve(data_dir), "not a readable SQLite database (database disk image is malformed)")
    assert fingerprint(db) == before
    assert cli.main(["audit", "verify", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "database disk image is malformed" in err, err


def test_newer_schema_is_refused_at_start_naming_both_versions(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    db = data_dir / DB_FILENAME
    newer = latest_version() + 7
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (newer,))
    conn.commit()
    conn.close()
    before = fingerprint(db)
    refused(
        serve(data_dir),
        f"schema version {newer} is newer than this broker knows ({latest_version()})",
    )
    assert fingerprint(db) == before


def test_foreign_sqlite_file_is_refused_at_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / DB_FILENAME
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    conn.execute("INSERT INTO users (email) VALUES ('someone@example.com')")
    conn.commit()
    conn.close()
    before = fingerprint(db)
    refused(serve(data_dir), f"{db}: not a token-broker store (it holds other tables: users)")
    assert fingerprint(db) == before


def test_foreign_sqlite_file_with_another_application_id_is_refused_at_start(
    tmp_path: Path,
) -> None:
    db = tmp_path / "elsewhere.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA application_id=1096045650")  # another application's
    conn.commit()
    conn.close()
    before = fingerprint(db)
    refused(
        serve(tmp_path / "data", "--store", f"sqlite:{db}"),
        "not a token-broker store (SQLite application id 0x4154",
    )
    assert fingerprint(db) == before


def test_empty_database_file_in_a_used_data_dir_is_refused_at_start(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    db = data_dir / DB_FILENAME
    db.write_bytes(b"")
    line = refused(serve(data_dir), f"{db} is empty, but this data dir held a broker before")
    assert "--init-store" in line
    assert db.stat().st_size == 0


def test_missing_database_in_a_used_data_dir_is_refused_at_start(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    (data_dir / DB_FILENAME).unlink()
    refused(serve(data_dir), "is missing, but this data dir held a broker before")
    assert not (data_dir / DB_FILENAME).exists()


def test_missing_database_of_a_data_dir_from_before_the_mark_is_refused_too(
    tmp_path: Path,
) -> None:
    data_dir = used_data_dir(tmp_path)
    (data_dir / DB_FILENAME).unlink()
    (data_dir / "broker.created").unlink()  # a data dir made before the mark existed
    refused(serve(data_dir), f"({data_dir / 'keys'} exists)")


def test_init_store_starts_an_empty_store_where_the_old_one_was_lost(tmp_path: Path) -> None:
    data_dir = used_data_dir(tmp_path)
    (data_dir / DB_FILENAME).write_bytes(b"")
    broker = start_broker_process(data_dir, ["--init-store"])
    try:
        with orchestrator(broker) as stub:
            stub.StartRun(start_run_request(), timeout=10)
    finally:
        assert broker.terminate_and_wait() == 0
    assert cli.main(["audit", "verify", "--data-dir", str(data_dir)]) == 0


def test_second_broker_on_the_same_data_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = start_broker_process(data_dir)
    try:
        before = fingerprint(data_dir / DB_FILENAME)
        refused(serve(data_dir), f"in use by another broker (pid {first.process.pid}")
        with orchestrator(first) as stub:  # the first one never noticed
            stub.StartRun(start_run_request(), timeout=10)
        assert before is not None
    finally:
        assert first.terminate_and_wait() == 0


# -- faults under a running broker -------------------------------------------------------------


@pytest.fixture
def quick_to_give_up(tmp_path: Path) -> Iterator[BrokerServer]:
    """A broker whose writes wait at most 0.5 s for another process's write lock."""
    settings = make_settings(
        tmp_path / "data", policy=standard_policy(tmp_path), store="sqlite:?busy_timeout=0.5"
    )
    running = create_server(settings)
    running.start()
    yield running
    running.stop(grace=0.5)


def test_database_locked_by_another_process_answers_unavailable_within_a_bounded_time(
    quick_to_give_up: BrokerServer,
) -> None:
    server = quick_to_give_up
    db = server.broker.settings.data_dir / DB_FILENAME
    with orchestrator(server) as stub:
        before = stub.StartRun(start_run_request(), timeout=5).run
        head = server.broker.store.head_sequence()
        with holding_write_lock(db):
            started = time.monotonic()
            error = rpc_error(lambda: stub.StartRun(start_run_request(), timeout=10))
            elapsed = time.monotonic() - started
            assert error.code() is grpc.StatusCode.UNAVAILABLE, details(error)
            assert "database is locked" in details(error)
            assert elapsed < 5, f"took {elapsed:.1f}s"
            got = stub.GetRun(broker_pb2.GetRunRequest(run_id=before.run_id), timeout=5)
            assert got.run.run_id == before.run_id  # reads are not held up
        assert server.broker.store.head_sequence() == head
        stub.StartRun(start_run_request(), timeout=5)  # the lock is gone: writes again


def limit_growth(store: SqliteStore) -> None:
    """Make the database 'full' at its current size: SQLite itself then fails every write
    that needs a new page with its real error, `database or disk is full`."""
    pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
    store._writer.execute(f"PRAGMA max_page_count={pages}")


def unlimit_growth(store: SqliteStore) -> None:
    store._writer.execute("PRAGMA max_page_count=4294967294")


def test_disk_full_answers_unavailable_with_nothing_half_written_then_recovers(
    server: BrokerServer,
) -> None:
    store = server.broker.store
    assert isinstance(store, SqliteStore)
    acknowledged: list[str] = []
    with orchestrator(server) as stub:
        acknowledged.append(stub.StartRun(start_run_request(), timeout=5).run.run_id)
        limit_growth(store)
        try:
            error = None
            for _ in range(400):  # the last pages' free space fills up first
                head = store.head_sequence()
                try:
                    run = stub.StartRun(start_run_request(), timeout=5).run
                except grpc.RpcError as failed:
                    error = failed
                    break
                acknowledged.append(run.run_id)
            assert error is not None, "the database never filled up"
            assert error.code() is grpc.StatusCode.UNAVAILABLE
            assert "database or disk is full" in details(error)
            assert store.head_sequence() == head  # neither the run nor its event
            listed = stub.ListRuns(broker_pb2.ListRunsRequest(org="acme", page_size=500))
            assert sorted(r.run_id for r in listed.runs) == sorted(acknowledged)
        finally:
            unlimit_growth(store)
        acknowledged.append(stub.StartRun(start_run_request(), timeout=5).run.run_id)
        listed = stub.ListRuns(broker_pb2.ListRunsRequest(org="acme", page_size=500))
        assert sorted(r.run_id for r in listed.runs) == sorted(acknowledged)
    data_dir = server.broker.settings.data_dir
    assert cli.main(["audit", "verify", "--data-dir", str(data_dir)]) == 0


def test_disk_full_on_a_size_limited_file_system_answers_unavailable_then_recovers(
    tmp_path: Path,
) -> None:
    root = tmp_path / "small"
    root.mkdir()
    unshare = shutil.which("unshare")
    in_namespace = [unshare or "unshare", "-m", "--propagation", "private"]
    probe = [*in_namespace, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)]
    if unshare is None or subprocess.run(probe, capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a size-limited file system here (needs unshare and mount)")
    scenario = [*in_namespace, sys.executable, "-m", "tests.fullfs_scenario", str(root)]
    done = subprocess.run(
        scenario, capture_output=True, text=True, cwd=REPO, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["code"] == "UNAVAILABLE", seen
    assert "database or disk is full" in str(seen["details"]), seen
    assert seen["head_unchanged"] and seen["only_acknowledged"] and seen["recovered"], seen
    assert seen["verify"] == 0, done.stderr[-3000:]
