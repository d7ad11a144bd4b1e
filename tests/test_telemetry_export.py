"""The pieces between the broker and its exporters: the metric exporter that reports a refusing
collector once per outage, and the log handler that sends log lines over OTLP."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.trace import format_span_id, format_trace_id

from broker.telemetry import logs
from broker.telemetry.quiet import EXPORTER_LOGGERS, QuietMetricExporter
from tests.otel_support import in_memory_sdk

GRPC_EXPORTER_LOG = logging.getLogger(EXPORTER_LOGGERS[0])


class ScriptedExporter(MetricExporter):
    """Answers exports as scripted, logging an error for each failure as the OTLP exporters do."""

    def __init__(self, results: list[MetricExportResult]) -> None:
        super().__init__()
        self.results = results

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        result = self.results.pop(0)
        if result is MetricExportResult.FAILURE:
            GRPC_EXPORTER_LOG.error("Failed to export metrics, error code: UNIMPLEMENTED")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


NO_METRICS = MetricsData(resource_metrics=[])
OK, FAILED = MetricExportResult.SUCCESS, MetricExportResult.FAILURE


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO)
    yield caplog


def test_failures_are_one_warning_per_outage_and_a_recovery_is_said_once(
    records: pytest.LogCaptureFixture,
) -> None:
    exporter = QuietMetricExporter(
        ScriptedExporter([FAILED, FAILED, FAILED, OK, OK, FAILED, FAILED]), "http://c:4317"
    )
    try:
        results = [exporter.export(NO_METRICS) for _ in range(7)]
    finally:
        exporter.shutdown()

    assert results == [FAILED, FAILED, FAILED, OK, OK, FAILED, FAILED]
    said = [(r.levelname, r.getMessage().split(";")[0]) for r in records.records]
    assert said == [
        ("WARNING", "metrics could not be exported"),
        ("INFO", "metrics reach the collector again"),
        ("WARNING", "metrics could not be exported"),
    ]
    first = records.records[0]
    assert first.__dict__["endpoint"] == "http://c:4317"
    assert "UNIMPLEMENTED" in first.__dict__["reason"]


def test_an_exporter_that_raises_counts_as_a_failure(records: pytest.LogCaptureFixture) -> None:
    class Raising(ScriptedExporter):
        def export(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricExportResult:
            raise ConnectionError("collector gone")

    exporter = QuietMetricExporter(Raising([]), "http://c:4317")
    try:
        assert exporter.export(NO_METRICS) is FAILED
    finally:
        exporter.shutdown()
    (warning,) = records.records
    assert warning.__dict__["reason"] == "ConnectionError: collector gone"


def test_what_the_exporters_log_outside_a_metric_export_is_not_held_back(
    records: pytest.LogCaptureFixture,
) -> None:
    exporter = QuietMetricExporter(ScriptedExporter([]), "http://c:4317")
    try:
        GRPC_EXPORTER_LOG.error("Failed to export spans")  # the span exporter shares the logger
    finally:
        exporter.shutdown()
    assert [r.getMessage() for r in records.records] == ["Failed to export spans"]


def test_log_lines_go_to_the_logger_provider_with_fields_and_the_current_span() -> None:
    exported = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider = LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exported))
    sdk = in_memory_sdk("token-broker")
    undo = logs.export_to(provider)
    try:
        with sdk.tracer_provider.get_tracer("t").start_as_current_span("call") as span:
            logging.getLogger("broker.test").warning("run expired", extra={"run_id": "r-1"})
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").error("ignored")
    finally:
        undo()
        provider.shutdown()
        sdk.shutdown()

    (readable,) = exported.get_finished_logs()
    record = readable.log_record
    assert record.body == "run expired"
    assert record.severity_text == "WARN"
    assert dict(record.attributes or {}) == {"run_id": "r-1"}
    context = span.get_span_context()
    assert record.trace_id is not None and record.span_id is not None
    assert format_trace_id(record.trace_id) == format_trace_id(context.trace_id)
    assert format_span_id(record.span_id) == format_span_id(context.span_id)
    assert readable.instrumentation_scope is not None
    assert readable.instrumentation_scope.name == "broker.test"
