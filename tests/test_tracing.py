"""tokenbroker.tracing: how other services join a run's trace, across real gRPC calls."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as context_api
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from broker.api.handoff import traced_channel
from broker.api.server import BrokerServer, create_server
from broker.identity import Person, VerificationMethod
from broker.runs.model import PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from broker.telemetry.otel import Telemetry
from tests.accounts import root_channel
from tests.conftest import make_settings, standard_policy
from tests.otel_support import (
    ExplodingTracerProvider,
    InMemorySdk,
    attributes_of,
    in_memory_sdk,
    trace_id_of,
)
from tests.support import UNKNOWN_RUN_ID, rpc_error, start_run_request
from tokenbroker import tracing
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, executor_pb2, executor_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub


@pytest.fixture
def portal() -> Iterator[InMemorySdk]:
    recorded = in_memory_sdk("deploy-portal")
    yield recorded
    recorded.shutdown()


@pytest.fixture
def portal_stub(traced: BrokerServer, portal: InMemorySdk) -> Iterator[Stub]:
    """The portal's stub: its channel goes through the client interceptor."""
    with root_channel(traced) as channel:
        yield Stub(tracing.intercept_channel(channel, portal.tracer_provider))


def client_span(sdk: InMemorySdk, method: str) -> ReadableSpan:
    (span,) = [s for s in sdk.spans() if s.kind is SpanKind.CLIENT and s.name.endswith(method)]
    return span


def test_portal_client_span_and_broker_server_span_share_one_trace(
    portal_stub: Stub, portal: InMemorySdk, broker_sdk: InMemorySdk
) -> None:
    tracer = portal.tracer_provider.get_tracer("portal")
    with tracer.start_as_current_span("deploy for alice") as root:
        run = portal_stub.StartRun(start_run_request(), timeout=5).run
    client = client_span(portal, "/StartRun")
    server = broker_sdk.server_span("StartRun")
    assert trace_id_of(client) == trace_id_of(server)
    assert trace_id_of(server) == format(root.get_span_context().trace_id, "032x")
    assert server.parent is not None and client.context is not None
    assert server.parent.span_id == client.context.span_id
    attributes = attributes_of(client)
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "tokenbroker.v1.TokenBrokerService"
    assert attributes["rpc.method"] == "StartRun"
    assert attributes["rpc.grpc.status_code"] == 0
    # The broker's answer names the run; the client span records it.
    assert attributes["cicd.pipeline.run.id"] == run.run_id


def test_failed_call_marks_the_client_span_as_an_error(
    portal_stub: Stub, portal: InMemorySdk
) -> None:
    rpc_error(
        lambda: portal_stub.GetRun(broker_pb2.GetRunRequest(run_id=UNKNOWN_RUN_ID), timeout=5)
    )
    span = client_span(portal, "/GetRun")
    assert span.status.status_code is StatusCode.ERROR
    assert attributes_of(span)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_streaming_call_is_one_client_span_in_the_servers_trace(
    portal_stub: Stub, portal: InMemorySdk, broker_sdk: InMemorySdk
) -> None:
    portal_stub.StartRun(start_run_request(), timeout=5)
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(actions=["run.started"]), stop_at_head=True
    )
    assert len(list(portal_stub.StreamAudit(request, timeout=5))) == 1
    client = client_span(portal, "/StreamAudit")
    assert attributes_of(client)["rpc.grpc.status_code"] == 0
    assert trace_id_of(client) == trace_id_of(broker_sdk.server_span("StreamAudit"))


def test_existing_propagation_headers_are_replaced_not_duplicated(
    portal_stub: Stub, portal: InMemorySdk, broker_sdk: InMemorySdk
) -> None:
    stale = ("traceparent", "00-11111111111111111111111111111111-2222222222222222-01")
    portal_stub.StartRun(start_run_request(), metadata=(stale,), timeout=5)
    assert trace_id_of(broker_sdk.server_span("StartRun")) == trace_id_of(
        client_span(portal, "/StartRun")
    )


def test_a_client_span_records_the_servers_answer_never_the_callers_own_baggage(
    portal_stub: Stub, portal: InMemorySdk
) -> None:
    run_id = portal_stub.StartRun(start_run_request(), timeout=5).run.run_id
    claims = baggage.set_baggage("enduser.id", "mallory@evil.example")
    token = context_api.attach(baggage.set_baggage("cicd.pipeline.run.id", "r-forged", claims))
    try:
        # GetRun answers without baggage; StartRun answers with the new run's.
        portal_stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5)
        started = portal_stub.StartRun(start_run_request(), timeout=5).run
    finally:
        context_api.detach(token)
    assert "enduser.id" not in attributes_of(client_span(portal, "/GetRun"))
    assert "cicd.pipeline.run.id" not in attributes_of(client_span(portal, "/GetRun"))
    (_, second) = [s for s in portal.spans() if s.name.endswith("/StartRun")]
    assert attributes_of(second)["cicd.pipeline.run.id"] == started.run_id
    assert "enduser.id" not in attributes_of(second)  # a run without a person


def test_baggage_of_metadata_is_what_the_metadata_carries_and_nothing_else() -> None:
    token = context_api.attach(baggage.set_baggage("enduser.id", "mallory@evil.example"))
    try:
        assert tracing.baggage_of(()) == {}
        header = ("baggage", "cicd.pipeline.run.id=r-1")
        assert tracing.baggage_of((header,)) == {"cicd.pipeline.run.id": "r-1"}
    finally:
        context_api.detach(token)


# --- hand-off: the broker calls an executor ------------------------------------------------------


@dataclass
class Executor:
    """A sample executor: joins the trace with the library, stamps run baggage on its spans."""

    sdk: InMemorySdk
    target: str
    server: grpc.Server
    servicer: ExecutorServicer


class ExecutorServicer(executor_pb2_grpc.PipelineExecutorServiceServicer):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self.baggage_seen: list[dict[str, object]] = []

    def Execute(
        self, request: executor_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> executor_pb2.ExecuteResponse:
        self.baggage_seen.append(dict(baggage.get_all()))
        with self._tracer.start_as_current_span("run step build"):
            return executor_pb2.ExecuteResponse(accepted=True, execution_id="x-1")


@pytest.fixture
def executor() -> Iterator[Executor]:
    sdk = in_memory_sdk("executor", [tracing.baggage_span_processor()])
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[tracing.ServerTracingInterceptor(sdk.tracer_provider, sdk.meter_provider)],
    )
    servicer = ExecutorServicer(sdk.tracer_provider.get_tracer("executor"))
    executor_pb2_grpc.add_PipelineExecutorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Executor(sdk, f"127.0.0.1:{port}", server, servicer)
    server.stop(0).wait()
    sdk.shutdown()


def make_run(person: Person | None) -> Run:
    return Run(
        run_id="r-handoff",
        pipeline=PipelineRef("acme", "web", "deploy"),
        state=RunState.ACTIVE,
        create_time=0.0,
        deadline=3600.0,
        triggered_via="deploy-portal",
        permission_ceiling=PermissionSet.of({"artifacts": "read"}),
        on_behalf_of=person,
    )


ALICE = Person(
    subject="u-1001",
    issuer="https://idp.example.com",
    method=VerificationMethod.IDP_VERIFIED,
    evidence_sha256="0" * 64,
    email="alice@example.com",
)


def hand_off(telemetry: Telemetry, executor: Executor, run: Run, claims: Sequence[Any]) -> None:
    """Hand `run` over while the current context carries a caller's baggage `claims`."""
    context = None
    for key, value in claims:
        context = baggage.set_baggage(key, value, context)
    token = context_api.attach(context or context_api.get_current())
    try:
        with grpc.insecure_channel(executor.target) as channel:
            stub = executor_pb2_grpc.PipelineExecutorServiceStub(traced_channel(channel, telemetry))
            with telemetry.handing_off(run):
                assert stub.Execute(executor_pb2.ExecuteRequest(), timeout=5).accepted
    finally:
        context_api.detach(token)


def executor_spans(executor: Executor) -> tuple[ReadableSpan, ReadableSpan]:
    (server,) = [s for s in executor.sdk.spans() if s.kind is SpanKind.SERVER]
    (step,) = [s for s in executor.sdk.spans() if s.name == "run step build"]
    return server, step


def test_handoff_gives_the_executor_the_runs_person_never_a_callers_claim(
    executor: Executor, broker_sdk: InMemorySdk
) -> None:
    telemetry = Telemetry(broker_sdk.tracer_provider, broker_sdk.meter_provider)
    claims = [("enduser.id", "mallory@evil.example"), ("cicd.pipeline.run.id", "r-forged")]
    hand_off(telemetry, executor, make_run(ALICE), claims)
    (broker_client,) = [s for s in broker_sdk.spans() if s.kind is SpanKind.CLIENT]
    # The broker's own span of the hand-off names the run from its record.
    assert attributes_of(broker_client)["cicd.pipeline.run.id"] == "r-handoff"
    assert attributes_of(broker_client)["enduser.id"] == "alice@example.com"
    for span in executor_spans(executor):
        assert trace_id_of(span) == trace_id_of(broker_client)
        attributes = attributes_of(span)
        assert attributes["cicd.pipeline.run.id"] == "r-handoff"
        assert attributes["cicd.pipeline.name"] == "acme/web/deploy"
        assert attributes["enduser.id"] == "alice@example.com"
        assert attributes["tokenbroker.triggered_via"] == "deploy-portal"


def test_handoff_of_a_run_without_person_drops_a_claimed_person(
    executor: Executor, broker_sdk: InMemorySdk
) -> None:
    telemetry = Telemetry(broker_sdk.tracer_provider, broker_sdk.meter_provider)
    hand_off(telemetry, executor, make_run(None), [("enduser.id", "mallory@evil.example")])
    for span in executor_spans(executor):
        assert "enduser.id" not in attributes_of(span)
        assert attributes_of(span)["cicd.pipeline.run.id"] == "r-handoff"


def test_other_baggage_passes_through_a_handoff_untouched(
    executor: Executor, broker_sdk: InMemorySdk
) -> None:
    telemetry = Telemetry(broker_sdk.tracer_provider, broker_sdk.meter_provider)
    hand_off(telemetry, executor, make_run(None), [("deployment.environment", "prod")])
    assert executor.servicer.baggage_seen == [
        {
            "deployment.environment": "prod",
            "cicd.pipeline.run.id": "r-handoff",
            "cicd.pipeline.name": "acme/web/deploy",
            "tokenbroker.triggered_via": "deploy-portal",
        }
    ]


# --- telemetry never fails a call ----------------------------------------------------------------


def test_a_broken_tracer_fails_no_call(tmp_path: Path) -> None:
    server = create_server(
        make_settings(tmp_path / "data", policy=standard_policy(tmp_path)),
        tracer_provider=ExplodingTracerProvider(),
    )
    server.start()
    try:
        with root_channel(server) as channel:
            stub = Stub(tracing.intercept_channel(channel, ExplodingTracerProvider()))
            run = stub.StartRun(start_run_request(), timeout=5).run
            assert stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run
            request = broker_pb2.StreamAuditRequest(
                filter=broker_pb2.AuditFilter(run_id=run.run_id), stop_at_head=True
            )
            assert len(list(stub.StreamAudit(request))) == 1
    finally:
        server.stop(grace=0.5)
