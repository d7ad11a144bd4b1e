"""The audit log across real broker processes: restarts, and the CLI as an operator runs it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.audit_support import attacker_connection, auditor, orchestrator
from tests.support import REPO, start_broker_process, start_run_request
from tokenbroker.v1 import broker_pb2

pytestmark = pytest.mark.slow


def token_broker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_a_subscriber_resumes_exactly_where_it_stopped_across_a_broker_crash(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    broker = start_broker_process(data)
    received: list[int] = []
    with orchestrator(broker) as stub:
        for _ in range(10):
            stub.StartRun(start_run_request(), timeout=10)
    with auditor(broker) as stub:
        stream = stub.StreamAudit(broker_pb2.StreamAuditRequest(), timeout=30)
        for item in stream:
            received.append(item.event.sequence)
            if len(received) == 7:
                break
        os.kill(broker.process.pid, signal.SIGKILL)  # with the stream still open
        broker.process.wait(10)
        with pytest.raises(grpc.RpcError):
            for _ in stream:  # events delivered before the kill may still be buffered
                pass
    restarted = start_broker_process(data)
    try:
        with orchestrator(restarted) as stub:
            for _ in range(5):
                stub.StartRun(start_run_request(), timeout=10)
        with auditor(restarted) as stub:
            request = broker_pb2.StreamAuditRequest(after_sequence=received[-1], stop_at_head=True)
            resumed_events = [item.event for item in stub.StreamAudit(request, timeout=10)]
            resumed = [event.sequence for event in resumed_events]
        # Verifying read-only while the broker is running.
        verified = token_broker("audit", "verify", "--data-dir", str(data))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        assert restarted.terminate_and_wait() == 0
    assert received == list(range(1, 8))
    # Exactly the rest: what the first broker wrote after 7, then the restarted broker's own.
    assert resumed == list(range(8, 8 + len(resumed)))
    # 5 runs the first broker started after sequence 7, and the 5 the restarted one started.
    assert [e.action for e in resumed_events].count("run.started") == 10


def test_an_operator_tails_exports_and_verifies_and_sees_tampering(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = start_broker_process(data)
    try:
        with orchestrator(broker) as stub:
            run = stub.StartRun(start_run_request(), timeout=10).run
            stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id, reason="done"))
        tail = token_broker(
            "audit", "tail", "--target", broker.target, "--data-dir", str(data), "--run", run.run_id
        )
        assert tail.returncode == 0, tail.stderr
        lines = tail.stdout.splitlines()
        assert [line.split()[1] for line in lines] == ["run.started", "run.ended"]
        # After policy.loaded and key.created: the run's events are 3 and 4.
        assert f"run {run.run_id}" in lines[0] and lines[1].endswith("reason=done seq=4")
        missing = token_broker(
            "audit", "tail", "--target", broker.target, "--data-dir", str(data), "--after", "99"
        )
        assert missing.returncode == 1 and "OUT_OF_RANGE" in missing.stderr
    finally:
        assert broker.terminate_and_wait() == 0
    exported = tmp_path / "audit.jsonl"
    result = token_broker("audit", "export", "--data-dir", str(data), "-o", str(exported))
    assert result.returncode == 0, result.stderr
    assert len(exported.read_text().splitlines()) == 5  # the signed statement, 4 events
    vkey = str(data / "audit-log-key.pem.vkey")  # the broker created its log key
    assert (
        token_broker("audit", "verify", "--file", str(exported), "--log-key", vkey).returncode == 0
    )
    conn: sqlite3.Connection = attacker_connection(data / "broker.db")
    conn.execute("UPDATE audit_events SET record=replace(record, 'done', 'oops') WHERE sequence=4")
    conn.close()
    tampered = token_broker("audit", "verify", "--data-dir", str(data))
    assert tampered.returncode == 1
    assert "first bad sequence 4" in tampered.stdout
    usage = token_broker("audit", "verify", "--data-dir", str(tmp_path / "nope"))
    assert usage.returncode == 2
