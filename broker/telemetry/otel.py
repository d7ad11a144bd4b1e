"""OpenTelemetry for the broker: the
`Observer` that turns the domain's facts into span attributes, metrics and baggage.

Nothing here touches the process-wide OpenTelemetry globals: providers are built by
`broker.telemetry.setup` (for `serve`) or handed in by tests, and passed down explicitly. Without
providers everything is a no-op: no exporter, near-zero cost. Identity on the broker's spans
(`enduser.id`, `tokenbroker.principal`) comes from the broker's own records, never from the
baggage a caller sends.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from opentelemetry import context as context_api
from opentelemetry import metrics, trace
from opentelemetry.trace import format_trace_id

from broker import __version__
from broker.context import CallContext
from broker.runs.model import Run
from broker.store import Committed, Mutation, Store
from broker.telemetry.metrics import (
    ALREADY_ENDED,
    AUDIENCE,
    DEFAULT_MAX_AUDIENCES,
    OUTCOME,
    VERIFICATION_RESULT,
    BrokerMetrics,
)
from tokenbroker import tracing

if TYPE_CHECKING:  # the exporter is imported only where /metrics is served
    from broker.telemetry.scrape import PrometheusScrape

log = logging.getLogger(__name__)

PRINCIPAL = "tokenbroker.principal"
PRINCIPAL_KIND = "tokenbroker.principal.kind"
PRINCIPAL_AUTH_METHOD = "tokenbroker.principal.auth_method"
VERIFICATION_METHOD = "tokenbroker.verification_method"
REQUEST_ID = "tokenbroker.request_id"

P = ParamSpec("P")
R = TypeVar("R")


# --- the current call --------------------------------------------------------------------------


def current_trace_id() -> str:
    """The trace id of the current span as 32 hex digits, or "" outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return format_trace_id(span_context.trace_id) if span_context.is_valid else ""


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


def handed_off_run_attributes() -> Mapping[str, str]:
    """The attributes of the run being handed off (inside `handing_off`), else empty."""
    attributes = context_api.get_value(_HANDED_OFF)
    return attributes if isinstance(attributes, dict) else {}


class Telemetry:
    """The OpenTelemetry `Observer`; the gRPC edge builds its interceptors from the same
    providers."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        max_audiences: int = DEFAULT_MAX_AUDIENCES,
        scrape: PrometheusScrape | None = None,
    ) -> None:
        # What /metrics renders: a reader on `meter_provider` (None: no scraping).
        self.scrape = scrape
        self.tracer_provider = tracer_provider or trace.NoOpTracerProvider()
        self.meter_provider = meter_provider or metrics.NoOpMeterProvider()
        self.metrics = BrokerMetrics(
            self.meter_provider.get_meter("broker", __version__), max_audiences
        )

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
        label = self.metrics.audience_label(audience)
        self.metrics.tokens_issued.add(1, {AUDIENCE: label, OUTCOME: outcome})

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
