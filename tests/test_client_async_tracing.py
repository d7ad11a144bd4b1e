"""AsyncBrokerClient records CLIENT spans as BrokerClient does: one per call (per attempt of
a retried one), its context the parent of the broker's SERVER span, ended with the call's
status — for an audit stream when the stream ends or is cancelled."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from broker.api.server import BrokerServer
from tests.clientsupport import FAST_RETRY, FlakyBroker, client_credentials, serving
from tests.otel_support import (
    ExplodingTracerProvider,
    InMemorySdk,
    attributes_of,
    in_memory_sdk,
    trace_id_of,
)
from tests.support import UNKNOWN_RUN_ID, eventually, eventually_async
from tokenbroker import AsyncBrokerClient, BrokerClient, NotFound, tracing
from tokenbroker.client import tracing_wanted
from tokenbroker.v1 import broker_pb2, types_pb2

METHOD = "tokenbroker.v1.TokenBrokerService/"
Scenario = Callable[[AsyncBrokerClient], Awaitable[None]]


@pytest.fixture(autouse=True)
def no_trace_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans here start from nothing: a TRACEPARENT of the test runner's would parent them."""
    monkeypatch.delenv("TRACEPARENT", raising=False)


@pytest.fixture
def step() -> Iterator[InMemorySdk]:
    """The calling service's (a pipeline step's) own OpenTelemetry SDK."""
    recorded = in_memory_sdk("pipeline-step")
    yield recorded
    recorded.shutdown()


def run_with_client(server: BrokerServer, scenario: Scenario, **options: Any) -> None:
    """Run `scenario` in a fresh event loop with a client of `server` created inside it."""

    async def main() -> None:
        credentials = client_credentials(server)
        async with AsyncBrokerClient(server.target, credentials=credentials, **options) as client:
            await scenario(client)

    asyncio.run(main())


def client_spans(sdk: InMemorySdk, method: str) -> list[ReadableSpan]:
    return [s for s in sdk.spans() if s.kind is SpanKind.CLIENT and s.name == METHOD + method]


def assert_parent_of(client: ReadableSpan, server: ReadableSpan) -> None:
    assert trace_id_of(server) == trace_id_of(client)
    assert server.parent is not None and client.context is not None
    assert server.parent.span_id == client.context.span_id


def test_an_async_call_is_one_client_span_whose_child_is_the_brokers_server_span(
    traced: BrokerServer, broker_sdk: InMemorySdk, step: InMemorySdk
) -> None:
    started: list[str] = []

    async def scenario(client: AsyncBrokerClient) -> None:
        run = await client.start_run("acme", "web", "deploy", ceiling={"artifacts": "read"})
        started.append(run.run.run_id)
        # Ended before the await returned: no waiting for it.
        assert len(client_spans(step, "StartRun")) == 1

    run_with_client(traced, scenario, tracer_provider=step.tracer_provider)

    (client,) = step.spans()
    assert client.kind is SpanKind.CLIENT and client.parent is None
    assert_parent_of(client, broker_sdk.server_span("StartRun"))
    attributes = attributes_of(client)
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "tokenbroker.v1.TokenBrokerService"
    assert attributes["rpc.method"] == "StartRun"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == traced.port
    assert client.status.status_code is StatusCode.UNSET
    # The broker's answer names the run (trailing baggage); the client span records it.
    assert attributes["cicd.pipeline.run.id"] == started[0]


def test_a_failed_async_call_records_its_status_code(
    traced: BrokerServer, broker_sdk: InMemorySdk, step: InMemorySdk
) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        with pytest.raises(NotFound):
            await client.get_run(UNKNOWN_RUN_ID)

    run_with_client(traced, scenario, tracer_provider=step.tracer_provider)

    (client,) = client_spans(step, "GetRun")
    attributes = attributes_of(client)
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert attributes["rpc.response.status_code"] == "NOT_FOUND"
    assert attributes["error.type"] == "NOT_FOUND"
    # As the synchronous client's: every code but OK is an error on a CLIENT span.
    assert client.status.status_code is StatusCode.ERROR
    assert_parent_of(client, broker_sdk.server_span("GetRun"))


def test_an_async_audit_streams_span_ends_when_the_stream_is_cancelled(
    traced: BrokerServer, broker_sdk: InMemorySdk, step: InMemorySdk
) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        await client.start_run("acme", "web", "deploy", ceiling={"artifacts": "read"})
        stream = client.stream_audit(actions=["run.started"])
        first = await anext(stream)
        assert first.action == "run.started"
        # Following the log: the call, and so its span, is still going.
        assert client_spans(step, "StreamAudit") == []
        stream.cancel()
        await eventually_async(
            lambda: client_spans(step, "StreamAudit"), what="the stream's span to end"
        )

    run_with_client(traced, scenario, tracer_provider=step.tracer_provider)

    (client,) = client_spans(step, "StreamAudit")
    assert attributes_of(client)["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert client.status.status_code is StatusCode.ERROR
    # The broker ends its span once it notices the cancellation (it checks twice a second).
    (server,) = eventually(
        lambda: broker_sdk.server_spans("StreamAudit"), what="the broker's span to end"
    )
    assert_parent_of(client, server)


def test_an_async_audit_stream_that_reaches_the_head_ends_its_span_ok(
    traced: BrokerServer, broker_sdk: InMemorySdk, step: InMemorySdk
) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        run = await client.start_run("acme", "web", "deploy", ceiling={"artifacts": "read"})
        events = client.stream_audit(run_id=run.run.run_id, follow=False)
        assert [event.action async for event in events] == ["run.started"]
        await eventually_async(
            lambda: client_spans(step, "StreamAudit"), what="the stream's span to end"
        )

    run_with_client(traced, scenario, tracer_provider=step.tracer_provider)

    (client,) = client_spans(step, "StreamAudit")
    assert attributes_of(client)["rpc.grpc.status_code"] == 0
    assert client.status.status_code is StatusCode.UNSET
    assert_parent_of(client, broker_sdk.server_span("StreamAudit"))


def test_without_a_provider_or_a_trace_to_join_the_async_client_has_no_interceptor(
    traced: BrokerServer, broker_sdk: InMemorySdk
) -> None:
    assert not tracing_wanted(None)
    assert tracing.aio_client_interceptors(None, target=traced.target) == []

    async def scenario(client: AsyncBrokerClient) -> None:
        await client.start_run("acme", "web", "deploy", ceiling={"artifacts": "read"})

    run_with_client(traced, scenario)

    span = broker_sdk.server_span("StartRun")
    assert span.parent is None  # the broker's span is a root: no client span, no trace joined


def test_each_attempt_of_a_retried_call_is_a_span_of_its_own_in_both_clients(
    step: InMemorySdk,
) -> None:
    flaky = FlakyBroker(failures=2)
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]

    async def get_run(target: str) -> None:
        options: dict[str, Any] = {"retry": FAST_RETRY, "tracer_provider": step.tracer_provider}
        async with AsyncBrokerClient(target, **options) as client:
            await client.get_run("r-1")

    with serving(flaky) as target:
        asyncio.run(get_run(target))
        attempts = [attributes_of(s)["rpc.grpc.status_code"] for s in client_spans(step, "GetRun")]
        assert attempts == [unavailable, unavailable, 0]
        step.exporter.clear()
        flaky.requests.clear()
        with BrokerClient(target, retry=FAST_RETRY, tracer_provider=step.tracer_provider) as sync:
            sync.get_run("r-1")
        synchronous = [attributes_of(s)["rpc.grpc.status_code"] for s in step.spans()]
        assert synchronous == attempts
    assert flaky.attempts("GetRun") == 3


def test_a_broken_tracer_fails_no_async_call(traced: BrokerServer) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        run = await client.start_run("acme", "web", "deploy", ceiling={"artifacts": "read"})
        assert (await client.get_run(run.run.run_id)).run.run_id == run.run.run_id
        events = client.stream_audit(run_id=run.run.run_id, follow=False)
        assert [event.action async for event in events] == ["run.started"]

    run_with_client(traced, scenario, tracer_provider=ExplodingTracerProvider())


class StalledBroker(FlakyBroker):
    """GetRun answers only once released, and notes whether its caller went away meanwhile."""

    def __init__(self) -> None:
        super().__init__(failures=0)
        self.called = threading.Event()
        self.release = threading.Event()
        self.caller_left = threading.Event()

    def GetRun(
        self, request: broker_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.GetRunResponse:
        self.called.set()
        context.add_callback(self.caller_left.set)
        self.release.wait(timeout=60)  # released at the end of the test at the latest
        return broker_pb2.GetRunResponse(run=types_pb2.Run(run_id=request.run_id))


def test_an_async_call_whose_caller_is_cancelled_ends_its_span_and_the_call(
    step: InMemorySdk,
) -> None:
    stalled = StalledBroker()

    async def cancel_a_waiting_call(target: str) -> None:
        options: dict[str, Any] = {"timeout": 60, "tracer_provider": step.tracer_provider}
        async with AsyncBrokerClient(target, **options) as client:  # no deadline meanwhile
            waiting = asyncio.ensure_future(client.get_run("r-1"))
            await eventually_async(stalled.called.is_set, what="the call to reach the broker")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            (span,) = client_spans(step, "GetRun")  # ended as the cancellation went through
            cancelled = grpc.StatusCode.CANCELLED.value[0]
            assert attributes_of(span)["rpc.grpc.status_code"] == cancelled
            await eventually_async(stalled.caller_left.is_set, what="the broker to see it go")

    try:
        with serving(stalled) as target:
            asyncio.run(cancel_a_waiting_call(target))
    finally:
        stalled.release.set()
