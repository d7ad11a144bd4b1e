"""The one mapping from domain errors to OAuth 2.0 error responses (RFC 6749 §5.2, RFC 8693
§2.2.2, RFC 7662 §2.3) — the HTTP twin of `broker.api.status`, which maps the same errors to
gRPC status codes.

The error code depends on which endpoint refused and, for a malformed request, on which
parameter was wrong (token endpoint, RFC 8693 / introspection endpoint, RFC 7662):

- InvalidArgument: `invalid_target` when only `audience`/`resource` is wrong, `invalid_scope`
  when only `scope` is, else `invalid_request` (400) / `invalid_request` (400).
- ProofRefused (a DPoP proof that fails a check, RFC 9449 §5): `invalid_dpop_proof` (400) at
  the token endpoint.
- Unauthenticated: `invalid_request` (400) — there the subject_token is the credential, and
  RFC 8693 §2.2.2 says an invalid one MUST be `invalid_request` / `invalid_client` (401, with
  `WWW-Authenticate: Bearer`, RFC 7662 §2.3 and RFC 6750 §3).
- ScopeExceeded (permissions beyond the run's ceiling): `invalid_scope` (400).
- PermissionDenied otherwise: `unauthorized_client` (400) / `invalid_client` (401: RFC 7662
  §2.3 answers insufficient privileges with a 401).
- NotFound, FailedPrecondition (the run behind the credential is gone or no longer active):
  `invalid_grant` (400) / `invalid_request` (400).
- ResourceExhausted: `temporarily_unavailable`, 429 with `Retry-After` (RFC 6585).
- Unavailable (storage refuses writes, shutting down): `temporarily_unavailable`, 503 with
  `Retry-After`.
- Anything else: `server_error` (500) with the request id, never a detail.

`unsupported_grant_type` is decided before any domain call (the token endpoint serves only
token exchange), so it has no entry here.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any

from broker import errors, limits
from broker.auth.authn import ProofRefused

MAX_DESCRIPTION = 300
# RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E — ASCII without '"' or '\'.
_NOT_ALLOWED = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")

# Form parameters that name the target (RFC 8693 §2.1) and the scope (RFC 6749 §3.3).
TARGET_PARAMETERS = frozenset({"audience", "resource"})
SCOPE_PARAMETERS = frozenset({"scope"})


class Endpoint(enum.Enum):
    TOKEN = "token"
    INTROSPECTION = "introspection"


@dataclass(frozen=True)
class OAuthError:
    """An OAuth error response: HTTP status, `error` code, a short description."""

    status: int
    error: str
    description: str
    headers: tuple[tuple[str, str], ...] = ()

    def document(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": describe(self.description)}


def describe(message: str) -> str:
    """`message` as an RFC 6749 error_description: short, printable ASCII, no '"' or '\\'."""
    text = limits.shown(message, MAX_DESCRIPTION).replace('"', "'").replace("\\", "/")
    return _NOT_ALLOWED.sub("?", text)


def invalid_request(description: str) -> OAuthError:
    return OAuthError(400, "invalid_request", description)


def oauth_error_for(error: errors.BrokerError, endpoint: Endpoint, request_id: str) -> OAuthError:
    """The OAuth error response for a domain error raised while serving `endpoint`."""
    token = endpoint is Endpoint.TOKEN
    if isinstance(error, errors.InvalidArgument):
        return OAuthError(400, _invalid_argument_code(error) if token else "invalid_request",
                          error.message)  # fmt: skip
    if isinstance(error, ProofRefused) and token:
        return OAuthError(400, "invalid_dpop_proof", error.message)
    if isinstance(error, errors.Unauthenticated):
        if token:
            return OAuthError(400, "invalid_request", "subject_token: " + error.message)
        return _unauthorized(error.message)
    if isinstance(error, errors.ScopeExceeded) and token:
        return OAuthError(400, "invalid_scope", error.message)
    if isinstance(error, errors.PermissionDenied):
        return OAuthError(400, "unauthorized_client", error.message) if token else (
            _unauthorized(error.message))  # fmt: skip
    if isinstance(error, errors.NotFound | errors.FailedPrecondition):
        return OAuthError(400, "invalid_grant" if token else "invalid_request", error.message)
    if isinstance(error, errors.ResourceExhausted):
        wait = error.retry_after if error.retry_after is not None else 1.0
        return OAuthError(
            429,
            "temporarily_unavailable",
            error.message,
            (("Retry-After", str(max(1, math.ceil(wait)))),),
        )
    if isinstance(error, errors.Unavailable):
        return OAuthError(503, "temporarily_unavailable", error.message, (("Retry-After", "1"),))
    return server_error(request_id)


def server_error(request_id: str) -> OAuthError:
    """What a caller sees for a bug: no detail, a request id to find it in the logs."""
    return OAuthError(
        500, "server_error", f"internal error; the broker logged it with request id {request_id}"
    )


def _unauthorized(message: str) -> OAuthError:
    # RFC 7662 §2.3 → RFC 6750 §3: a bearer credential that does not do answers 401 with a
    # challenge; the body keeps RFC 6749's vocabulary.
    return OAuthError(
        401,
        "invalid_client",
        message,
        (("WWW-Authenticate", 'Bearer error="invalid_token"'),),
    )


def _invalid_argument_code(error: errors.InvalidArgument) -> str:
    """`invalid_target` or `invalid_scope` when only that parameter is wrong; a request
    wrong in any other way is first of all an `invalid_request`."""
    parameters = {_parameter(v.field) for v in error.violations}
    if parameters and parameters <= TARGET_PARAMETERS:
        return "invalid_target"
    if parameters and parameters <= SCOPE_PARAMETERS:
        return "invalid_scope"
    return "invalid_request"


def _parameter(field: str) -> str:
    """'scope[2]' → 'scope', 'audience' → 'audience'."""
    return re.split(r"[\[.]", field, maxsplit=1)[0]
