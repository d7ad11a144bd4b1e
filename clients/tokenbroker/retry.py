"""When a failed call may be tried again, and how long to wait: shared by both clients.

Only UNAVAILABLE is retried — the broker (or the way to it) is briefly unable to serve —
and a CANCELLED that the *server* sent, which means the same: a broker shutting down
cancels the calls it had queued but not yet handed to a handler, and those it could not
finish within its grace period (a cancellation by this process — `cancel()`, a closed
channel — is never retried). Both only where a second attempt cannot do something twice
that the caller asked once:

- reads: GetRun, ListRuns (page by page), GetSigningKeys, VerifyToken;
- RevokeRun (ending an ended run reports `already_ended`) and RenewRun (a lease renewed
  twice ends at the same time);
- IssueToken: if the first answer was lost, the retry mints a second token. That is safe:
  the lost token never reached anyone, expires by itself within its TTL and dies with the
  run; both issuances are audited, so the audit log may show one more token than was used;
- StartRun only with an idempotency key: the broker then returns the same run on a retry.
  Without one a lost answer may have started a run, and a retry would start another;
- ExecuteOnBehalfOf always carries a key (the client makes one per call when the caller
  gives none) but is retried only when the call never reached the broker's handler
  (connection refused or reset). An UNAVAILABLE the broker decided itself means the
  executor refused the run and the broker ended it: the same key would only replay the
  ended run, so the caller must call again (which makes a new key);
- never RotateSigningKey: each call makes a new key.

StreamAudit is resumable instead: the stream picks up after the last sequence it saw.

Every retry waits an exponentially growing, fully jittered delay, and all attempts share
the call's one deadline: a retry that could not finish in time is not started.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from tokenbroker.errors import broker_answered, status_code
from tokenbroker.v1 import broker_pb2

# Below this much remaining time an attempt cannot usefully be made.
MIN_ATTEMPT_TIMEOUT = 0.001


class Retry(enum.Enum):
    """Whether a call may be retried after UNAVAILABLE."""

    NEVER = "never"
    ON_UNAVAILABLE = "on unavailable"
    # Only when the broker's handler never answered (the request did not get in).
    IF_NOT_RECEIVED = "if not received"


_RULES: dict[type[Message], Retry] = {
    broker_pb2.GetRunRequest: Retry.ON_UNAVAILABLE,
    broker_pb2.ListRunsRequest: Retry.ON_UNAVAILABLE,
    broker_pb2.GetSigningKeysRequest: Retry.ON_UNAVAILABLE,
    broker_pb2.VerifyTokenRequest: Retry.ON_UNAVAILABLE,
    broker_pb2.RevokeRunRequest: Retry.ON_UNAVAILABLE,
    broker_pb2.RenewRunRequest: Retry.ON_UNAVAILABLE,
    broker_pb2.IssueTokenRequest: Retry.ON_UNAVAILABLE,
    broker_pb2.ExecuteOnBehalfOfRequest: Retry.IF_NOT_RECEIVED,
    broker_pb2.RotateSigningKeyRequest: Retry.NEVER,
}


def rule_for(request: Message) -> Retry:
    """The retry rule for one request (see the module docstring for why)."""
    if isinstance(request, broker_pb2.StartRunRequest):
        return Retry.ON_UNAVAILABLE if request.idempotency_key else Retry.NEVER
    return _RULES.get(type(request), Retry.NEVER)


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a retryable call gets and how long to wait between them."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    # Spreads retries of many clients apart: a fraction in [0, 1) of the backoff cap.
    jitter: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.initial_backoff <= self.max_backoff or self.multiplier < 1:
            raise ValueError("need 0 <= initial_backoff <= max_backoff and multiplier >= 1")

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry `retry_number` (0 for the first): full jitter."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**retry_number)
        return self.jitter() * cap


NO_RETRY = RetryPolicy(max_attempts=1)


class Attempts:
    """The attempts of one logical call: what time each has left, and whether to go again."""

    def __init__(
        self,
        policy: RetryPolicy,
        rule: Retry,
        timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._rule = rule
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self.made = 0

    def timeout(self) -> float | None:
        """The deadline left for the next attempt (None: no deadline); counts the attempt."""
        self.made += 1
        if self._deadline is None:
            return None
        return max(self._deadline - self._clock(), MIN_ATTEMPT_TIMEOUT)

    def delay_before_retry(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before trying again, or None when the error is final."""
        if not retryable(self._rule, error):
            return None
        return self.next_delay()

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when attempts or time ran out."""
        if self.made >= self._policy.max_attempts:
            return None
        delay = self._policy.backoff(self.made - 1)
        if self._deadline is not None and self._clock() + delay >= self._deadline:
            return None
        return delay

    def progressed(self) -> None:
        """The open attempt (a stream) made progress: earlier failures no longer count."""
        self.made = min(self.made, 1)


# What grpc says when this process cancelled the call itself (grpc._channel, grpc.aio._call).
_LOCAL_CANCELLATIONS = frozenset(
    {
        "Locally cancelled by application!",
        "Channel closed!",
        "Cancelled upon garbage collection!",
    }
)


def retryable(rule: Retry, error: grpc.RpcError) -> bool:
    """Whether `error` may be retried under `rule`."""
    if rule is Retry.NEVER or not _unavailable(error):
        return False
    return rule is Retry.ON_UNAVAILABLE or not broker_answered(error)


def _unavailable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE, or CANCELLED by the server (a broker draining on SIGTERM)."""
    code = status_code(error)
    if code is grpc.StatusCode.UNAVAILABLE:
        return True
    if code is not grpc.StatusCode.CANCELLED:
        return False
    details = error.details() if hasattr(error, "details") else None
    return details not in _LOCAL_CANCELLATIONS
