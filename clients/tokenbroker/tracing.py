"""Join a token-broker trace from any Python gRPC service.

Work that belongs to one pipeline run crosses several services: a portal starts it, the broker
records it, an executor runs it, the APIs its steps call check its tokens. They all become one
trace when each service propagates W3C `traceparent` and `baggage` through gRPC metadata:

    channel = tracing.intercept_channel(grpc.insecure_channel(target))    # outgoing calls
    channel = grpc.aio.insecure_channel(target, interceptors=tracing.aio_interceptors())  # asyncio
    server = grpc.server(pool, interceptors=[tracing.ServerTracingInterceptor()])  # incoming
    provider.add_span_processor(tracing.baggage_span_processor())         # stamp the run on spans

A process started inside someone else's trace (a CI step whose runner exports `TRACEPARENT`,
`TRACESTATE` and `BAGGAGE`, OpenTelemetry's environment-variable carrier) joins it through
`environment_context()`: `BrokerClient` and `AsyncBrokerClient` do so by themselves.

The broker puts the run's id, its pipeline, the service that triggered it and the person it
runs for into baggage (`RUN_BAGGAGE_KEYS`) when it starts a run (in the response's trailing
metadata) and when it hands a run to an executor (in the outgoing call). Baggage is context, not
proof: a service that needs to know *who* acts verifies a broker token; it never trusts baggage
for identity. Every function here swallows its own failures: telemetry never fails a call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

import grpc

try:
    from opentelemetry import baggage, metrics, trace
    from opentelemetry import context as context_api
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.context import Context
    from opentelemetry.processor.baggage import BaggageSpanProcessor
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
    from opentelemetry.trace import TracerProvider as TracerProvider  # for BrokerClient's hints
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as missing:  # the base install has no OpenTelemetry: say what to install
    raise ImportError(
        f"tokenbroker.tracing needs OpenTelemetry ({missing.name} is missing): "
        "pip install 'tokenbroker-client[tracing]'"
    ) from missing

log = logging.getLogger(__name__)

# Semantic-convention names (https://opentelemetry.io/docs/specs/semconv/).
RUN_ID = "cicd.pipeline.run.id"
PIPELINE = "cicd.pipeline.name"
PERSON = "enduser.id"
# Namespaced: the service account that started the run ("via deploy-portal").
TRIGGERED_VIA = "tokenbroker.triggered_via"
RUN_BAGGAGE_KEYS = frozenset({RUN_ID, PIPELINE, PERSON, TRIGGERED_VIA})

RPC_SYSTEM = "rpc.system"
RPC_SYSTEM_NAME = "rpc.system.name"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
RPC_RESPONSE_STATUS_CODE = "rpc.response.status_code"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
SERVER_DURATION = "rpc.server.call.duration"

# W3C trace context and baggage, whatever the process-wide default propagator is.
PROPAGATOR: TextMapPropagator = CompositePropagator(
    [TraceContextTextMapPropagator(), W3CBaggagePropagator()]
)
_BAGGAGE = W3CBaggagePropagator()
_PROPAGATION_KEYS = frozenset({"traceparent", "tracestate", "baggage"})
# OpenTelemetry's environment-variable carrier: the header names in capitals.
_ENVIRONMENT_CARRIER = {name: name.upper() for name in ("traceparent", "tracestate", "baggage")}

# Semantic conventions: on a server span only these codes are the server's fault (errors);
# the others (NOT_FOUND, PERMISSION_DENIED, ...) describe the request and leave status unset.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
# Semantic-convention advice for rpc.server.call.duration (seconds).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)

_CALL_KEY = context_api.create_key("tokenbroker-server-call")


def _health_check(method: str) -> bool:
    return method.startswith("/grpc.health.v1.")


def split_method(full_method: str) -> tuple[str, str]:
    """("pkg.Service", "Method") from "/pkg.Service/Method"."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


@functools.lru_cache(maxsize=512)
def rpc_attributes(full_method: str) -> Mapping[str, str]:
    """The rpc.* attributes of a method (cached: a server has a fixed set of them)."""
    service, method = split_method(full_method)
    return MappingProxyType(
        {RPC_SYSTEM: "grpc", RPC_SYSTEM_NAME: "grpc", RPC_SERVICE: service, RPC_METHOD: method}
    )


@functools.lru_cache(maxsize=1024)
def _duration_attributes(full_method: str, code: grpc.StatusCode) -> Mapping[str, Any]:
    return MappingProxyType({**rpc_attributes(full_method), RPC_GRPC_STATUS_CODE: code.value[0]})


def _span_name(full_method: str) -> str:
    return full_method.lstrip("/")


def _carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def environment_context(environ: Mapping[str, str] | None = None) -> Context | None:
    """The trace context (and baggage) the environment carries — `TRACEPARENT`, `TRACESTATE`,
    `BAGGAGE`, as a CI runner or a parent process sets them — or None without a valid
    `TRACEPARENT`. Spans started in it join the parent process's trace."""
    environ = os.environ if environ is None else environ
    carrier = {
        header: environ[variable]
        for header, variable in _ENVIRONMENT_CARRIER.items()
        if environ.get(variable)
    }
    if "traceparent" not in carrier:
        return None
    try:
        context = PROPAGATOR.extract(carrier, Context())
    except Exception:
        log.debug("unreadable TRACEPARENT", exc_info=True)
        return None
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def target_attributes(target: str) -> dict[str, Any]:
    """`server.address` and `server.port` of a channel target (`HOST:PORT`, `dns:///NAME:PORT`);
    empty for a list of replicas, which names no one server."""
    address = target.removeprefix("dns:///").removeprefix("dns:")
    if not address or "," in address or address.startswith(("ipv4:", "ipv6:", "unix:")):
        return {}
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or not host:
        return {SERVER_ADDRESS: address.strip("[]")}
    return {SERVER_ADDRESS: host.strip("[]"), SERVER_PORT: int(port)}


def listen_attributes(host: str, port: int) -> dict[str, Any]:
    """`server.address` and `server.port` of a server listening on `host:port`; a wildcard
    address (0.0.0.0, ::) is named by the machine's host name (no DNS lookup)."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - recognised here, never bound
        host = socket.gethostname()
    return {SERVER_ADDRESS: host, SERVER_PORT: port}


# --- baggage ---------------------------------------------------------------------------------


def baggage_of(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The baggage entries in gRPC metadata, e.g. a broker response's `trailing_metadata()`."""
    try:
        # Into an empty context: extract() otherwise starts from (and returns) the current
        # one, and the caller's own baggage would pass for the metadata's.
        found = baggage.get_all(_BAGGAGE.extract(_carrier(metadata), Context()))
        return {key: str(value) for key, value in found.items()}
    except Exception:
        log.debug("unreadable baggage", exc_info=True)
        return {}


def run_baggage_of(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """Only the run entries (`RUN_BAGGAGE_KEYS`) of the baggage in `metadata`."""
    return {k: v for k, v in baggage_of(metadata).items() if k in RUN_BAGGAGE_KEYS}


def with_run_baggage(entries: Mapping[str, str], context: Context | None = None) -> Context:
    """`context` (default: the current one) whose run entries are exactly `entries`.

    Every key of RUN_BAGGAGE_KEYS is removed first, so an entry that came from elsewhere
    (a caller's claim, say) never survives next to the run's own values.
    """
    for key in RUN_BAGGAGE_KEYS:
        context = baggage.remove_baggage(key, context)
    for key, value in entries.items():
        context = baggage.set_baggage(key, value, context)
    return context if context is not None else context_api.get_current()


def _baggage_header(entries: Mapping[str, str]) -> str:
    context = Context()
    for key, value in entries.items():
        context = baggage.set_baggage(key, value, context)
    carrier: dict[str, str] = {}
    _BAGGAGE.inject(carrier, context)
    return carrier.get("baggage", "")


def baggage_span_processor(keys: Iterable[str] = RUN_BAGGAGE_KEYS) -> SpanProcessor:
    """A span processor that copies these baggage entries onto every span it starts.

    Add it to the tracer provider of a service that *receives* a run's context (executor,
    APIs). Not to the broker's: the broker takes identity from its own records only.
    """
    wanted = frozenset(keys)
    return cast(SpanProcessor, BaggageSpanProcessor(lambda key: key in wanted))


# --- server side -----------------------------------------------------------------------------


@dataclass
class _ServerCall:
    span: Span
    full_method: str
    started: float
    context: Context = field(default_factory=Context)
    reply_baggage: dict[str, str] = field(default_factory=dict)


def _server_call() -> _ServerCall | None:
    call = context_api.get_value(_CALL_KEY)
    return call if isinstance(call, _ServerCall) else None


def server_span() -> Span:
    """The server span of the RPC being served (a no-op span outside one)."""
    call = _server_call()
    return call.span if call is not None else trace.get_current_span()


def reply_with_baggage(entries: Mapping[str, str]) -> None:
    """Send these baggage entries back to the caller with the response (trailing metadata)."""
    call = _server_call()
    if call is not None:
        call.reply_baggage.update(entries)


def _peer_attributes(peer: str) -> dict[str, Any]:
    # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"; unix sockets have no port.
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return {}
    return {"network.peer.address": host.strip("[]"), "network.peer.port": int(port)}


def _status_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    # ServicerContext.code() exists in grpcio >= 1.38 but not in the typing stubs; abort()
    # records its code there before raising a bare Exception.
    code = getattr(context, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else None


class ServerTracingInterceptor(grpc.ServerInterceptor):
    """A SERVER span per call, parented on the caller's `traceparent`, with its baggage.

    Records `rpc.server.call.duration`. The handler runs with the span and the caller's
    baggage as the current context; `server_span()` and `reply_with_baggage()` reach the call.
    Health checks are not traced unless `skip` says otherwise. `server` (e.g. from
    `listen_attributes`) is recorded on every span: `server.address`, `server.port`.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        propagator: TextMapPropagator = PROPAGATOR,
        skip: Callable[[str], bool] = _health_check,
        server: Mapping[str, Any] | None = None,
    ) -> None:
        self._server = MappingProxyType(dict(server or {}))
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(__name__, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            SERVER_DURATION,
            unit="s",
            description="Duration of incoming RPCs",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._propagator = propagator
        self._skip = skip

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._skip(method):
            return handler
        kwargs: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method), **kwargs
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method), **kwargs
            )
        return handler

    def _begin(self, full_method: str, context: grpc.ServicerContext) -> _ServerCall | None:
        try:
            parent = self._propagator.extract(_carrier(context.invocation_metadata()))
            span = self._tracer.start_span(
                _span_name(full_method), context=parent, kind=SpanKind.SERVER
            )
            if span.is_recording():
                span.set_attributes(rpc_attributes(full_method))
                span.set_attributes(self._server)
                span.set_attributes(_peer_attributes(context.peer()))
            call = _ServerCall(span, full_method, time.perf_counter())
            call.context = context_api.set_value(
                _CALL_KEY, call, trace.set_span_in_context(span, parent)
            )
            return call
        except Exception:
            log.debug("could not start a server span", exc_info=True)
            return None

    def _end(
        self,
        call: _ServerCall,
        context: grpc.ServicerContext,
        error: BaseException | None,
        otherwise: grpc.StatusCode | None = None,
    ) -> None:
        """End the span with the call's status (`otherwise` when the handler set none)."""
        try:
            code = _status_code(context) or otherwise
            if code is None:
                code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            if code is grpc.StatusCode.OK and call.reply_baggage:
                trailing = tuple(context.trailing_metadata() or ())
                header = _baggage_header(call.reply_baggage)
                context.set_trailing_metadata((*trailing, ("baggage", header)))
            _record_status(call.span, code, SERVER_ERROR_CODES)
            # abort() raises a bare Exception after recording the status: not worth an event.
            if error is not None and type(error) is not Exception:
                call.span.record_exception(error)
            call.span.end()
            elapsed = time.perf_counter() - call.started
            self._duration.record(elapsed, _duration_attributes(call.full_method, code))
        except Exception:
            log.debug("could not end a server span", exc_info=True)

    def _wrap_unary(
        self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            call = self._begin(method, context)
            if call is None:
                return behavior(request, context)
            token = context_api.attach(call.context)
            try:
                response = behavior(request, context)
            except BaseException as error:
                context_api.detach(token)
                self._end(call, context, error)
                raise
            context_api.detach(token)
            self._end(call, context, None)
            return response

        return unary

    def _wrap_stream(
        self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._begin(method, context)
            if call is None:
                yield from behavior(request, context)
                return
            # The context is attached only while the handler produces an item, so that it is
            # always detached in the thread and frame that attached it.
            try:
                responses = _in_context(call.context, lambda: iter(behavior(request, context)))
            except BaseException as error:
                self._end(call, context, error)
                raise
            try:
                while True:
                    try:
                        item = _in_context(call.context, lambda: next(responses))
                    except StopIteration:
                        break
                    yield item
            except GeneratorExit:  # the server stopped pulling: cancelled or shutting down
                _close(responses, call.context)
                self._end(call, context, None, grpc.StatusCode.CANCELLED)
                raise
            except BaseException as error:
                self._end(call, context, error)
                raise
            ended_early = None if context.is_active() else grpc.StatusCode.CANCELLED
            self._end(call, context, None, ended_early)

        return stream


def _in_context(context: Context, produce: Callable[[], Any]) -> Any:
    token = context_api.attach(context)
    try:
        return produce()
    finally:
        context_api.detach(token)


def _close(responses: Iterator[Any] | None, context: Context) -> None:
    close = getattr(responses, "close", None)
    if callable(close):
        _in_context(context, close)


def _record_status(span: Span, code: grpc.StatusCode, errors: frozenset[grpc.StatusCode]) -> None:
    if not span.is_recording():
        return
    span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
    span.set_attribute(RPC_RESPONSE_STATUS_CODE, code.name)
    if code is not grpc.StatusCode.OK:
        span.set_attribute(ERROR_TYPE, code.name)
    if code in errors:
        span.set_status(Status(StatusCode.ERROR, code.name))


# --- client side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


_ALL_CODES = frozenset(grpc.StatusCode) - {grpc.StatusCode.OK}

_Trailing = Callable[[], Iterable[tuple[str, Any]] | None]


class _ClientSpans:
    """What the synchronous and the asyncio client interceptors share: a CLIENT span per
    call, and the call's metadata carrying that span's context (see ClientTracingInterceptor
    for the arguments)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        propagator: TextMapPropagator = PROPAGATOR,
        attributes: Callable[[], Mapping[str, str]] | None = None,
        target: str = "",
        parent: Context | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._propagator = propagator
        self._attributes = attributes
        self._server = MappingProxyType(target_attributes(target))
        self._parent = parent

    def _start(
        self, full_method: str, metadata: Iterable[tuple[str, Any]] | None
    ) -> tuple[Span, tuple[tuple[str, Any], ...]]:
        """The call's span, started, and `metadata` with its context in place of any
        propagation headers it had."""
        parent = None
        if self._parent is not None and not trace.get_current_span().get_span_context().is_valid:
            parent = self._parent
        span = self._tracer.start_span(
            _span_name(full_method), context=parent, kind=SpanKind.CLIENT
        )
        if span.is_recording():
            span.set_attributes(rpc_attributes(full_method))
            span.set_attributes(self._server)
            if self._attributes is not None:
                span.set_attributes(self._attributes())
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span, parent))
        kept = [(k, v) for k, v in metadata or () if k not in _PROPAGATION_KEYS]
        return span, (*kept, *carrier.items())


class ClientTracingInterceptor(
    _ClientSpans,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A CLIENT span per call; `traceparent` and the current baggage go out in the metadata.

    Run entries of the baggage the server sends back (the broker does when it starts a run)
    are recorded on the client span. `attributes`, when given, is asked for more attributes
    as each span starts (facts the calling service knows itself). `target` is the channel's
    target, for `server.address` and `server.port`. `parent` is the context a call joins when
    no span is current (e.g. `environment_context()`). Without a provider the global one is
    used; a no-op one still passes the parent's trace context on. For grpc.aio channels see
    `aio_interceptors`.
    """

    def _intercept(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> tuple[Any, Span | None]:
        try:
            span, metadata = self._start(details.method, details.metadata)
            traced = _CallDetails(
                method=details.method,
                timeout=details.timeout,
                metadata=metadata,
                credentials=details.credentials,
                wait_for_ready=details.wait_for_ready,
                compression=getattr(details, "compression", None),
            )
        except Exception:
            log.debug("could not start a client span", exc_info=True)
            return continuation(details, request), None
        try:
            return continuation(traced, request), span
        except BaseException:
            _end_client(span, grpc.StatusCode.UNKNOWN, None)
            raise

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        call, span = self._intercept(continuation, client_call_details, request)
        if span is not None:
            call.add_done_callback(lambda future: _end_unary(span, future))
        return call

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self.intercept_unary_unary(continuation, client_call_details, request_iterator)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        call, span = self._intercept(continuation, client_call_details, request)
        if span is None:
            return call

        def done() -> None:
            _end_client(span, call.code(), call.trailing_metadata)

        if not call.add_callback(done):  # already terminated
            done()
        return call

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self.intercept_unary_stream(continuation, client_call_details, request_iterator)


def _end_unary(span: Span, future: Any) -> None:
    # A failed synchronous call arrives as an outcome whose exception() is the RpcError (and
    # whose own code() says INTERNAL); a future or a successful outcome is itself the call.
    try:
        if future.cancelled():
            _end_client(span, grpc.StatusCode.CANCELLED, None)
            return
        error = future.exception()
        if error is None:
            _end_client(span, future.code(), future.trailing_metadata)
        elif isinstance(error, grpc.Call):
            _end_client(span, error.code(), error.trailing_metadata)
        else:
            _end_client(span, grpc.StatusCode.UNKNOWN, None)
    except Exception:
        log.debug("could not read the outcome of a call", exc_info=True)
        span.end()


def _end_client(span: Span, code: grpc.StatusCode | None, trailing: _Trailing | None) -> None:
    """Record the call's status (and the run baggage in its trailing metadata) and end it."""
    try:
        code = code or grpc.StatusCode.UNKNOWN
        _record_status(span, code, _ALL_CODES)
        if trailing is not None and span.is_recording():
            span.set_attributes(run_baggage_of(trailing()))
    except Exception:
        log.debug("could not record the outcome of a call", exc_info=True)
    finally:
        span.end()


def intercept_channel(
    channel: grpc.Channel,
    tracer_provider: trace.TracerProvider | None = None,
    *,
    attributes: Callable[[], Mapping[str, str]] | None = None,
    target: str = "",
    parent: Context | None = None,
) -> grpc.Channel:
    """`channel` with a ClientTracingInterceptor in front (`target`: the channel's, for
    `server.address`/`server.port`; `parent`: the context to join when no span is current)."""
    interceptor = ClientTracingInterceptor(
        tracer_provider, attributes=attributes, target=target, parent=parent
    )
    return grpc.intercept_channel(channel, interceptor)


def client_interceptor(
    tracer_provider: trace.TracerProvider | None, *, target: str = ""
) -> ClientTracingInterceptor | None:
    """The interceptor `BrokerClient` traces its calls with: one joining the trace in the
    environment (`TRACEPARENT`) when no span is current, or None when there is no provider and
    no such trace (an interceptor that can only make no-op spans is not worth its cost)."""
    parent = environment_context()
    if tracer_provider is None and parent is None:
        return None
    return ClientTracingInterceptor(tracer_provider, target=target, parent=parent)


# --- client side, asyncio --------------------------------------------------------------------


class _AsyncClientSpans(_ClientSpans):
    async def _call(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> tuple[Any, Span | None]:
        """The call `continuation` makes, with its span (None when none could start)."""
        try:
            method = details.method  # bytes in grpc.aio, whatever its typing stubs say
            full_method = method.decode() if isinstance(method, bytes) else method
            span, metadata = self._start(full_method, details.metadata)
            traced = grpc.aio.ClientCallDetails(
                method,
                details.timeout,
                grpc.aio.Metadata(*metadata),
                details.credentials,
                details.wait_for_ready,
            )
        except Exception:
            log.debug("could not start a client span", exc_info=True)
            return await continuation(details, request), None
        try:
            return await continuation(traced, request), span
        except asyncio.CancelledError:
            _end_client(span, grpc.StatusCode.CANCELLED, None)
            raise
        except BaseException:
            _end_client(span, grpc.StatusCode.UNKNOWN, None)
            raise


async def _end_when_done(span: Span, call: Any) -> None:
    """End `span` with an asyncio call's status once it has one. Cancelled while it waits
    (whoever awaited the call was), it cancels the call: nobody is left to read its answer."""
    try:
        code = await call.code()
        trailing = await call.trailing_metadata()
    except asyncio.CancelledError:
        call.cancel()
        _end_client(span, grpc.StatusCode.CANCELLED, None)
        raise
    except Exception:
        log.debug("could not read the outcome of a call", exc_info=True)
        span.end()
        return
    _end_client(span, code, lambda: trailing)


class AsyncUnaryUnaryTracingInterceptor(_AsyncClientSpans, grpc.aio.UnaryUnaryClientInterceptor):
    """ClientTracingInterceptor for a grpc.aio channel's unary calls: the span ends with the
    call's status before the caller's `await` returns."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        call, span = await self._call(continuation, client_call_details, request)
        if span is not None:
            await _end_when_done(span, call)
        return call


class AsyncUnaryStreamTracingInterceptor(_AsyncClientSpans, grpc.aio.UnaryStreamClientInterceptor):
    """ClientTracingInterceptor for a grpc.aio channel's server-streaming calls: the span
    ends when the stream does — its last message read, an error, or cancelled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The event loop holds tasks weakly: these are kept until they have ended their span.
        self._ending: set[asyncio.Task[None]] = set()

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        call, span = await self._call(continuation, client_call_details, request)
        if span is not None:
            ending = asyncio.ensure_future(_end_when_done(span, call))
            self._ending.add(ending)
            ending.add_done_callback(self._ending.discard)
        return call


def aio_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
    *,
    attributes: Callable[[], Mapping[str, str]] | None = None,
    target: str = "",
    parent: Context | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that trace a grpc.aio channel's unary and server-streaming calls as
    ClientTracingInterceptor does a synchronous one's (same arguments):
    `grpc.aio.insecure_channel(target, interceptors=tracing.aio_interceptors(provider))`.
    Two of them, because grpc.aio gives each interceptor one kind of call."""
    options: dict[str, Any] = {"attributes": attributes, "target": target, "parent": parent}
    return [
        AsyncUnaryUnaryTracingInterceptor(tracer_provider, **options),
        AsyncUnaryStreamTracingInterceptor(tracer_provider, **options),
    ]


def aio_client_interceptors(
    tracer_provider: trace.TracerProvider | None, *, target: str = ""
) -> list[grpc.aio.ClientInterceptor]:
    """`client_interceptor` for `AsyncBrokerClient`: none without a provider or a trace in the
    environment to join."""
    parent = environment_context()
    if tracer_provider is None and parent is None:
        return []
    return aio_interceptors(tracer_provider, target=target, parent=parent)
