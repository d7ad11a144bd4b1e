"""OpenTelemetry test helpers: in-memory SDK providers per service, and a tiny OTLP receiver.

Nothing here touches the OpenTelemetry globals: each "service" in a test gets its own
providers, passed in explicitly, and shuts them down afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
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


def trace_id_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def attributes_of(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# --- a minimal OTLP/gRPC collector --------------------------------------------------------------

TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
METRICS_SERVICE = metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name


@dataclass
class OtlpReceiver:
    """opentelemetry.proto.collector TraceService and MetricsService on a loopback port."""

    server: grpc.Server
    port: int
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    received: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _export_traces(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.received:
            self.traces.append(request)
            self.received.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def _export_metrics(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        with self.received:
            self.metrics.append(request)
            self.received.notify_all()
        return metrics_service_pb2.ExportMetricsServiceResponse()

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

    def stop(self) -> None:
        self.server.stop(0).wait()


def otlp_attributes(attributes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for kv in attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values


def start_otlp_receiver() -> OtlpReceiver:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    receiver = OtlpReceiver(server, port)
    trace_handler = grpc.unary_unary_rpc_method_handler(
        receiver._export_traces,
        request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
        response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
    )
    metrics_handler = grpc.unary_unary_rpc_method_handler(
        receiver._export_metrics,
        request_deserializer=metrics_service_pb2.ExportMetricsServiceRequest.FromString,
        response_serializer=metrics_service_pb2.ExportMetricsServiceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": trace_handler}),
            grpc.method_handlers_generic_handler(METRICS_SERVICE, {"Export": metrics_handler}),
        )
    )
    server.start()
    return receiver
