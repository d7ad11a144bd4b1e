"""OpenTelemetry test helpers: in-memory SDK providers per service, and tiny OTLP receivers
(gRPC and HTTP, on 127.0.0.1 port 0; either can refuse metrics like a traces-only collector).

Nothing here touches the OpenTelemetry globals: each "service" in a test gets its own
providers, passed in explicitly, and shuts them down afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_trace_id


@dataclass
class InMemorySdk:
    """One service's providers, recording into memory."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def server_spans(self, method: str) -> list[ReadableSpan]:
        return [
            s
            for s in self.spans()
            if s.kind is SpanKind.SERVER and s.name == f"tokenbroker.v1.TokenBrokerService/{method}"
        ]

    def server_span(self, method: str) -> ReadableSpan:
        (span,) = self.server_spans(method)
        return span

    def points(self, metric: str) -> list[Any]:
        """Data points of one metric (all of them, any attributes)."""
        found: list[Any] = []
        data = self.reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else ():
            for scope in resource_metrics.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        found.extend(m.data.data_points)
        return found

    def total(self, metric: str, **attributes: object) -> float:
        """Sum of a counter's points whose attributes include `attributes`."""
        total = 0.0
        for point in self.points(metric):
            labels = dict(point.attributes or {})
            if isinstance(point, NumberDataPoint) and all(
                labels.get(k) == v for k, v in attributes.items()
            ):
                total += point.value
        return total

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def in_memory_sdk(service: str, processors: Sequence[SpanProcessor] = ()) -> InMemorySdk:
    resource = Resource.create({"service.name": service})
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(
        metric_readers=[reader], resource=resource, shutdown_on_exit=False
    )
    return InMemorySdk(tracer_provider, meter_provider, exporter, reader)


class ExplodingTracer(trace.Tracer):
    """A tracer that fails every span it is asked for: telemetry must never fail a call."""

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        raise RuntimeError("tracer broken")

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer broken")


class ExplodingTracerProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return ExplodingTracer()


def trace_id_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def attributes_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# --- minimal OTLP collectors (gRPC and HTTP) -----------------------------------------------------

TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
METRICS_SERVICE = metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name
LOGS_SERVICE = logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"].full_name


@dataclass
class OtlpReceiver:
    """What an OTLP collector received: export requests per signal, and ways to wait for them.

    `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT names (for HTTP: the base URL, below which
    the exporters post to /v1/traces, /v1/metrics and /v1/logs)."""

    endpoint: str
    stop_server: Callable[[], None]
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    logs: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    refused_metrics: int = 0  # exports answered UNIMPLEMENTED / 404
    received: threading.Condition = field(default_factory=threading.Condition)

    def record(self, kind: str, request: Any) -> None:
        with self.received:
            getattr(self, kind).append(request)
            self.received.notify_all()

    def refuse_metrics(self) -> None:
        with self.received:
            self.refused_metrics += 1
            self.received.notify_all()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        with self.received:
            return self._spans()

    def _spans(self) -> list[tuple[dict[str, Any], Any]]:
        found: list[tuple[dict[str, Any], Any]] = []
        for request in self.traces:
            for resource_spans in request.resource_spans:
                resource = otlp_attributes(resource_spans.resource.attributes)
                for scope in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope.spans)
        return found

    def log_records(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, log record) for every log record received."""
        with self.received:
            return self._log_records()

    def _log_records(self) -> list[tuple[dict[str, Any], Any]]:
        found: list[tuple[dict[str, Any], Any]] = []
        for request in self.logs:
            for resource_logs in request.resource_logs:
                resource = otlp_attributes(resource_logs.resource.attributes)
                for scope in resource_logs.scope_logs:
                    found.extend((resource, record) for record in scope.log_records)
        return found

    def metric_names(self) -> set[str]:
        with self.received:
            return {
                metric.name
                for request in self.metrics
                for resource_metrics in request.resource_metrics
                for scope in resource_metrics.scope_metrics
                for metric in scope.metrics
            }

    def wait_for_span(self, name: str, timeout: float = 10) -> tuple[dict[str, Any], Any]:
        """(resource attributes, span) of the first span called `name` to arrive."""
        with self.received:
            self.received.wait_for(lambda: any(s.name == name for _, s in self._spans()), timeout)
            matches = [(r, s) for r, s in self._spans() if s.name == name]
        assert matches, f"no span {name!r} reached the receiver"
        return matches[0]

    def wait_for_log(self, body: str, timeout: float = 10) -> tuple[dict[str, Any], Any]:
        """(resource attributes, log record) of the first record whose body is `body`."""

        def found() -> list[tuple[dict[str, Any], Any]]:
            return [(r, x) for r, x in self._log_records() if x.body.string_value == body]

        with self.received:
            self.received.wait_for(lambda: bool(found()), timeout)
            matches = found()
        assert matches, f"no log record {body!r} reached the receiver"
        return matches[0]

    def wait_for_refused_metrics(self, count: int, timeout: float = 10) -> None:
        with self.received:
            arrived = self.received.wait_for(lambda: self.refused_metrics >= count, timeout)
        assert arrived, f"{self.refused_metrics} metric exports refused, waited for {count}"

    def stop(self) -> None:
        self.stop_server()


def otlp_attributes(attributes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for kv in attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values


# (signal kind, gRPC service, request type, response type, HTTP path)
_SIGNALS = (
    (
        "traces",
        TRACE_SERVICE,
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
        "/v1/traces",
    ),
    (
        "metrics",
        METRICS_SERVICE,
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
        "/v1/metrics",
    ),
    (
        "logs",
        LOGS_SERVICE,
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
        "/v1/logs",
    ),
)


def start_otlp_receiver(*, accept_metrics: bool = True) -> OtlpReceiver:
    """OTLP over gRPC: TraceService, LogsService and (unless refused) MetricsService; a
    refused metric export gets UNIMPLEMENTED, as from a collector without a metrics pipeline."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")

    def stop() -> None:
        server.stop(0).wait()

    receiver = OtlpReceiver(f"http://127.0.0.1:{port}", stop)

    def exporting(kind: str, response: Any) -> Callable[[Any, grpc.ServicerContext], Any]:
        def export(request: Any, context: grpc.ServicerContext) -> Any:
            if kind == "metrics" and not accept_metrics:
                receiver.refuse_metrics()
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown service")
            receiver.record(kind, request)
            return response()

        return export

    handlers = [
        grpc.method_handlers_generic_handler(
            service,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    exporting(kind, response),
                    request_deserializer=request.FromString,
                    response_serializer=response.SerializeToString,
                )
            },
        )
        for kind, service, request, response, _ in _SIGNALS
    ]
    server.add_generic_rpc_handlers(handlers)
    server.start()
    return receiver


def start_http_otlp_receiver(*, accept_metrics: bool = True) -> OtlpReceiver:
    """OTLP over HTTP (protobuf bodies) at /v1/traces, /v1/metrics, /v1/logs; a refused metric
    export gets 404, as from a collector without a metrics pipeline."""
    by_path = {path: (kind, request, response) for kind, _, request, response, path in _SIGNALS}
    receiver_box: list[OtlpReceiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver = receiver_box[0]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            signal = by_path.get(self.path)
            if signal is None or (signal[0] == "metrics" and not accept_metrics):
                if signal is not None:
                    receiver.refuse_metrics()
                self._answer(404, b"404 page not found", "text/plain")
                return
            kind, request, response = signal
            receiver.record(kind, request.FromString(body))
            self._answer(200, response().SerializeToString(), "application/x-protobuf")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test reads what arrived, not an access log

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="otlp-http-receiver")

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    receiver = OtlpReceiver(f"http://127.0.0.1:{server.server_address[1]}", stop)
    receiver_box.append(receiver)
    thread.start()
    return receiver
