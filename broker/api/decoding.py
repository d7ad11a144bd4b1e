"""Undecodable request bodies answer INVALID_ARGUMENT, for every service on the server.

grpcio's sync server turns an exception in a request deserializer into INTERNAL
"Exception deserializing request!" and logs a traceback per call. `DecodeGuard`, the
outermost interceptor, gives every handler (TokenBrokerService, health, reflection) a
deserializer that returns an `Undecodable` marker instead of raising, and a behaviour that
answers that marker with INVALID_ARGUMENT before anything else runs — no authentication,
no audit write, no traceback. Well-formed requests pass through untouched, so reflection-
based clients (grpcurl) work as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from broker.api import status
from broker.errors import InvalidArgument

log = logging.getLogger(__name__)

RULE = "not a valid protobuf encoding of this method's request message"


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request body the method's deserializer could not parse."""

    size: int


def guarded(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, and anything a hostile body may provoke
            return Undecodable(len(data))

    return deserialize


def _refuse(context: grpc.ServicerContext, method: str, body: Undecodable) -> None:
    log.info("call refused", extra={"method": method, "error": "Undecodable", "bytes": body.size})
    context.abort_with_status(status.to_status(InvalidArgument.field("request", RULE)))


class DecodeGuard(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        codec = {
            "request_deserializer": guarded(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _single(handler.unary_unary, method), **codec
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _single(handler.unary_stream, method), **codec
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _streamed(handler.stream_unary, method), **codec
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _streamed(handler.stream_stream, method), **codec
            )
        return handler


def _single(behavior: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            _refuse(context, method, request)
        return behavior(request, context)

    return call


def _streamed(behavior: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], Any]:
    def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        def checked() -> Iterator[Any]:
            for request in requests:
                if isinstance(request, Undecodable):
                    _refuse(context, method, request)
                yield request

        return behavior(checked(), context)

    return call
