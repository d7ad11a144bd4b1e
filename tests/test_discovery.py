"""A grpcurl user can find, describe and call everything through reflection alone."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.api.server import BrokerServer
from tests.accounts import Callers, standard_accounts
from tests.grpcurl_like import ReflectionClient

EVERY_RPC = [
    "StartRun",
    "ExecuteOnBehalfOf",
    "RenewRun",
    "IssueToken",
    "VerifyToken",
    "RevokeRun",
    "GetRun",
    "ListRuns",
    "GetSigningKeys",
    "RotateSigningKey",
    "StreamAudit",
    "GetTreeHead",
    "ProveInclusion",
    "ProveConsistency",
]


def test_reflection_lists_broker_and_health_services(channel: grpc.Channel) -> None:
    services = ReflectionClient(channel).list_services()
    assert "tokenbroker.v1.TokenBrokerService" in services
    assert "grpc.health.v1.Health" in services


def test_reflection_describes_every_rpc_with_its_documentation(channel: grpc.Channel) -> None:
    client = ReflectionClient(channel)
    methods = client.methods("tokenbroker.v1.TokenBrokerService")
    assert methods == [f"tokenbroker.v1.TokenBrokerService.{m}" for m in EVERY_RPC]
    for name in EVERY_RPC:
        method = client.describe(f"tokenbroker.v1.TokenBrokerService.{name}")
        assert method.input_type.full_name == f"tokenbroker.v1.{name}Request"
        # Request types resolve with their fields, as `grpcurl describe` shows them.
        assert client.describe(method.input_type.full_name).fields is not None
    assert client.describe("tokenbroker.v1.TokenBrokerService.StreamAudit").server_streaming


def test_reflection_client_can_call_without_stubs(channel: grpc.Channel, callers: Callers) -> None:
    client = ReflectionClient(channel)
    auth = callers.metadata(standard_accounts()["orchestrator"])  # what `grpcurl -H` sends
    started = client.call(
        "tokenbroker.v1.TokenBrokerService/StartRun",
        '{"pipeline": {"org": "acme", "project": "web", "pipeline": "ci"},'
        ' "permissionCeiling": [{"resource": "artifacts", "level": "read"}]}',
        metadata=auth,
    )
    run_id = started["run"]["runId"]
    fetched = client.call(
        "tokenbroker.v1.TokenBrokerService/GetRun", f'{{"runId": "{run_id}"}}', metadata=auth
    )
    assert fetched["run"]["state"] == "RUN_STATE_ACTIVE"
    assert fetched["run"]["pipeline"] == {"org": "acme", "project": "web", "pipeline": "ci"}


def test_health_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tokenbroker.v1.TokenBrokerService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_reports_not_serving_once_shutdown_begins(server: BrokerServer) -> None:
    server.health.enter_graceful_shutdown()
    with grpc.insecure_channel(server.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
