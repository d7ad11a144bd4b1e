"""`/healthz` and `/readyz` on a real `token-broker serve` process: alive, ready with every
check named, and not ready — with the reason — while it drains after SIGTERM; the gRPC health
service reports the same readiness. (A store that refuses writes: tests/test_disk_full.py.)"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import BrokerProcess, eventually, perms, pipeline, start_broker_process
from tokenbroker.credentials import dev_admin_credentials, local_channel
from tokenbroker.v1 import (
    broker_pb2,
    broker_pb2_grpc,
    executor_pb2,
    executor_pb2_grpc,
)

pytestmark = pytest.mark.slow


def get(process: BrokerProcess, path: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    try:
        with urllib.request.urlopen(process.http_url + path, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, dict(refused.headers), json.loads(refused.read())


class HeldExecutor(executor_pb2_grpc.PipelineExecutorServiceServicer):
    """An executor whose Execute holds the broker's ExecuteOnBehalfOf call in flight until
    released: something for a draining broker to finish."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def Execute(
        self, request: executor_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> executor_pb2.ExecuteResponse:
        self.entered.set()
        self.release.wait(timeout=30)
        return executor_pb2.ExecuteResponse(accepted=True, execution_id="held")


@pytest.fixture
def executor() -> Iterator[tuple[HeldExecutor, int]]:
    held = HeldExecutor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    executor_pb2_grpc.add_PipelineExecutorServiceServicer_to_server(held, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield held, port
    held.release.set()
    server.stop(None)


def test_healthz_is_alive_and_readyz_ready_with_every_check_as_grpc_health_says(
    tmp_path: Path,
) -> None:
    process = start_broker_process(tmp_path / "data")
    try:
        status, headers, alive = get(process, "/healthz")
        assert (status, alive) == (200, {"status": "alive"})
        status, headers, ready = get(process, "/readyz")
        assert status == 200
        assert headers["Cache-Control"] == "no-store"
        assert ready == {
            "ready": True,
            "checks": {
                "store_writable": True,
                "policy_loaded": True,
                "keys_present": True,
                "draining": False,
            },
            "reasons": [],
        }
        with grpc.insecure_channel(process.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert process.terminate_and_wait() == 0


def test_readyz_is_503_draining_after_sigterm_while_a_call_finishes_and_healthz_stays_alive(
    tmp_path: Path, executor: tuple[HeldExecutor, int]
) -> None:
    held, executor_port = executor
    data = tmp_path / "data"
    process = start_broker_process(
        data,
        ["--executor-target", f"127.0.0.1:{executor_port}", "--shutdown-grace", "20"],
    )
    answered: list[broker_pb2.ExecuteOnBehalfOfResponse] = []

    def execute() -> None:
        with local_channel(process.target, dev_admin_credentials(data)) as channel:
            request = broker_pb2.ExecuteOnBehalfOfRequest(
                pipeline=pipeline(),
                permission_ceiling=perms(pipelines="execute"),
                idempotency_key="drain-1",
                asserted=broker_pb2.AssertedPerson(subject="u-1", email="alice@example.com"),
            )
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            answered.append(stub.ExecuteOnBehalfOf(request, timeout=30))

    caller = threading.Thread(target=execute)
    caller.start()
    try:
        assert held.entered.wait(timeout=30), process.logs()
        process.process.terminate()  # SIGTERM, with ExecuteOnBehalfOf in flight

        def draining() -> dict[str, Any] | None:
            status, _, document = get(process, "/readyz")
            return document if status == 503 else None

        document = eventually(draining, within=10, interval=0.05, what="/readyz draining")
        assert document["ready"] is False
        assert document["checks"]["draining"] is True
        assert document["reasons"][0].startswith("draining")
        assert get(process, "/healthz")[0] == 200
    finally:
        held.release.set()
        caller.join(timeout=30)
    assert process.process.wait(timeout=30) == 0
    assert answered and answered[0].handed_off  # the call in flight was finished
