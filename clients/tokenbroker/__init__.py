"""token-broker's Python client: short-lived, run-scoped tokens for CI/CD pipeline runs.

    from tokenbroker import BrokerClient

    with BrokerClient.local() as broker:
        started = broker.start_run("acme", "web", "deploy", ceiling={"artifacts": "write"})

- `BrokerClient` (sync) and `AsyncBrokerClient` (asyncio): one method per RPC.
- `step_token(audience, permissions)`: in a pipeline step, the step's token from the run
  credential in the environment (TOKEN_BROKER_TARGET, TOKEN_BROKER_RUN_CREDENTIAL).
- `TokenVerifier` (with `JwksCache`, `RevocationFollower`): offline verification for APIs;
  `TokenVerifier.for_broker(target, credentials, audience=...)` sets it up in one call.
- Errors: `BrokerError` and its subclasses (`tokenbroker.errors`).
- Credentials: `assertion_credentials`, `bearer_credentials`, `dev_admin_credentials`.
- Bound tokens (RFC 9449 DPoP): `DPoPKey`, `StepToken`, `DPoPAuth` (requests/httpx),
  `dpop_credentials` (gRPC); checking proofs: `tokenbroker.dpop`.
- The generated messages and stubs: `tokenbroker.v1`.

Names are imported on first use (PEP 562), so an API that only imports
`tokenbroker.verification` loads neither gRPC nor the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenbroker.aio import AsyncAuditStream, AsyncBrokerClient
    from tokenbroker.bound import DPoPAuth, StepToken, dpop_credentials
    from tokenbroker.client import AuditStream, BrokerClient, step_token
    from tokenbroker.connect import RunEnvironment, TlsOptions
    from tokenbroker.credentials import (
        assertion_credentials,
        bearer_credentials,
        dev_admin_credentials,
        local_channel,
        tls_channel,
    )
    from tokenbroker.dpop import DPoPKey
    from tokenbroker.errors import (
        BrokerError,
        ConfigurationError,
        Conflict,
        DeadlineExceeded,
        FieldViolation,
        Internal,
        InvalidRequest,
        NotFound,
        OutOfRange,
        PermissionDenied,
        RunNotActive,
        Unauthenticated,
        Unavailable,
    )
    from tokenbroker.retry import NO_RETRY, RetryPolicy
    from tokenbroker.verification import TokenStatus
    from tokenbroker.verifier import JwksCache, RevocationFollower, TokenRejected, TokenVerifier

__all__ = [
    "NO_RETRY",
    "AsyncAuditStream",
    "AsyncBrokerClient",
    "AuditStream",
    "BrokerClient",
    "BrokerError",
    "ConfigurationError",
    "Conflict",
    "DPoPAuth",
    "DPoPKey",
    "DeadlineExceeded",
    "FieldViolation",
    "Internal",
    "InvalidRequest",
    "JwksCache",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RetryPolicy",
    "RevocationFollower",
    "RunEnvironment",
    "RunNotActive",
    "StepToken",
    "TlsOptions",
    "TokenRejected",
    "TokenStatus",
    "TokenVerifier",
    "Unauthenticated",
    "Unavailable",
    "assertion_credentials",
    "bearer_credentials",
    "dev_admin_credentials",
    "dpop_credentials",
    "local_channel",
    "step_token",
    "tls_channel",
]

_HOME = {
    "AsyncAuditStream": "tokenbroker.aio",
    "AsyncBrokerClient": "tokenbroker.aio",
    "AuditStream": "tokenbroker.client",
    "BrokerClient": "tokenbroker.client",
    "BrokerError": "tokenbroker.errors",
    "ConfigurationError": "tokenbroker.errors",
    "Conflict": "tokenbroker.errors",
    "DPoPAuth": "tokenbroker.bound",
    "DPoPKey": "tokenbroker.dpop",
    "DeadlineExceeded": "tokenbroker.errors",
    "FieldViolation": "tokenbroker.errors",
    "Internal": "tokenbroker.errors",
    "InvalidRequest": "tokenbroker.errors",
    "JwksCache": "tokenbroker.verifier",
    "NO_RETRY": "tokenbroker.retry",
    "NotFound": "tokenbroker.errors",
    "OutOfRange": "tokenbroker.errors",
    "PermissionDenied": "tokenbroker.errors",
    "RetryPolicy": "tokenbroker.retry",
    "RevocationFollower": "tokenbroker.verifier",
    "RunEnvironment": "tokenbroker.connect",
    "RunNotActive": "tokenbroker.errors",
    "StepToken": "tokenbroker.bound",
    "TlsOptions": "tokenbroker.connect",
    "TokenRejected": "tokenbroker.verifier",
    "TokenStatus": "tokenbroker.verification",
    "TokenVerifier": "tokenbroker.verifier",
    "Unauthenticated": "tokenbroker.errors",
    "Unavailable": "tokenbroker.errors",
    "assertion_credentials": "tokenbroker.credentials",
    "bearer_credentials": "tokenbroker.credentials",
    "dev_admin_credentials": "tokenbroker.credentials",
    "dpop_credentials": "tokenbroker.bound",
    "local_channel": "tokenbroker.credentials",
    "step_token": "tokenbroker.client",
    "tls_channel": "tokenbroker.credentials",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tokenbroker' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
