"""The broker as an operator runs it: a real process, signals, crashes and restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.support import REPO, eventually, start_broker_process, start_run_request
from tokenbroker.credentials import dev_admin_credentials, local_channel
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

pytestmark = pytest.mark.slow


def test_sigterm_during_open_audit_stream_exits_zero_within_five_seconds(tmp_path: Path) -> None:
    broker = start_broker_process(tmp_path / "data")
    received: list[broker_pb2.StreamAuditResponse] = []
    stream_ended = threading.Event()
    with local_channel(broker.target, dev_admin_credentials(tmp_path / "data")) as channel:
        stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
        stub.StartRun(start_run_request(), timeout=10)
        stream = stub.StreamAudit(broker_pb2.StreamAuditRequest(), timeout=30)

        ended_with: list[grpc.StatusCode] = []

        def consume() -> None:
            try:
                received.extend(stream)
            except grpc.RpcError as error:
                ended_with.append(error.code())
            finally:
                stream_ended.set()

        threading.Thread(target=consume, daemon=True).start()
        eventually(lambda: received, what="the stream to deliver the stored event")
        started = time.monotonic()
        broker.process.send_signal(signal.SIGTERM)
        code = broker.process.wait(timeout=10)
        elapsed = time.monotonic() - started
        assert stream_ended.wait(5), "the client's stream ended"
        # Not a clean end: the log did not end, the broker did; the client should resume.
        assert ended_with == [grpc.StatusCode.UNAVAILABLE]
    assert code == 0, broker.logs()
    assert elapsed < 5, f"took {elapsed:.1f}s"
    assert "token-broker stopped" in broker.logs()


def test_write_acknowledged_before_kill_9_survives_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    broker = start_broker_process(data)
    with local_channel(broker.target, dev_admin_credentials(data)) as channel:
        stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
        run_ids = [stub.StartRun(start_run_request(), timeout=10).run.run_id for _ in range(20)]
        ended = stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run_ids[0]), timeout=10)
        assert ended.run.state == types_pb2.RUN_STATE_ENDED
    os.kill(broker.process.pid, signal.SIGKILL)
    broker.process.wait(timeout=10)

    restarted = start_broker_process(data)
    try:
        with local_channel(restarted.target, dev_admin_credentials(data)) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            for run_id in run_ids:
                assert stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=10).run.run_id
            first = stub.GetRun(broker_pb2.GetRunRequest(run_id=run_ids[0]), timeout=10).run
            assert first.state == types_pb2.RUN_STATE_ENDED
            events = list(
                stub.StreamAudit(broker_pb2.StreamAuditRequest(stop_at_head=True), timeout=10)
            )
            sequences = [e.event.sequence for e in events]
            assert sequences == list(range(1, len(sequences) + 1))
            actions = [e.event.action for e in events]
            assert actions.count("run.started") == 20
            assert actions.count("run.ended") == 1
    finally:
        assert restarted.terminate_and_wait() == 0


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_non_loopback_address_without_tls_is_refused(tmp_path: Path) -> None:
    result = _serve("--listen", "0.0.0.0:0", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "refusing to serve on non-loopback address 0.0.0.0:0 without TLS" in result.stderr
    assert "--insecure" in result.stderr


def test_non_loopback_address_from_environment_is_refused_too(tmp_path: Path) -> None:
    result = _serve(env={"TOKEN_BROKER_LISTEN": "[::]:0", "TOKEN_BROKER_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "without TLS" in result.stderr


def test_insecure_flag_serves_but_warns_loudly(tmp_path: Path) -> None:
    broker = start_broker_process(tmp_path / "data", ["--listen", "0.0.0.0:0", "--insecure"])
    try:
        assert "INSECURE" in broker.logs()
    finally:
        assert broker.terminate_and_wait() == 0
