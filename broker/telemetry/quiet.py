"""A metric exporter that says once that the collector refuses metrics, then keeps quiet.

A collector set up for traces only answers every metric export with UNIMPLEMENTED (gRPC) or
404 (HTTP), and the OTLP exporters log an error for each — one every export interval, for as
long as the broker runs. `QuietMetricExporter` holds back what the exporter logs while it
exports; the first failure becomes one warning naming the endpoint and the reason, later
ones are dropped, and an export that works again is said once too.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

log = logging.getLogger(__name__)

# Where the OTLP exporters log their failures (gRPC: one module for every signal).
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.common.http",
)


class _Held(threading.local):
    records: list[logging.LogRecord] | None = None


class _HoldBack(logging.Filter):
    """Drops what a logger says in a thread that is exporting metrics, keeping it aside."""

    def __init__(self, held: _Held) -> None:
        super().__init__()
        self._held = held

    def filter(self, record: logging.LogRecord) -> bool:
        records = self._held.records
        if records is None:
            return True  # not a metric export (e.g. spans over the shared gRPC module)
        records.append(record)
        return False


class QuietMetricExporter(MetricExporter):
    """`delegate`, with its failures logged once per outage instead of once per export."""

    def __init__(self, delegate: MetricExporter, endpoint: str) -> None:
        super().__init__(
            preferred_temporality=delegate._preferred_temporality,
            preferred_aggregation=delegate._preferred_aggregation,
        )
        self._delegate = delegate
        self._endpoint = endpoint
        self._failing = False
        self._held = _Held()
        self._filter = _HoldBack(self._held)
        for name in EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(self._filter)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self._held.records = []
        try:
            result = self._delegate.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            result = MetricExportResult.FAILURE
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = _reason(self._held.records)
        finally:
            self._held.records = None
        if result is MetricExportResult.SUCCESS:
            if self._failing:
                log.info("metrics reach the collector again", extra={"endpoint": self._endpoint})
            self._failing = False
        elif not self._failing:
            self._failing = True
            log.warning(
                "metrics could not be exported; further failures are not logged until an "
                "export succeeds (a collector that takes traces only answers like this: "
                "OTEL_METRICS_EXPORTER=none stops the attempts)",
                extra={"endpoint": self._endpoint, "reason": reason},
            )
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._delegate.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        for name in EXPORTER_LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)
        self._delegate.shutdown(timeout_millis=timeout_millis, **kwargs)


def _reason(records: list[logging.LogRecord] | None) -> str:
    """What the exporter said about the failure, in one line."""
    for record in reversed(records or []):
        if record.levelno >= logging.WARNING:
            return " ".join(record.getMessage().split())[:300]
    return "the collector refused the export"
