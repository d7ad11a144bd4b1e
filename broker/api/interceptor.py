"""Per-call plumbing shared by every RPC: request id, caller identity and error mapping.

`CallInterceptor` wraps each tokenbroker handler so that, in the handler's own thread, the
call's `CallContext` is set before the servicer runs and every exception leaves as a proper
status: domain errors through `status.to_status`, anything else as INTERNAL with a request
id (logged with its traceback here, never sent to the caller).
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import grpc

from broker import limits
from broker.api import status, validation
from broker.context import CallContext
from broker.errors import BrokerError
from broker.identity import ANONYMOUS, Principal
from broker.ids import new_request_id
from broker.telemetry import otel as telemetry

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/tokenbroker.v1."
REQUEST_ID_HEADER = "x-request-id"
# Which worker process of `serve --workers` served the call (its index), sent beside the
# request id: for correlating a call with that worker's logs.
WORKER_HEADER = "x-broker-worker"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar("call")

# Given the gRPC context and full method name, return the authenticated principal
# (ANONYMOUS when no credential was presented) or raise Unauthenticated.
Authenticator = Callable[[grpc.ServicerContext, str], Principal]


def current() -> CallContext:
    """The CallContext of the RPC being served on this thread."""
    return _current.get()


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID_PATTERN.match(value):
            return value
    return new_request_id()


def _anonymous(context: grpc.ServicerContext, method: str) -> Principal:
    return ANONYMOUS


class CallInterceptor(grpc.ServerInterceptor):
    def __init__(self, authenticate: Authenticator = _anonymous, served_by: str = "") -> None:
        self._authenticate = authenticate
        self._served_by = ((WORKER_HEADER, served_by),) if served_by else ()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=_passing_bytes(handler.response_serializer),
            )
        return handler

    def _enter(
        self, context: grpc.ServicerContext, method: str, request: Any, *, unary: bool
    ) -> CallContext:
        request_id = _request_id(context)
        answer = ((REQUEST_ID_HEADER, request_id), *self._served_by)
        if unary:
            # With the status, in the batch that ends the call: sending it first, as initial
            # metadata, cost an extra batch and wake-up of gRPC's polling thread per call
            # (~50 µs). A failed call still sends it as initial metadata (`_announce`).
            context.set_trailing_metadata(answer)
        else:
            context.send_initial_metadata(answer)  # once per stream, before its responses
        # Set a bare context first so an authentication failure is still correlated.
        trace_id = telemetry.current_trace_id()
        _current.set(CallContext(request_id=request_id, trace_id=trace_id))
        principal = self._authenticate(context, method)
        call = CallContext(principal=principal, request_id=request_id, trace_id=trace_id)
        _current.set(call)
        telemetry.annotate_call(call)
        # Authenticated first (an anonymous call learns nothing about its request), then
        # every field against its limit before the servicer or the domain sees it.
        validation.check(request)
        return call

    def _announce(self, context: grpc.ServicerContext) -> None:
        """A failed unary call's request id as initial metadata, where clients (this
        library's and older ones) read it, and from which they tell that the broker
        answered (which decides whether a call may be retried)."""
        call = _current.get(None)
        if call is not None:
            context.send_initial_metadata(((REQUEST_ID_HEADER, call.request_id), *self._served_by))

    def _wrap_unary(
        self, behavior: Callable[[Any, Any], Any], method: str
    ) -> Callable[[Any, Any], Any]:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            def run() -> Any:
                try:
                    self._enter(context, method, request, unary=True)
                    return behavior(request, context)
                except BrokerError as error:
                    self._announce(context)
                    _abort(context, method, error)
                except Exception:
                    self._announce(context)
                    _abort_internal(context, method)

            return contextvars.copy_context().run(run)

        return unary

    def _wrap_stream(
        self, behavior: Callable[[Any, Any], Iterator[Any]], method: str
    ) -> Callable[[Any, Any], Iterator[Any]]:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            ctx = contextvars.copy_context()
            try:
                ctx.run(partial(self._enter, unary=False), context, method, request)
                responses = ctx.run(behavior, request, context)
                while True:
                    try:
                        item = ctx.run(next, responses)
                    except StopIteration:
                        return
                    yield item
            # In the call's context, so the refusal is logged with its request id.
            except BrokerError as error:
                ctx.run(_abort, context, method, error)
            except Exception:
                ctx.run(_abort_internal, context, method)

        return stream


def _passing_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A stream may send responses it has already serialised (StreamAudit puts them together
    from events encoded once for all streams): bytes go out as they are."""

    def serialize(message: Any) -> bytes:
        if type(message) is bytes:
            return message
        assert serializer is not None
        return serializer(message)

    return serialize


def _abort(context: grpc.ServicerContext, method: str, error: BrokerError) -> None:
    call = _current.get(None)
    log.info(
        "call refused",
        extra={
            "method": method,
            "error": type(error).__name__,
            "reason": limits.shown(error.message, 512),
            "request_id": call.request_id if call else "",
            "principal": call.principal.name if call else "",
        },
    )
    context.abort_with_status(status.to_status(error))


def _abort_internal(context: grpc.ServicerContext, method: str) -> None:
    call = _current.get(None)
    request_id = call.request_id if call else new_request_id()
    log.exception("call failed", extra={"method": method, "request_id": request_id})
    context.abort_with_status(status.internal_status(request_id))
