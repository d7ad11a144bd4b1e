"""HTTP spans for the samples: how a plain HTTP call and a plain HTTP server join a run's trace.

The same W3C `traceparent` and `baggage` that travel in gRPC metadata (`tokenbroker.tracing`)
travel here as HTTP headers, with the same propagators. Spans follow the HTTP semantic
conventions (https://opentelemetry.io/docs/specs/semconv/http/http-spans/). Like the rest of
the tracing code, nothing here may fail a request: failures are logged at debug and dropped.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from tokenbroker import tracing

log = logging.getLogger(__name__)

METHOD = "http.request.method"
STATUS = "http.response.status_code"
ROUTE = "http.route"
URL_FULL = "url.full"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
CLIENT_ADDRESS = "client.address"


@dataclass
class HttpSpan:
    """The span of one HTTP exchange; `headers` are what an outgoing request must carry."""

    span: Span = INVALID_SPAN
    server: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def answered(self, status: int) -> None:
        """Record the response status (server: only 5xx is an error; client: any >= 400)."""
        try:
            if not self.span.is_recording():
                return
            self.span.set_attribute(STATUS, status)
            if status >= (500 if self.server else 400):
                self.span.set_attribute(tracing.ERROR_TYPE, str(status))
                self.span.set_status(Status(StatusCode.ERROR))
        except Exception:
            log.debug("could not record an HTTP status", exc_info=True)

    def failed(self, error: BaseException) -> None:
        """The exchange ended without a response (connection refused, timeout, ...)."""
        try:
            if self.span.is_recording():
                self.span.set_attribute(tracing.ERROR_TYPE, type(error).__qualname__)
                self.span.set_status(Status(StatusCode.ERROR, str(error)))
        except Exception:
            log.debug("could not record an HTTP failure", exc_info=True)


def _start(
    tracer_provider: trace.TracerProvider,
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, str | int],
    parent: context_api.Context | None = None,
) -> Span:
    try:
        tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        return tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
    except Exception:
        log.debug("could not start an HTTP span", exc_info=True)
        return INVALID_SPAN


def _end(span: Span) -> None:
    try:
        span.end()
    except Exception:
        log.debug("could not end an HTTP span", exc_info=True)


def _inject(context: context_api.Context | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    try:
        tracing.PROPAGATOR.inject(headers, context=context)
    except Exception:
        log.debug("could not inject the trace context", exc_info=True)
    return headers


@contextmanager
def client_span(
    tracer_provider: trace.TracerProvider | None, method: str, url: str
) -> Iterator[HttpSpan]:
    """A CLIENT span for a request to `url` (none without a provider); its `headers` carry
    the trace context and the current baggage either way."""
    if tracer_provider is None:
        yield HttpSpan(headers=_inject(None))  # pass on whatever context the caller is in
        return
    parts = urllib.parse.urlsplit(url)
    attributes: dict[str, str | int] = {METHOD: method, URL_FULL: url}
    if parts.hostname:
        attributes[SERVER_ADDRESS] = parts.hostname
    if parts.port:
        attributes[SERVER_PORT] = parts.port
    span = _start(tracer_provider, method, SpanKind.CLIENT, attributes)
    exchange = HttpSpan(span, headers=_inject(trace.set_span_in_context(span)))
    try:
        yield exchange
    except BaseException as error:
        exchange.failed(error)
        raise
    finally:
        _end(span)


@contextmanager
def server_span(
    tracer_provider: trace.TracerProvider | None,
    headers: Mapping[str, str],
    method: str,
    path: str,
    *,
    route: str = "",
    client_address: str = "",
) -> Iterator[HttpSpan]:
    """A SERVER span for an incoming request, in the caller's trace (`traceparent` from
    `headers`), with the caller's baggage current while the request is served. `route` is
    the matched route, "" when none matched (the span name must stay low-cardinality)."""
    if tracer_provider is None:
        yield HttpSpan(server=True)
        return
    try:
        # HTTP header names are case-insensitive (urllib sends "Traceparent").
        carrier = {k.lower(): v for k, v in headers.items()}
        parent = tracing.PROPAGATOR.extract(carrier, context_api.Context())
    except Exception:
        log.debug("unreadable trace context", exc_info=True)
        parent = context_api.Context()
    attributes: dict[str, str | int] = {METHOD: method, URL_PATH: path, URL_SCHEME: "http"}
    if route:
        attributes[ROUTE] = route
    if client_address:
        attributes[CLIENT_ADDRESS] = client_address
    name = f"{method} {route}" if route else method
    span = _start(tracer_provider, name, SpanKind.SERVER, attributes, parent)
    token = context_api.attach(trace.set_span_in_context(span, parent))
    exchange = HttpSpan(span, server=True)
    try:
        yield exchange
    except BaseException as error:
        exchange.failed(error)
        raise
    finally:
        context_api.detach(token)
        _end(span)
