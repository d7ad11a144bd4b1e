"""What can go wrong when calling the broker, as a small exception hierarchy.

Every failed call of `BrokerClient` and `AsyncBrokerClient` raises a `BrokerError` subclass
made by `from_rpc_error` — the one place a gRPC status becomes an exception — and chained
to the original `grpc.RpcError` with `from`, so nothing is lost when debugging::

    try:
        client.get_run("r-unknown")
    except NotFound:
        ...
    except InvalidRequest as error:
        for violation in error.violations:    # which field broke which rule
            print(violation.field, violation.description)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID_HEADER = "x-request-id"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One request field the broker rejected, and the rule it broke."""

    field: str
    description: str


class BrokerError(Exception):
    """Base of every error a broker call raises.

    `code` is the gRPC status, `message` the broker's explanation (meant for people) and
    `request_id` the id the broker logged the call under — quote it when asking for help.
    """

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, request_id: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        code = f"{self.code.name}: " if self.code is not None else ""
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{code}{self.message}{suffix}"


class InvalidRequest(BrokerError):
    """INVALID_ARGUMENT: the request is malformed; `violations` name each field and rule."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str = "",
        violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(message, code=code, request_id=request_id)
        self.violations = tuple(violations)

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the rejected fields."""
        return tuple(v.field for v in self.violations)


class Unauthenticated(BrokerError):
    """UNAUTHENTICATED: no credential, or one the broker does not accept (expired, revoked)."""


class PermissionDenied(BrokerError):
    """PERMISSION_DENIED: the broker knows the caller, and the policy does not allow this."""


class NotFound(BrokerError):
    """NOT_FOUND: no such run (or none this caller may see)."""


class Conflict(BrokerError):
    """ALREADY_EXISTS: e.g. an idempotency key reused with different parameters."""


class RunNotActive(BrokerError):
    """FAILED_PRECONDITION: the run has ended or expired, so it can mint nothing more."""


class OutOfRange(BrokerError):
    """OUT_OF_RANGE: e.g. an audit cursor outside the retained log."""


class Unavailable(BrokerError):
    """UNAVAILABLE: the broker cannot serve now; the client already retried where safe."""


class DeadlineExceeded(BrokerError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline (retries included)."""


class Internal(BrokerError):
    """INTERNAL, UNKNOWN and other server faults: a bug; the request id finds it in the logs."""


class ConfigurationError(BrokerError):
    """The client cannot be set up from what it was given (a missing variable or key file)."""


_ERROR_FOR_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: RunNotActive,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}


def from_rpc_error(error: grpc.RpcError, request_id: str = "") -> BrokerError:
    """The `BrokerError` for a failed call (sync or asyncio); the caller chains it with `from`.

    `request_id` is the id the client sent; the broker's own answer wins when present.
    """
    code = _code(error)
    message = _details(error) or (code.name.lower().replace("_", " ") if code else "failed")
    request_id = _metadata_value(_initial_metadata(error), REQUEST_ID_HEADER) or request_id
    error_type = _ERROR_FOR_CODE.get(code, BrokerError) if code else BrokerError
    if error_type is InvalidRequest:
        return InvalidRequest(
            message, code=code, request_id=request_id, violations=field_violations(error)
        )
    return error_type(message, code=code, request_id=request_id)


def broker_answered(error: grpc.RpcError) -> bool:
    """True when the broker's own handler produced the status (it sends a request id first);
    False when the call failed on the way (connection refused or reset, proxy, no server)."""
    return bool(_metadata_value(_initial_metadata(error), REQUEST_ID_HEADER))


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status code of a failed call, sync or asyncio."""
    return _code(error)


def field_violations(error: grpc.RpcError) -> tuple[FieldViolation, ...]:
    """The google.rpc.BadRequest field violations carried in the status details, if any."""
    raw = _metadata_value(_trailing_metadata(error), _STATUS_DETAILS_KEY, binary=True)
    if not raw:
        return ()
    status = status_pb2.Status.FromString(raw)
    violations: list[FieldViolation] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
    return tuple(violations)


# grpc.RpcError itself declares nothing; the sync and asyncio errors are also grpc.Call-like.
def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    result = code() if callable(code) else None
    return result if isinstance(result, grpc.StatusCode) else None


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    result = details() if callable(details) else None
    return result if isinstance(result, str) else ""


def _initial_metadata(error: grpc.RpcError) -> Any:
    getter = getattr(error, "initial_metadata", None)
    return getter() if callable(getter) else None


def _trailing_metadata(error: grpc.RpcError) -> Any:
    getter = getattr(error, "trailing_metadata", None)
    return getter() if callable(getter) else None


def _metadata_value(metadata: Any, key: str, *, binary: bool = False) -> Any:
    """One value from sync metadata (tuples of pairs) or asyncio `grpc.aio.Metadata`."""
    if not metadata:
        return None
    for item_key, value in metadata:
        if item_key == key and isinstance(value, bytes if binary else str):
            return value
    return None
