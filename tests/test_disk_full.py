"""Degrade, don't stop (issue 14 §4): with the disk full, whether a token is valid is still
answered, reads still work, writes fail closed, and readiness says so — also for a broker
(re)started on a full disk after a crash. The disk is a real size-limited tmpfs, filled."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.api.server import SERVICE_NAME, WRITES_HEALTH_NAME, BrokerServer, create_server
from broker.cli import main as cli
from tests.accounts import callers_of, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.disk_support import SmallDisk, small_disk
from tests.support import (
    BrokerProcess,
    details,
    reached,
    rpc_error,
    start_broker_process,
    start_run_request,
)
from tokenbroker.credentials import dev_admin_credentials, local_channel
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

Stub = broker_pb2_grpc.TokenBrokerServiceStub
AUDIENCE = "api.example.com"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.slow


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with small_disk(tmp_path / "disk") as mounted:
        yield mounted


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return status


def _readyz(process: BrokerProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(process.http_url + "/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, json.loads(refused.read())


def _eventually(condition: Callable[[], bool], within: float = 10.0) -> bool:
    return reached(condition, within=within)


def _tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return ".".join((head, payload, flipped))


def _issue(stub: Stub, run_id: str) -> str:
    request = broker_pb2.IssueTokenRequest(run_id=run_id, audience=AUDIENCE)
    return stub.IssueToken(request, timeout=5).token


def _verify(stub: Stub, token: str) -> int:
    request = broker_pb2.VerifyTokenRequest(token=token, audience=AUDIENCE)
    return stub.VerifyToken(request, timeout=5).status


@pytest.fixture
def server_on_disk(tmp_path: Path, disk: SmallDisk) -> Iterator[BrokerServer]:
    settings = make_settings(disk.root / "data", policy=standard_policy(tmp_path))
    running = create_server(settings)
    running.start()
    yield running
    disk.free()  # let the broker close its store cleanly
    running.stop(grace=0.5)


def test_verify_token_of_a_tampered_token_answers_bad_signature_with_the_disk_full(
    server_on_disk: BrokerServer, disk: SmallDisk
) -> None:
    with callers_of(server_on_disk) as callers:
        stub = callers.stub(standard_accounts()["root"])
        run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
        token = _issue(stub, run_id)
        disk.fill()

        assert _verify(stub, _tampered(token)) == broker_pb2.TOKEN_STATUS_BAD_SIGNATURE
        assert _verify(stub, token) == broker_pb2.TOKEN_STATUS_ACTIVE
        error = rpc_error(lambda: stub.StartRun(start_run_request(), timeout=5))
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert "nothing was changed" in details(error)
        error = rpc_error(lambda: _issue(stub, run_id))
        assert error.code() is grpc.StatusCode.UNAVAILABLE  # no token without its event


def test_readiness_reports_writes_not_serving_while_the_disk_is_full_and_serving_again_after(
    server_on_disk: BrokerServer, disk: SmallDisk
) -> None:
    with grpc.insecure_channel(server_on_disk.target) as channel:
        assert _health(channel, WRITES_HEALTH_NAME) == SERVING
        disk.fill()
        assert _eventually(lambda: _health(channel, WRITES_HEALTH_NAME) == NOT_SERVING)
        # Reads and verification still work; ready for everything (as /readyz says) it is not.
        assert _health(channel, SERVICE_NAME) == SERVING
        assert _health(channel, "") == NOT_SERVING
        disk.free()
        assert _eventually(lambda: _health(channel, WRITES_HEALTH_NAME) == SERVING)
        assert _eventually(lambda: _health(channel, "") == SERVING)
    with callers_of(server_on_disk) as callers:
        stub = callers.stub(standard_accounts()["root"])
        assert stub.StartRun(start_run_request(), timeout=5).run.run_id


def test_broker_restarted_after_a_crash_with_the_disk_full_serves_reads_and_verification(
    tmp_path: Path, disk: SmallDisk
) -> None:
    data = disk.root / "data"
    # A fixed issuer, as in production: dev-admin.json (its audience) need not change.
    issuer = ["--issuer", "http://broker.test"]
    first = start_broker_process(data, issuer, log_dir=tmp_path)
    with local_channel(first.target, dev_admin_credentials(data)) as channel:
        stub = Stub(channel)
        ended = stub.StartRun(start_run_request(), timeout=10).run.run_id
        live = stub.StartRun(start_run_request(), timeout=10).run.run_id
        token = _issue(stub, live)
        dead_token = _issue(stub, ended)
        stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=ended), timeout=10)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=10)
    disk.fill()

    restarted = start_broker_process(data, issuer, log_dir=tmp_path)
    try:
        with local_channel(restarted.target, dev_admin_credentials(data)) as channel:
            stub = Stub(channel)
            assert _health(channel, SERVICE_NAME) == SERVING
            assert _health(channel, WRITES_HEALTH_NAME) == NOT_SERVING
            assert _health(channel, "") == NOT_SERVING
            status, readiness = _readyz(restarted)
            assert status == 503
            assert readiness["checks"]["store_writable"] is False
            assert "store cannot take writes" in readiness["reasons"][0]
            got = stub.GetRun(broker_pb2.GetRunRequest(run_id=ended), timeout=10).run
            assert got.state == types_pb2.RUN_STATE_ENDED
            listed = stub.ListRuns(broker_pb2.ListRunsRequest(), timeout=10).runs
            assert {r.run_id for r in listed} == {ended, live}
            assert _verify(stub, token) == broker_pb2.TOKEN_STATUS_ACTIVE
            assert _verify(stub, dead_token) == broker_pb2.TOKEN_STATUS_RUN_ENDED
            assert _verify(stub, _tampered(token)) == broker_pb2.TOKEN_STATUS_BAD_SIGNATURE
            assert stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest(), timeout=10).keys
            request = broker_pb2.StreamAuditRequest(stop_at_head=True)
            assert [e.event.sequence for e in stub.StreamAudit(request, timeout=10)]
            error = rpc_error(lambda: stub.StartRun(start_run_request(), timeout=10))
            assert error.code() is grpc.StatusCode.UNAVAILABLE

            disk.free()
            assert _eventually(lambda: _health(channel, WRITES_HEALTH_NAME) == SERVING)
            assert _eventually(lambda: _readyz(restarted)[0] == 200)
            assert stub.StartRun(start_run_request(), timeout=10).run.run_id
        assert "storage cannot take writes" in restarted.logs()
    finally:
        disk.free()
        assert restarted.terminate_and_wait() == 0
    assert cli.main(["audit", "verify", "--data-dir", str(data)]) == 0
