"""Authorization: which caller may do what, on which pipeline or run.

The domain asks before it acts: `authorizer.require(ctx, Op.X, pipeline=..., run=...)`
raises `PermissionDenied` (and audits the denial) or returns. Deny by default.
"""

from __future__ import annotations

import enum
from typing import Protocol

from broker.context import CallContext
from broker.runs import PipelineRef, Run


class Op(enum.Enum):
    """What a caller asks to do. Each RPC maps to exactly one."""

    START_RUN = "start_run"
    EXECUTE_ON_BEHALF = "execute_on_behalf"
    RENEW_RUN = "renew_run"
    ISSUE_TOKEN = "issue_token"
    VERIFY_TOKEN = "verify_token"
    REVOKE_RUN = "revoke_run"
    READ_RUN = "read_run"
    LIST_RUNS = "list_runs"
    READ_AUDIT = "read_audit"
    ROTATE_KEYS = "rotate_keys"


class Authorizer(Protocol):
    def require(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> None:
        """Return if allowed; otherwise audit the denial and raise PermissionDenied."""
        ...


class AllowAll:
    """Placeholder until policy-based authorization is wired in (development only)."""

    def require(
        self,
        ctx: CallContext,
        op: Op,
        *,
        pipeline: PipelineRef | None = None,
        run: Run | None = None,
    ) -> None:
        return None
