"""What the domain tells telemetry, without knowing how telemetry works.

Domain components take an `Observer` (as they take an `Authorizer`) and report facts from the
broker's own records: which run the current call acted on, a token issued, a verification.
The OpenTelemetry implementation lives in `broker/telemetry.py`; `NULL_OBSERVER` does nothing.
Implementations never raise: observing must not change the outcome of a call.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Protocol

from broker.runs.model import Run


class Observer(Protocol):
    def call_touched_run(self, run: Run) -> None:
        """The call being served acted on `run` (read, renewed, ended, issued a token for it)."""
        ...

    def call_started_run(self, run: Run) -> None:
        """The call being served started `run` (or returned it for a repeated idempotency key);
        the caller is told the run's trace context."""
        ...

    def run_revoked(self, run: Run, already_ended: bool) -> None: ...

    def token_issued(self, audience: str, outcome: str) -> None:
        """A step token was issued ("issued") or refused ("refused", ...) for `audience`."""
        ...

    def token_verified(self, result: str) -> None:
        """A token was verified; `result` is the outcome ("active", "expired", ...)."""
        ...

    def audit_delivered(self, lag: int) -> None:
        """An audit event went to a subscriber `lag` events behind the newest one."""
        ...

    def handing_off(self, run: Run) -> AbstractContextManager[None]:
        """Wrap the call that hands `run` to an executor: it carries the run's trace context."""
        ...


class NullObserver:
    def call_touched_run(self, run: Run) -> None:
        pass

    def call_started_run(self, run: Run) -> None:
        pass

    def run_revoked(self, run: Run, already_ended: bool) -> None:
        pass

    def token_issued(self, audience: str, outcome: str) -> None:
        pass

    def token_verified(self, result: str) -> None:
        pass

    def audit_delivered(self, lag: int) -> None:
        pass

    def handing_off(self, run: Run) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


NULL_OBSERVER: Observer = NullObserver()
