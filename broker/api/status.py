"""The one mapping from domain errors to gRPC status, with google.rpc details where they help."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker import errors, limits

# A status message is for people and may end up in logs: never longer than this.
MAX_MESSAGE = 1024

# Most specific first: the first matching type wins.
STATUS_OF: tuple[tuple[type[errors.BrokerError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.BrokerError, grpc.StatusCode.INTERNAL),
)


def status_code_for(error: errors.BrokerError) -> grpc.StatusCode:
    for error_type, code in STATUS_OF:
        if isinstance(error, error_type):
            return code
    raise AssertionError("BrokerError is the last entry")  # pragma: no cover


def to_status(error: errors.BrokerError) -> grpc.Status:
    """A grpc.Status for `error`; BadRequest field violations ride in the details."""
    code = status_code_for(error)
    message = (
        error.message
        if len(error.message) <= MAX_MESSAGE
        else limits.shown(error.message, MAX_MESSAGE)
    )
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if isinstance(error, errors.InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.rule)
                    for v in error.violations
                ]
            )
        )
        status.details.append(detail)
    if isinstance(error, errors.ResourceExhausted) and error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, round(error.retry_after * 1000)))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def internal_status(request_id: str) -> grpc.Status:
    """What a caller sees for a bug: no traceback, a request id to find it in the logs."""
    message = f"internal error; the broker logged it with request id {request_id}"
    result: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message=message)
    )
    return result
