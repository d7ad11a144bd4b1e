"""`token-broker store migrate`: a store filled by a real broker, copied to PostgreSQL and
back, verifies on every copy, and a broker serves from the copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker.api.server import create_server
from broker.store import CosignatureRecord, RecordCosignature, Write
from broker.store.factory import OpenOptions, open_store
from tests.accounts import callers_of, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.support import REPO, start_run_request
from tokenbroker.v1 import broker_pb2, types_pb2


def token_broker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def fill(data_dir: Path, policy: Path) -> list[str]:
    """Runs, tokens, a revocation and checkpoints, written by a real broker on SQLite."""
    server = create_server(make_settings(data_dir, policy=policy, audit_checkpoint_events=10))
    server.start()
    try:
        with callers_of(server) as callers:
            stub = callers.stub(standard_accounts()["orchestrator"])
            runs = []
            for _ in range(12):
                run = stub.StartRun(start_run_request(), timeout=5).run
                stub.IssueToken(
                    broker_pb2.IssueTokenRequest(run_id=run.run_id, audience="api.example.com"),
                    timeout=5,
                )
                runs.append(run.run_id)
            stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=runs[0]), timeout=5)
    finally:
        server.stop(grace=0.5)  # checkpoints the tail
    return runs


def test_a_store_moves_to_postgresql_and_back_with_its_chain_intact(
    tmp_path: Path, pg_dsn: str
) -> None:
    policy = standard_policy(tmp_path)
    runs = fill(tmp_path / "data", policy)
    sqlite_url = f"sqlite:{tmp_path / 'data' / 'broker.db'}"
    # A witness's cosignature of one head (the store keeps what the quorum accepted).
    original = open_store(sqlite_url, OpenOptions())
    try:
        size = original.head_sequence()
        cosigned = CosignatureRecord(size, b"r" * 32, "witness+0011+AQ", "— witness AQID")
        original.commit(Write([], RecordCosignature(cosigned)))
    finally:
        original.close()

    moved = token_broker("store", "migrate", "--from", sqlite_url, "--to", pg_dsn)
    assert moved.returncode == 0, moved.stderr
    assert "the audit chain verifies on the copy" in moved.stdout
    verified = token_broker("audit", "verify", "--store", pg_dsn)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    original = open_store(sqlite_url, OpenOptions(read_only=True))
    copy = open_store(pg_dsn, OpenOptions(read_only=True))
    try:
        assert copy.head_sequence() == original.head_sequence()
        assert copy.stored_events(0, 10_000) == original.stored_events(0, 10_000)
        assert copy.checkpoints(0, 1000) == original.checkpoints(0, 1000)
        assert copy.get_run(runs[0]) == original.get_run(runs[0])
        assert copy.cosignatures(size) == original.cosignatures(size) == [cosigned]
    finally:
        original.close()
        copy.close()

    # A broker starts on the copy, knows the old runs, and continues the same chain.
    settings = make_settings(tmp_path / "pg-replica", policy=policy, store=pg_dsn)
    server = create_server(settings)
    server.start()
    try:
        with callers_of(server) as callers:
            stub = callers.stub(standard_accounts()["orchestrator"])
            assert (
                stub.GetRun(broker_pb2.GetRunRequest(run_id=runs[0]), timeout=5).run.state
                == types_pb2.RUN_STATE_ENDED
            )
            stub.StartRun(start_run_request(), timeout=5)
    finally:
        server.stop(grace=0.5)
    assert token_broker("audit", "verify", "--store", pg_dsn).returncode == 0

    back = tmp_path / "back.db"
    returned = token_broker("store", "migrate", "--from", pg_dsn, "--to", f"sqlite:{back}")
    assert returned.returncode == 0, returned.stderr
    assert token_broker("audit", "verify", "--db", str(back)).returncode == 0


def test_a_copy_into_a_store_that_holds_history_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    policy = standard_policy(tmp_path)
    fill(tmp_path / "data", policy)
    sqlite_url = f"sqlite:{tmp_path / 'data' / 'broker.db'}"
    assert token_broker("store", "migrate", "--from", sqlite_url, "--to", pg_dsn).returncode == 0
    again = token_broker("store", "migrate", "--from", sqlite_url, "--to", pg_dsn)
    assert again.returncode == 1
    assert "not empty" in again.stderr and "Traceback" not in again.stderr
