"""The broker's own telemetry: server spans named after the run and its people (from the
broker's records, never from baggage), trace ids in audit events and logs, metrics."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.audit.events import Action
from broker.auth.authz import Op
from broker.context import CallContext
from broker.identity import Person, Principal, PrincipalKind, VerificationMethod
from broker.runs.lifecycle import RunSpec
from broker.runs.model import PipelineRef, Run
from broker.runs.permissions import PermissionSet
from broker.store import RunQuery
from broker.store.memory import MemoryStore
from broker.telemetry.logs import JsonFormatter, TraceContext
from broker.telemetry.otel import annotate_call
from tests.accounts import root_channel
from tests.conftest import make_settings, standard_policy
from tests.otel_support import InMemorySdk, attributes_of, trace_id_of
from tests.support import UNKNOWN_RUN_ID, ShiftedClock, reap, rpc_error, start_run_request
from tokenbroker import tracing
from tokenbroker.defaults import SERVICE_NAME
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = ("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01")
SPOOFED_BAGGAGE = ("baggage", "enduser.id=mallory%40evil.example,cicd.pipeline.run.id=r-forged")


@pytest.fixture
def traced_stub(traced: BrokerServer) -> Iterator[Stub]:
    with root_channel(traced) as channel:
        yield Stub(channel)


def audit_events(stub: Stub) -> list[broker_pb2.StreamAuditResponse]:
    return list(stub.StreamAudit(broker_pb2.StreamAuditRequest(stop_at_head=True), timeout=5))


def alice() -> Person:
    return Person(
        subject="u-1001",
        issuer="https://idp.example.com",
        method=VerificationMethod.IDP_VERIFIED,
        evidence_sha256="0" * 64,
        email="alice@example.com",
    )


def test_start_run_span_follows_rpc_conventions_and_names_the_run(
    traced_stub: Stub, broker_sdk: InMemorySdk
) -> None:
    response, call = traced_stub.StartRun.with_call(start_run_request(), timeout=5)
    span = broker_sdk.server_span("StartRun")
    attributes = attributes_of(span)
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "tokenbroker.v1.TokenBrokerService"
    assert attributes["rpc.method"] == "StartRun"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["cicd.pipeline.run.id"] == response.run.run_id
    assert attributes["cicd.pipeline.name"] == "acme/payments/deploy"
    assert attributes["tokenbroker.principal.kind"] == "service_account"
    assert attributes["tokenbroker.principal"] == "root"
    assert "enduser.id" not in attributes, "StartRun runs have no person"
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == SERVICE_NAME
    # The caller learns the run's trace context with the answer.
    assert tracing.run_baggage_of(call.trailing_metadata()) == {
        "cicd.pipeline.run.id": response.run.run_id,
        "cicd.pipeline.name": "acme/payments/deploy",
        "tokenbroker.triggered_via": "root",
    }


def test_revoke_run_span_names_the_run_it_ended(traced_stub: Stub, broker_sdk: InMemorySdk) -> None:
    run = traced_stub.StartRun(start_run_request(), timeout=5).run
    traced_stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id), timeout=5)
    attributes = attributes_of(broker_sdk.server_span("RevokeRun"))
    assert attributes["cicd.pipeline.run.id"] == run.run_id
    assert attributes["cicd.pipeline.name"] == "acme/payments/deploy"
    assert attributes["rpc.grpc.status_code"] == 0


def test_audit_events_carry_the_trace_id_of_the_call(
    traced_stub: Stub, broker_sdk: InMemorySdk
) -> None:
    run = traced_stub.StartRun(start_run_request(), metadata=(TRACEPARENT,), timeout=5).run
    span = broker_sdk.server_span("StartRun")
    assert trace_id_of(span) == CALLER_TRACE_ID
    assert span.parent is not None and format_span_id(span.parent.span_id) == CALLER_SPAN_ID
    (started,) = [e.event for e in audit_events(traced_stub) if e.event.run_id == run.run_id]
    assert started.trace_id == CALLER_TRACE_ID


def test_audit_events_carry_the_callers_trace_id_even_with_telemetry_off(
    stub: Stub, root_stub: Stub
) -> None:
    run = stub.StartRun(start_run_request(), metadata=(TRACEPARENT,), timeout=5).run
    (started,) = [e.event for e in audit_events(root_stub) if e.event.run_id == run.run_id]
    assert started.trace_id == CALLER_TRACE_ID


def test_spoofed_baggage_person_reaches_no_record_no_audit_event_and_no_span(
    traced_stub: Stub, broker_sdk: InMemorySdk
) -> None:
    response, call = traced_stub.StartRun.with_call(
        start_run_request(), metadata=(SPOOFED_BAGGAGE,), timeout=5
    )
    run_id = response.run.run_id
    assert not response.run.HasField("on_behalf_of")
    read = traced_stub.GetRun(
        broker_pb2.GetRunRequest(run_id=run_id), metadata=(SPOOFED_BAGGAGE,), timeout=5
    )
    assert not read.run.HasField("on_behalf_of")
    assert read.run.attribution.executed_by != "mallory@evil.example"
    events = audit_events(traced_stub)
    assert events
    assert all(not e.event.HasField("on_behalf_of") for e in events)
    assert "mallory" not in str(events)
    for span in broker_sdk.spans():
        assert "mallory" not in repr(attributes_of(span)), span.name
        assert "r-forged" not in repr(attributes_of(span)), span.name
    assert attributes_of(broker_sdk.server_span("StartRun"))["cicd.pipeline.run.id"] == run_id
    reply = tracing.baggage_of(call.trailing_metadata())
    assert reply["cicd.pipeline.run.id"] == run_id
    assert "enduser.id" not in reply


def test_person_on_the_span_comes_from_the_run_record_not_from_baggage(
    traced: BrokerServer, traced_stub: Stub, broker_sdk: InMemorySdk
) -> None:
    portal = Principal(PrincipalKind.SERVICE_ACCOUNT, "deploy-portal")
    spec = RunSpec(PipelineRef("acme", "web", "deploy"), PermissionSet.of({"artifacts": "read"}))
    run = traced.broker.runs.start(
        CallContext(principal=portal),
        spec,
        person=alice(),
        action=Action.RUN_EXECUTED_ON_BEHALF,
        op=Op.EXECUTE_ON_BEHALF,
    ).run
    traced_stub.GetRun(
        broker_pb2.GetRunRequest(run_id=run.run_id), metadata=(SPOOFED_BAGGAGE,), timeout=5
    )
    attributes = attributes_of(broker_sdk.server_span("GetRun"))
    assert attributes["enduser.id"] == "alice@example.com"
    assert attributes["tokenbroker.verification_method"] == "idp_verified"
    assert attributes["tokenbroker.triggered_via"] == "deploy-portal"
    assert attributes["cicd.pipeline.run.id"] == run.run_id


def test_refused_call_records_its_status_code_without_blaming_the_server(
    traced_stub: Stub, broker_sdk: InMemorySdk
) -> None:
    error = rpc_error(
        lambda: traced_stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=UNKNOWN_RUN_ID), timeout=5)
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND
    span = broker_sdk.server_span("RevokeRun")
    assert attributes_of(span)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert attributes_of(span)["error.type"] == "NOT_FOUND"
    # Semantic conventions: a client's mistake is not a server error.
    assert span.status.status_code is StatusCode.UNSET


class BrokenStore(MemoryStore):
    def list_runs(self, query: RunQuery) -> list[Run]:
        raise RuntimeError("disk on fire")


def test_internal_error_marks_the_span_and_its_log_line_carries_the_trace(
    tmp_path: Path, broker_sdk: InMemorySdk
) -> None:
    settings = make_settings(tmp_path / "data", policy=standard_policy(tmp_path))
    broker = build_broker(
        settings,
        store=BrokenStore(),
        tracer_provider=broker_sdk.tracer_provider,
        meter_provider=broker_sdk.meter_provider,
    )
    server = create_server(settings, broker=broker)
    server.start()
    with captured_json_logs("broker.api.interceptor") as lines:
        try:
            with root_channel(server) as channel:
                error = rpc_error(
                    lambda: Stub(channel).ListRuns(broker_pb2.ListRunsRequest(), timeout=5)
                )
        finally:
            server.stop(grace=0.5)
    assert error.code() is grpc.StatusCode.INTERNAL
    span = broker_sdk.server_span("ListRuns")
    assert span.status.status_code is StatusCode.ERROR
    assert attributes_of(span)["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    (failed,) = [line for line in lines() if line["msg"] == "call failed"]
    assert failed["trace_id"] == trace_id_of(span)
    assert span.context is not None and failed["span_id"] == format_span_id(span.context.span_id)


def test_stream_audit_span_ends_with_the_stream_and_names_the_filtered_run(
    traced_stub: Stub, broker_sdk: InMemorySdk
) -> None:
    run = traced_stub.StartRun(start_run_request(), timeout=5).run
    request = broker_pb2.StreamAuditRequest(
        stop_at_head=True, filter=broker_pb2.AuditFilter(run_id=run.run_id)
    )
    assert len(list(traced_stub.StreamAudit(request, timeout=5))) == 1
    attributes = attributes_of(broker_sdk.server_span("StreamAudit"))
    assert attributes["cicd.pipeline.run.id"] == run.run_id
    assert attributes["rpc.grpc.status_code"] == 0


def test_metrics_count_runs_revocations_and_latency_but_never_label_a_run(
    traced_stub: Stub, broker_sdk: InMemorySdk
) -> None:
    run = traced_stub.StartRun(start_run_request(), timeout=5).run
    for _ in range(2):
        traced_stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id), timeout=5)
    traced_stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5)

    assert broker_sdk.total("tokenbroker.runs.started", **{"tokenbroker.run.delegated": False}) == 1
    assert broker_sdk.total("tokenbroker.runs.ended") == 1
    assert (
        broker_sdk.total(
            "tokenbroker.runs.revocations", **{"tokenbroker.revocation.already_ended": False}
        )
        == 1
    )
    assert (
        broker_sdk.total(
            "tokenbroker.runs.revocations", **{"tokenbroker.revocation.already_ended": True}
        )
        == 1
    )
    latency = {
        p.attributes["rpc.method"]: p.count for p in broker_sdk.points("rpc.server.call.duration")
    }
    assert latency == {"StartRun": 1, "RevokeRun": 2, "GetRun": 1}
    data = broker_sdk.reader.get_metrics_data()
    assert data is not None
    labels = repr(
        [
            dict(p.attributes or {})
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            for p in m.data.data_points
        ]
    )
    assert run.run_id not in labels


def test_expired_runs_are_counted_by_reason(
    traced_stub: Stub, traced: BrokerServer, broker_sdk: InMemorySdk, clock: ShiftedClock
) -> None:
    second = duration_pb2.Duration(seconds=1)
    traced_stub.StartRun(start_run_request(deadline=second), timeout=5)
    traced_stub.StartRun(start_run_request(lease=second), timeout=5)
    traced_stub.StartRun(start_run_request(lease=second), timeout=5)
    clock.advance(1.5)
    reap(traced)
    expired = "tokenbroker.runs.expired"
    assert broker_sdk.total(expired, **{"tokenbroker.run.expiry_reason": "deadline"}) == 1
    assert broker_sdk.total(expired, **{"tokenbroker.run.expiry_reason": "lease"}) == 2


def test_audit_subscribers_and_lag_are_observed(traced_stub: Stub, broker_sdk: InMemorySdk) -> None:
    traced_stub.StartRun(start_run_request(), timeout=5)
    request = broker_pb2.StreamAuditRequest(filter=broker_pb2.AuditFilter(actions=["run.started"]))
    stream = traced_stub.StreamAudit(request, timeout=10)
    try:
        assert next(stream).event.action == "run.started"
        assert broker_sdk.total("tokenbroker.audit.subscribers") == 1
    finally:
        stream.cancel()
    (lag,) = broker_sdk.points("tokenbroker.audit.stream.lag")
    assert lag.count == 1 and lag.sum == 0


def test_token_helpers_count_by_audience_outcome_and_result(
    traced: BrokerServer, broker_sdk: InMemorySdk
) -> None:
    telemetry = traced.broker.telemetry
    telemetry.token_issued("payments-api", "issued")
    telemetry.token_issued("payments-api", "refused")
    telemetry.token_verified("expired")
    issued = {"tokenbroker.token.audience": "payments-api", "tokenbroker.token.outcome": "issued"}
    assert broker_sdk.total("tokenbroker.tokens.issued", **issued) == 1
    assert broker_sdk.total("tokenbroker.tokens.issued") == 2
    assert (
        broker_sdk.total(
            "tokenbroker.tokens.verifications", **{"tokenbroker.verification.result": "expired"}
        )
        == 1
    )


def test_principal_name_and_method_are_recorded_from_authentication(
    broker_sdk: InMemorySdk,
) -> None:
    tracer = broker_sdk.tracer_provider.get_tracer("test")
    portal = Principal(PrincipalKind.SERVICE_ACCOUNT, "deploy-portal", auth_method="mtls")
    with tracer.start_as_current_span("call"):
        annotate_call(CallContext(principal=portal, request_id="req-1"))
    attributes = attributes_of(broker_sdk.spans()[0])
    assert attributes["tokenbroker.principal"] == "deploy-portal"
    assert attributes["tokenbroker.principal.kind"] == "service_account"
    assert attributes["tokenbroker.principal.auth_method"] == "mtls"
    assert attributes["tokenbroker.request_id"] == "req-1"


def test_log_lines_carry_the_trace_and_span_of_the_active_span(broker_sdk: InMemorySdk) -> None:
    log = logging.getLogger("tests.telemetry.logs")
    with captured_json_logs("tests.telemetry.logs") as lines:
        with broker_sdk.tracer_provider.get_tracer("test").start_as_current_span("work") as span:
            log.info("inside")
        log.info("outside")
    inside, outside = lines()
    context = span.get_span_context()
    assert inside["trace_id"] == format_trace_id(context.trace_id)
    assert inside["span_id"] == format_span_id(context.span_id)
    assert "trace_id" not in outside and "span_id" not in outside


class captured_json_logs:
    """Collect one logger's lines as the broker formats them (JSON + trace context)."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)
        self._stream = io.StringIO()
        self._handler = logging.StreamHandler(self._stream)
        self._handler.setFormatter(JsonFormatter())
        self._handler.addFilter(TraceContext())
        self._level = self._logger.level

    def __enter__(self) -> captured_json_logs:
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)

    def __call__(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self._stream.getvalue().splitlines()]
