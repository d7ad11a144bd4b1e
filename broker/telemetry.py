"""OpenTelemetry for the broker: providers from the standard OTEL_* variables, and the
`Observer` that turns the domain's facts into span attributes, metrics and baggage.

Nothing here touches the process-wide OpenTelemetry globals: providers are built by
`providers_from_env` (for `serve`) or handed in by tests, and passed down explicitly. Without
providers everything is a no-op: no exporter, near-zero cost. Identity on the broker's spans
(`enduser.id`, `tokenbroker.principal`) comes from the broker's own records, never from the
baggage a caller sends.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import grpc
from opentelemetry import context as context_api
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from broker import __version__
from broker.context import CallContext
from broker.metrics import ALREADY_ENDED, AUDIENCE, OUTCOME, VERIFICATION_RESULT, BrokerMetrics
from broker.runs import Run
from broker.settings import Settings
from broker.store import Committed, Mutation, Store
from tokenbroker import tracing

log = logging.getLogger(__name__)

SERVICE_NAME = "token-broker"
PRINCIPAL = "tokenbroker.principal"
PRINCIPAL_KIND = "tokenbroker.principal.kind"
PRINCIPAL_AUTH_METHOD = "tokenbroker.principal.auth_method"
VERIFICATION_METHOD = "tokenbroker.verification_method"
REQUEST_ID = "tokenbroker.request_id"

P = ParamSpec("P")
R = TypeVar("R")


# --- providers from the environment ----------------------------------------------------------


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


# --- the current call --------------------------------------------------------------------------


def current_trace_id() -> str:
    """The trace id of the current span as 32 hex digits, or "" outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return format_trace_id(span_context.trace_id) if span_context.is_valid else ""


def current_span_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, or None outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format_trace_id(span_context.trace_id), format_span_id(span_context.span_id)


def _never_raises(method: Callable[P, R]) -> Callable[P, R | None]:
    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return method(*args, **kwargs)
        except Exception:
            log.debug("telemetry failed", exc_info=True)
            return None

    return guarded


@_never_raises
def annotate_call(call: CallContext) -> None:
    """Record the authenticated caller on the server span (from the broker's authentication)."""
    span = tracing.server_span()
    if not span.is_recording():
        return
    principal = call.principal
    span.set_attribute(PRINCIPAL_KIND, principal.kind.value)
    if principal.name:
        span.set_attribute(PRINCIPAL, principal.name)
    if principal.auth_method:
        span.set_attribute(PRINCIPAL_AUTH_METHOD, principal.auth_method)
    if call.request_id:
        span.set_attribute(REQUEST_ID, call.request_id)


def run_attributes(run: Run) -> dict[str, str]:
    """Span attributes describing `run`, from the broker's record of it."""
    attributes = {
        tracing.RUN_ID: run.run_id,
        tracing.PIPELINE: str(run.pipeline),
        tracing.TRIGGERED_VIA: run.triggered_via,
    }
    person = run.on_behalf_of
    if person is not None:
        attributes[tracing.PERSON] = person.label()
        attributes[VERIFICATION_METHOD] = person.method.value
    return {key: value for key, value in attributes.items() if value}


def run_baggage(run: Run) -> dict[str, str]:
    """The baggage a run's context carries to other services."""
    return {k: v for k, v in run_attributes(run).items() if k in tracing.RUN_BAGGAGE_KEYS}


# --- the observer ----------------------------------------------------------------------------

# The attributes of the run being handed off, for the span of the outgoing call.
_HANDED_OFF = context_api.create_key("tokenbroker-handed-off-run")


def _run_handed_off() -> Mapping[str, str]:
    attributes = context_api.get_value(_HANDED_OFF)
    return attributes if isinstance(attributes, dict) else {}


class Telemetry:
    """The OpenTelemetry `Observer`, plus the interceptors that use the same providers."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.tracer_provider = tracer_provider or trace.NoOpTracerProvider()
        self.meter_provider = meter_provider or metrics.NoOpMeterProvider()
        self.metrics = BrokerMetrics(self.meter_provider.get_meter("broker", __version__))

    def server_interceptor(self) -> grpc.ServerInterceptor:
        return tracing.ServerTracingInterceptor(self.tracer_provider, self.meter_provider)

    def intercept_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """An outgoing channel (to an executor) whose calls join the current trace; a call
        made while `handing_off(run)` names the run on its span, from the broker's record."""
        return tracing.intercept_channel(channel, self.tracer_provider, attributes=_run_handed_off)

    def watch(
        self, store: Store, active_runs: Callable[[], list[Run]], subscribers: Callable[[], int]
    ) -> None:
        """Count run transitions as the store commits them; observe the gauges."""
        store.add_listener(self._on_commit)
        self.metrics.observe(active_runs, subscribers)

    def _on_commit(self, committed: Committed, mutation: Mutation | None) -> None:
        try:  # never raise into the store's writer
            self.metrics.on_commit(committed, mutation)
        except Exception:
            log.debug("telemetry failed", exc_info=True)

    @_never_raises
    def call_touched_run(self, run: Run) -> None:
        span = tracing.server_span()
        if span.is_recording():
            span.set_attributes(run_attributes(run))

    @_never_raises
    def call_started_run(self, run: Run) -> None:
        self.call_touched_run(run)
        tracing.reply_with_baggage(run_baggage(run))

    @_never_raises
    def run_revoked(self, run: Run, already_ended: bool) -> None:
        self.call_touched_run(run)
        self.metrics.revocations.add(1, {ALREADY_ENDED: already_ended})

    @_never_raises
    def token_issued(self, audience: str, outcome: str) -> None:
        self.metrics.tokens_issued.add(1, {AUDIENCE: audience, OUTCOME: outcome})

    @_never_raises
    def token_verified(self, result: str) -> None:
        self.metrics.verifications.add(1, {VERIFICATION_RESULT: result})

    @_never_raises
    def audit_delivered(self, lag: int) -> None:
        self.metrics.audit_lag.record(max(lag, 0))

    def handing_off(self, run: Run) -> AbstractContextManager[None]:
        return self._handing_off(run)

    @contextmanager
    def _handing_off(self, run: Run) -> Iterator[None]:
        # The run's entries replace whatever run baggage the current context holds (a caller
        # may have sent its own); the executor sees the broker's record only.
        try:
            context = tracing.with_run_baggage(run_baggage(run))
            token = context_api.attach(
                context_api.set_value(_HANDED_OFF, run_attributes(run), context)
            )
        except Exception:
            log.debug("telemetry failed", exc_info=True)
            yield
            return
        try:
            yield
        finally:
            context_api.detach(token)
