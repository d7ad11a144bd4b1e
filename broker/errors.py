"""Domain errors. They carry what a caller needs to fix the request and nothing else.

This module knows nothing of gRPC: `broker.api.status` maps each type to a status code.
"""

from __future__ import annotations

from dataclasses import dataclass


class BrokerError(Exception):
    """Base of every error the broker reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field and the rule it broke."""

    field: str
    rule: str


class InvalidArgument(BrokerError):
    """The request is malformed; `violations` name each field and rule."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = tuple(violations)
        summary = "; ".join(f"{v.field}: {v.rule}" for v in violations)
        super().__init__(f"invalid request: {summary}")

    @classmethod
    def field(cls, field: str, rule: str) -> InvalidArgument:
        return cls([FieldViolation(field, rule)])


class Unauthenticated(BrokerError):
    """The caller did not prove who it is (missing, expired or bad credential)."""


class PermissionDenied(BrokerError):
    """The caller is known but may not do this."""


class ScopeExceeded(PermissionDenied):
    """The caller may act, but asked for more than it may grant: permissions beyond a run's
    ceiling. (OAuth answers it as `invalid_scope`; gRPC as any PermissionDenied.)"""


class NotFound(BrokerError):
    """The named thing does not exist (or is invisible to this caller)."""


class AlreadyExists(BrokerError):
    """A conflicting thing exists, e.g. an idempotency key reused with other parameters."""


class FailedPrecondition(BrokerError):
    """The system is not in a state that allows this, e.g. minting for an ended run."""


class OutOfRange(BrokerError):
    """A cursor or position lies outside what is available."""


class ResourceExhausted(BrokerError):
    """The caller used up a limit (call rate, open streams); `retry_after` seconds until it
    may try again, when known."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(BrokerError):
    """The broker cannot serve this now (storage refused a write, shutting down); retry later."""


class DataLoss(BrokerError):
    """Stored data is missing or corrupt (e.g. a gap in the audit chain)."""
