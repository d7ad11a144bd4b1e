"""token-broker's Python client: short-lived, run-scoped tokens for CI/CD pipeline runs.

    from tokenbroker import BrokerClient

    with BrokerClient.local() as broker:
        started = broker.start_run("acme", "web", "deploy", ceiling={"artifacts": "write"})

- `BrokerClient` (sync) and `AsyncBrokerClient` (asyncio): one method per RPC.
- `step_token(audience, permissions)`: in a pipeline step, the step's token from the run
  credential in the environment (TOKEN_BROKER_TARGET, TOKEN_BROKER_RUN_CREDENTIAL).
- `TokenVerifier` (with `JwksCache`, `RevocationFollower`): offline verification for APIs.
- Errors: `BrokerError` and its subclasses (`tokenbroker.errors`).
- Credentials: `assertion_credentials`, `bearer_credentials`, `dev_admin_credentials`.
- The generated messages and stubs: `tokenbroker.v1`.
"""

from tokenbroker.aio import AsyncAuditStream, AsyncBrokerClient
from tokenbroker.client import AuditStream, BrokerClient, step_token
from tokenbroker.connect import RunEnvironment, TlsOptions
from tokenbroker.credentials import (
    assertion_credentials,
    bearer_credentials,
    dev_admin_credentials,
    local_channel,
    tls_channel,
)
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
    "TlsOptions",
    "TokenRejected",
    "TokenStatus",
    "TokenVerifier",
    "Unauthenticated",
    "Unavailable",
    "assertion_credentials",
    "bearer_credentials",
    "dev_admin_credentials",
    "local_channel",
    "step_token",
    "tls_channel",
]
