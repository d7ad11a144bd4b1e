"""OpenTelemetry providers from the standard `OTEL_*` variables, for `serve`.

Nothing here touches the process-wide OpenTelemetry globals: the providers are passed down
explicitly, and without them every instrument is a no-op.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from broker import __version__
from broker.settings import Settings
from tokenbroker.defaults import SERVICE_NAME

log = logging.getLogger(__name__)


@dataclass
class Providers:
    """The SDK providers `serve` exports with; None means "off" (a no-op provider is used)."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def shutdown(self, timeout: float = 2.0) -> None:
        """Flush and stop the exporters, waiting at most `timeout` (a dead collector must not
        hold up the broker's exit)."""

        def stop() -> None:
            for provider in (self.tracer_provider, self.meter_provider):
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


def _enabled(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() != "none"


def _otlp_endpoint(environ: Mapping[str, str], signal: str) -> str:
    return environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def _insecure(environ: Mapping[str, str], endpoint: str) -> bool:
    if endpoint.startswith("https://"):
        return False
    if endpoint.startswith("http://"):
        return True
    return environ.get("OTEL_EXPORTER_OTLP_INSECURE", "").strip().lower() == "true"


def _resource(environ: Mapping[str, str]) -> Resource:
    attributes: dict[str, str] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    attributes["service.name"] = environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
    attributes["service.version"] = __version__
    return Resource.create(attributes)


def providers_from_env(settings: Settings, environ: Mapping[str, str]) -> Providers:
    """Providers per the standard variables: OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT (or the
    per-signal variant) is set, spans to stderr with --otel-console, otherwise none at all.

    OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none and OTEL_METRICS_EXPORTER=none switch
    parts off; OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS and
    OTEL_EXPORTER_OTLP_INSECURE are honoured; the SDK reads the rest (OTEL_BSP_*, sampler).
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Providers()
    protocol = environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    if protocol != "grpc":
        log.warning("only OTLP over gRPC is supported", extra={"protocol": protocol})
    resource = _resource(environ)
    headers = environ.get("OTEL_EXPORTER_OTLP_HEADERS")
    return Providers(
        _tracer_provider(settings, environ, resource, headers),
        _meter_provider(environ, resource, headers),
    )


def _tracer_provider(
    settings: Settings, environ: Mapping[str, str], resource: Resource, headers: str | None
) -> TracerProvider | None:
    endpoint = _otlp_endpoint(environ, "TRACES")
    otlp = bool(endpoint) and _enabled(environ, "OTEL_TRACES_EXPORTER")
    if not otlp and not settings.otel_console:
        return None
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=endpoint, insecure=_insecure(environ, endpoint), headers=headers
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if settings.otel_console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    return provider


def _meter_provider(
    environ: Mapping[str, str], resource: Resource, headers: str | None
) -> MeterProvider | None:
    endpoint = _otlp_endpoint(environ, "METRICS")
    if not endpoint or not _enabled(environ, "OTEL_METRICS_EXPORTER"):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    exporter = OTLPMetricExporter(
        endpoint=endpoint, insecure=_insecure(environ, endpoint), headers=headers
    )
    try:
        interval = float(environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000"))
    except ValueError:
        log.warning("OTEL_METRIC_EXPORT_INTERVAL is not a number; exporting every 60 s")
        interval = 60000.0
    readers: list[MetricReader] = [
        PeriodicExportingMetricReader(exporter, export_interval_millis=interval)
    ]
    return MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
