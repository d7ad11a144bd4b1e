"""A CI step joins the pipeline's trace: TRACEPARENT in the environment (OpenTelemetry's
environment-variable carrier) makes the CLI's and the client library's calls — and so the
broker's spans — part of the trace the runner started."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from broker.api.server import BrokerServer, create_server
from tests.conftest import make_settings
from tests.otel_support import (
    InMemorySdk,
    OtlpReceiver,
    attributes_of,
    in_memory_sdk,
    otlp_attributes,
    start_otlp_receiver,
    trace_id_of,
)
from tests.support import REPO, BrokerProcess, start_broker_process
from tokenbroker import BrokerClient, tracing
from tokenbroker.aio import AsyncBrokerClient
from tokenbroker.credentials import dev_admin_credentials

START_RUN = "tokenbroker.v1.TokenBrokerService/StartRun"
CLI_COMMAND = "token-broker runs start"


def pipeline_traceparent() -> tuple[str, str, str]:
    """(TRACEPARENT, its trace id, its span id): the runner's span of the pipeline step."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    running = start_otlp_receiver()
    yield running
    running.stop()


@pytest.fixture
def exporting_broker(tmp_path: Path, receiver: OtlpReceiver) -> Iterator[BrokerProcess]:
    broker = start_broker_process(
        tmp_path / "data",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_METRICS_EXPORTER": "none"},
    )
    try:
        yield broker
    finally:
        if broker.process.poll() is None:
            broker.terminate_and_wait()


def run_cli_process(broker: BrokerProcess, env: dict[str, str]) -> None:
    """`token-broker runs start` as a CI step would run it, in a process of its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACE"))}
    finished = subprocess.run(
        [
            *(sys.executable, "-m", "broker", "runs", "start", "acme/web/deploy"),
            *("--ceiling", "artifacts=write", "--deadline", "1h", "--json"),
            *("--target", broker.target, "--data-dir", str(broker.data_dir)),
        ],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert finished.stderr == ""


def broker_server_span(receiver: OtlpReceiver) -> Any:
    """The broker's StartRun span (the CLI's CLIENT span has the same name)."""
    receiver.wait_for_span(START_RUN)
    (span,) = [
        span
        for resource, span in receiver.spans()
        if span.name == START_RUN and resource["service.name"] == "token-broker"
    ]
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    return span


def span_id_of(span: Any) -> str:
    return str(span.span_id.hex())


def parent_id_of(span: Any) -> str:
    return str(span.parent_span_id.hex())


@pytest.mark.slow
def test_cli_with_traceparent_puts_its_span_and_the_brokers_into_the_pipeline_trace(
    exporting_broker: BrokerProcess, receiver: OtlpReceiver
) -> None:
    traceparent, trace_id, step_span_id = pipeline_traceparent()

    run_cli_process(
        exporting_broker,
        {
            "TRACEPARENT": traceparent,
            "TRACESTATE": "ci=step-7",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        },
    )
    assert exporting_broker.terminate_and_wait() == 0, exporting_broker.logs()

    server_span = broker_server_span(receiver)
    command_resource, command = receiver.wait_for_span(CLI_COMMAND)
    spans = {span_id_of(span): (resource, span) for resource, span in receiver.spans()}
    client_resource, client = spans[parent_id_of(server_span)]
    # runner's step span → CLI command span → CLI client span → broker server span
    assert server_span.trace_id.hex() == trace_id
    assert (client.name, client.kind) == (START_RUN, trace_pb2.Span.SPAN_KIND_CLIENT)
    assert client_resource["service.name"] == command_resource["service.name"]
    assert command_resource["service.name"] == "token-broker-cli"
    assert parent_id_of(client) == span_id_of(command)
    assert parent_id_of(command) == step_span_id
    assert command.trace_id.hex() == trace_id
    assert command.trace_state == "ci=step-7"
    assert otlp_attributes(command.attributes)["process.exit.code"] == 0
    expected = {"server.address": "127.0.0.1", "server.port": exporting_broker.port}
    for span in (client, server_span):
        attributes = otlp_attributes(span.attributes)
        assert {key: attributes.get(key) for key in expected} == expected


@pytest.mark.slow
def test_cli_with_traceparent_and_no_exporter_still_parents_the_brokers_span_on_the_step(
    exporting_broker: BrokerProcess, receiver: OtlpReceiver
) -> None:
    traceparent, trace_id, step_span_id = pipeline_traceparent()

    run_cli_process(exporting_broker, {"TRACEPARENT": traceparent})
    assert exporting_broker.terminate_and_wait() == 0, exporting_broker.logs()

    server_span = broker_server_span(receiver)
    assert server_span.trace_id.hex() == trace_id
    assert parent_id_of(server_span) == step_span_id
    assert not [s for _, s in receiver.spans() if s.name == CLI_COMMAND]


# --- the client library, in-process ---------------------------------------------------------------


@pytest.fixture
def traced_broker(tmp_path: Path) -> Iterator[tuple[BrokerServer, InMemorySdk]]:
    sdk = in_memory_sdk("token-broker")
    server = create_server(make_settings(tmp_path / "data"), tracer_provider=sdk.tracer_provider)
    server.start()
    try:
        yield server, sdk
    finally:
        server.stop(grace=0.5)
        sdk.shutdown()


def start_a_run(server: BrokerServer, **client_options: Any) -> None:
    credentials = dev_admin_credentials(server.broker.settings.data_dir)
    with BrokerClient(server.target, credentials=credentials, **client_options) as client:
        client.start_run("acme", "web", "deploy", ceiling={"artifacts": "read"}, deadline=600)


def test_client_library_joins_the_trace_in_traceparent(
    traced_broker: tuple[BrokerServer, InMemorySdk], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, sdk = traced_broker
    traceparent, trace_id, step_span_id = pipeline_traceparent()
    monkeypatch.setenv("TRACEPARENT", traceparent)

    start_a_run(server)

    span = sdk.server_span("StartRun")
    assert trace_id_of(span) == trace_id
    assert span.parent is not None and format_span_id(span.parent.span_id) == step_span_id


def test_client_library_with_a_provider_records_a_client_span_between_step_and_broker(
    traced_broker: tuple[BrokerServer, InMemorySdk], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, sdk = traced_broker
    traceparent, trace_id, step_span_id = pipeline_traceparent()
    monkeypatch.setenv("TRACEPARENT", traceparent)
    step = in_memory_sdk("pipeline-step")
    try:
        start_a_run(server, tracer_provider=step.tracer_provider)
    finally:
        step.shutdown()

    (client,) = step.spans()
    server_span = sdk.server_span("StartRun")
    assert client.kind is SpanKind.CLIENT
    assert client.parent is not None and format_span_id(client.parent.span_id) == step_span_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client.context.span_id
    assert trace_id_of(server_span) == trace_id_of(client) == trace_id
    assert attributes_of(client)["server.port"] == server.port
    assert attributes_of(server_span)["server.address"] == "127.0.0.1"


def test_client_library_without_traceparent_starts_no_trace_of_its_own(
    traced_broker: tuple[BrokerServer, InMemorySdk], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, sdk = traced_broker
    monkeypatch.delenv("TRACEPARENT", raising=False)

    start_a_run(server)

    span = sdk.server_span("StartRun")
    assert span.parent is None  # the broker's span is a root: nobody's trace to join


def test_a_malformed_traceparent_is_ignored() -> None:
    assert tracing.environment_context({"TRACEPARENT": "00-not-a-trace-01"}) is None
    invalid_trace_id = "00-" + "0" * 32 + "-" + "1" * 16 + "-01"
    assert tracing.environment_context({"TRACEPARENT": invalid_trace_id}) is None
    traceparent, trace_id, _ = pipeline_traceparent()
    joined = tracing.environment_context({"TRACEPARENT": traceparent, "BAGGAGE": "ci.job=7"})
    assert joined is not None
    assert format_trace_id(trace.get_current_span(joined).get_span_context().trace_id) == trace_id
    assert baggage.get_baggage("ci.job", joined) == "7"


def test_async_client_library_joins_the_trace_in_traceparent_too(
    traced_broker: tuple[BrokerServer, InMemorySdk], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, sdk = traced_broker
    traceparent, trace_id, step_span_id = pipeline_traceparent()
    monkeypatch.setenv("TRACEPARENT", traceparent)
    credentials = dev_admin_credentials(server.broker.settings.data_dir)

    async def start_and_follow() -> None:
        async with AsyncBrokerClient(server.target, credentials=credentials) as client:
            started = await client.start_run(
                "acme", "web", "deploy", ceiling={"artifacts": "read"}, deadline=600
            )
            events = client.stream_audit(run_id=started.run.run_id, follow=False)
            assert [event.action async for event in events] == ["run.started"]

    asyncio.run(start_and_follow())

    for method in ("StartRun", "StreamAudit"):
        span = sdk.server_span(method)
        assert trace_id_of(span) == trace_id, method
        assert span.parent is not None and format_span_id(span.parent.span_id) == step_span_id


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:50051", {"server.address": "127.0.0.1", "server.port": 50051}),
        ("[::1]:7000", {"server.address": "::1", "server.port": 7000}),
        ("dns:///broker.internal:443", {"server.address": "broker.internal", "server.port": 443}),
        ("10.0.0.5:50051,10.0.0.6:50051", {}),  # replicas: no one server to name
        ("broker.internal", {"server.address": "broker.internal"}),
    ],
)
def test_client_spans_name_the_server_of_the_channel_target(
    target: str, expected: dict[str, object]
) -> None:
    assert tracing.target_attributes(target) == expected


def test_a_server_on_a_wildcard_address_is_named_by_its_host_name() -> None:
    named = tracing.listen_attributes("0.0.0.0", 50051)
    assert named["server.port"] == 50051
    assert named["server.address"] not in ("", "0.0.0.0")
    assert tracing.listen_attributes("[::1]", 7)["server.address"] == "::1"
