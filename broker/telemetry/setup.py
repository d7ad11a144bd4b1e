"""OpenTelemetry providers from the standard `OTEL_*` variables, for `serve`, the CLI and the demo.

Nothing here touches the process-wide OpenTelemetry globals: the providers are passed down
explicitly, and without them every instrument is a no-op.

Each signal goes over OTLP with the protocol `OTEL_EXPORTER_OTLP_[SIGNAL_]PROTOCOL` names:
`grpc` (the broker's default) or `http/protobuf`. Spans and metrics are exported when an
endpoint is configured (or `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` say `otlp`),
logs only when `OTEL_LOGS_EXPORTER=otlp`. Whenever the HTTP port serves, the MeterProvider also
has a Prometheus reader, rendered at `/metrics` (`broker.telemetry.scrape`): one set of
instruments for OTLP push and scraping.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.util.re import parse_env_headers

from broker import __version__
from broker.settings import Settings
from broker.telemetry.quiet import QuietMetricExporter
from tokenbroker.defaults import SERVICE_NAME

if TYPE_CHECKING:  # the Prometheus exporter is imported only where /metrics is served
    from broker.telemetry.scrape import PrometheusScrape

log = logging.getLogger(__name__)

# tokenbroker.tracing.SERVER_DURATION, named here: importing tracing would load grpc into the
# domain (tests/test_layers.py); tests/test_http_metrics.py checks the View takes effect.
SERVER_DURATION = "rpc.server.call.duration"
# rpc.server.call.duration, in seconds. The broker's own time for a unary call is sub-ms to a
# few ms on an idle machine and reaches ~100 ms under load (docs/performance.md: client-side
# p99 of 4-22 ms through a loaded broker), so the buckets are dense from 100 µs to 250 ms
# (1-2.5-5 steps); audit streams, which last as long as they follow, land in the tail.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

GRPC = "grpc"
HTTP = "http/protobuf"
PROTOCOLS = (GRPC, HTTP)
# Where an OTLP/HTTP collector takes each signal, below OTEL_EXPORTER_OTLP_ENDPOINT.
_HTTP_PATHS = {"TRACES": "v1/traces", "METRICS": "v1/metrics", "LOGS": "v1/logs"}
# The specification's defaults, for a signal switched on without an endpoint.
_DEFAULT_ENDPOINTS = {GRPC: "http://localhost:4317", HTTP: "http://localhost:4318"}


@dataclass
class Providers:
    """The SDK providers a process exports with; None means "off" (a no-op provider is used)."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    logger_provider: LoggerProvider | None = None
    # The Prometheus reader of meter_provider, rendered at the HTTP port's /metrics.
    scrape: PrometheusScrape | None = None

    def shutdown(self, timeout: float = 2.0) -> None:
        """Flush and stop the exporters, waiting at most `timeout` (a dead collector must not
        hold up the process's exit)."""

        def stop() -> None:
            for provider in (self.tracer_provider, self.meter_provider, self.logger_provider):
                if provider is not None:
                    try:
                        provider.shutdown()
                    except Exception:
                        log.warning("telemetry shutdown failed", exc_info=True)

        stopper = threading.Thread(target=stop, name="otel-shutdown", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            log.warning("telemetry exporters did not flush in time", extra={"timeout": timeout})


@dataclass(frozen=True)
class Otlp:
    """Where and how one signal is exported over OTLP."""

    protocol: str
    endpoint: str
    headers: Mapping[str, str]
    insecure: bool  # gRPC only: plaintext to the endpoint


def _exporters(environ: Mapping[str, str], signal: str) -> set[str]:
    value = environ.get(f"OTEL_{signal}_EXPORTER", "")
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or GRPC
    ).strip()


def _endpoint(environ: Mapping[str, str], signal: str, protocol: str) -> str:
    """The signal's own endpoint as it is; the shared one with the signal's path for HTTP."""
    own = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    if own:
        return own
    shared = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not shared:
        return ""
    if protocol == HTTP:
        return f"{shared.rstrip('/')}/{_HTTP_PATHS[signal]}"
    return shared


def _insecure(environ: Mapping[str, str], endpoint: str) -> bool:
    if endpoint.startswith("https://"):
        return False
    if endpoint.startswith("http://"):
        return True
    return environ.get("OTEL_EXPORTER_OTLP_INSECURE", "").strip().lower() == "true"


def otlp_config(environ: Mapping[str, str], signal: str, *, required: bool = False) -> Otlp | None:
    """How `signal` ("TRACES", "METRICS", "LOGS") is exported, or None: switched off, no
    endpoint (unless `required`: the signal was asked for by name), or a protocol this
    broker does not speak (said once in the log)."""
    exporters = _exporters(environ, signal)
    if "none" in exporters:
        return None
    protocol = _protocol(environ, signal)
    endpoint = _endpoint(environ, signal, protocol)
    if not endpoint and not (required or "otlp" in exporters):
        return None
    if protocol not in PROTOCOLS:
        log.warning(
            "unsupported OTLP protocol: this signal is not exported",
            extra={"signal": signal.lower(), "protocol": protocol, "supported": list(PROTOCOLS)},
        )
        return None
    if not endpoint:
        endpoint = _DEFAULT_ENDPOINTS[protocol]
        if protocol == HTTP:
            endpoint = f"{endpoint}/{_HTTP_PATHS[signal]}"
    raw_headers = (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_HEADERS")
        or environ.get("OTEL_EXPORTER_OTLP_HEADERS")
        or ""
    )
    headers = dict(parse_env_headers(raw_headers, liberal=True))
    return Otlp(protocol, endpoint, headers, _insecure(environ, endpoint))


def _resource(environ: Mapping[str, str], service_name: str) -> Resource:
    attributes: dict[str, str] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    attributes["service.name"] = environ.get("OTEL_SERVICE_NAME") or service_name
    attributes["service.version"] = __version__
    return Resource.create(attributes)


def _disabled(environ: Mapping[str, str]) -> bool:
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def providers_from_env(
    settings: Settings, environ: Mapping[str, str], *, scrape: bool = False
) -> Providers:
    """The broker's providers per the standard variables: spans and metrics over OTLP when an
    endpoint is configured, spans to stderr with --otel-console, logs over OTLP with
    OTEL_LOGS_EXPORTER=otlp, metrics for /metrics whenever the HTTP port serves; otherwise
    none at all.

    OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none and OTEL_METRICS_EXPORTER=none switch
    parts off; OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_[SIGNAL_]PROTOCOL,
    _HEADERS and OTEL_EXPORTER_OTLP_INSECURE are honoured; the SDK reads the rest (OTEL_BSP_*,
    sampler). `scrape`: a Prometheus reader although the HTTP port does not serve (a worker
    of `serve --workers` serving its metrics to worker 0).
    """
    if _disabled(environ):
        return Providers()
    resource = _resource(environ, SERVICE_NAME)
    scraped = scrape or bool(settings.http_listen)
    meter_provider, prometheus = _meter_provider(environ, resource, scrape=scraped)
    return Providers(
        _tracer_provider(environ, resource, console=settings.otel_console),
        meter_provider,
        _logger_provider(environ, resource),
        prometheus,
    )


def tracer_provider_from_env(
    environ: Mapping[str, str], service_name: str
) -> TracerProvider | None:
    """Spans only, over OTLP as the variables say, for a short-lived process (the CLI, the
    demo's services); None when nothing is to be exported. OTEL_SERVICE_NAME wins over
    `service_name`."""
    if _disabled(environ):
        return None
    return _tracer_provider(environ, _resource(environ, service_name), console=False)


def meter_provider_from_env(environ: Mapping[str, str], service_name: str) -> MeterProvider | None:
    """Metrics only, over OTLP as the variables say, for a process without an HTTP port (the
    witness); None when nothing is to be exported. Shut it down to export what was counted."""
    if _disabled(environ):
        return None
    return _meter_provider(environ, _resource(environ, service_name), scrape=False)[0]


def exports_traces(environ: Mapping[str, str]) -> bool:
    """Whether the variables ask for spans to be exported."""
    return not _disabled(environ) and otlp_config(environ, "TRACES") is not None


def _tracer_provider(
    environ: Mapping[str, str], resource: Resource, *, console: bool
) -> TracerProvider | None:
    otlp = otlp_config(environ, "TRACES")
    if otlp is None and not console:
        return None
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if otlp is not None:
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(otlp)))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    return provider


def _span_exporter(otlp: Otlp) -> SpanExporter:
    if otlp.protocol == HTTP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter(endpoint=otlp.endpoint, headers=otlp.headers)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=otlp.endpoint, insecure=otlp.insecure, headers=_grpc_headers(otlp)
    )


def _grpc_headers(otlp: Otlp) -> dict[str, str] | None:
    # gRPC metadata keys must be lower case.
    return {key.lower(): value for key, value in otlp.headers.items()} or None


def _meter_provider(
    environ: Mapping[str, str], resource: Resource, *, scrape: bool
) -> tuple[MeterProvider | None, PrometheusScrape | None]:
    """OTLP push when configured, and a Prometheus reader when `scrape` (the HTTP port
    serves /metrics): one MeterProvider, one set of instruments, for both."""
    if "none" in _exporters(environ, "METRICS"):
        return None, None
    readers: list[MetricReader] = []
    otlp = otlp_config(environ, "METRICS")
    if otlp is not None:
        # A collector that takes traces only answers every export with an error: say so once.
        exporter = QuietMetricExporter(_metric_exporter(otlp), otlp.endpoint)
        readers.append(
            PeriodicExportingMetricReader(exporter, export_interval_millis=_interval(environ))
        )
    prometheus = None
    if scrape:
        from broker.telemetry.scrape import PrometheusScrape  # only here: a costly import

        prometheus = PrometheusScrape()
        readers.append(prometheus.reader)
    if not readers:
        return None, None
    provider = MeterProvider(
        metric_readers=readers, resource=resource, views=views(), shutdown_on_exit=False
    )
    return provider, prometheus


def views() -> list[View]:
    """Histogram buckets that fit what the broker measures (docs/performance.md)."""
    return [
        View(
            instrument_name=SERVER_DURATION,
            aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
        )
    ]


def _interval(environ: Mapping[str, str]) -> float:
    try:
        return float(environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000"))
    except ValueError:
        log.warning("OTEL_METRIC_EXPORT_INTERVAL is not a number; exporting every 60 s")
        return 60000.0


def _metric_exporter(otlp: Otlp) -> MetricExporter:
    if otlp.protocol == HTTP:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        return HttpMetricExporter(endpoint=otlp.endpoint, headers=otlp.headers)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(
        endpoint=otlp.endpoint, insecure=otlp.insecure, headers=_grpc_headers(otlp)
    )


def _logger_provider(environ: Mapping[str, str], resource: Resource) -> LoggerProvider | None:
    if "otlp" not in _exporters(environ, "LOGS"):
        return None
    otlp = otlp_config(environ, "LOGS", required=True)
    if otlp is None:
        return None
    provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_log_record_processor(BatchLogRecordProcessor(_log_exporter(otlp)))
    return provider


def _log_exporter(otlp: Otlp) -> LogRecordExporter:
    if otlp.protocol == HTTP:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (
            OTLPLogExporter as HttpLogExporter,
        )

        return HttpLogExporter(endpoint=otlp.endpoint, headers=otlp.headers)
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

    return OTLPLogExporter(
        endpoint=otlp.endpoint, insecure=otlp.insecure, headers=_grpc_headers(otlp)
    )
