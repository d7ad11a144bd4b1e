"""RFC 8693 token exchange at the discovery document's `token_endpoint`: a run credential in,
a step token out — IssueToken for clients that have `curl` and no gRPC.

    POST /oauth2/token   (application/x-www-form-urlencoded)
    grant_type=urn:ietf:params:oauth:grant-type:token-exchange
    subject_token=<run credential>
    subject_token_type=urn:ietf:params:oauth:token-type:jwt   (or …:access_token)
    audience=<the API>            exactly one
    scope=pipelines:read artifacts:write   permissions as RESOURCE:LEVEL, space-separated
    requested_token_type=…:access_token | …:jwt   optional
    ttl=<seconds>                 optional extension (30–3600, default 600), as IssueToken's
    step=<step name>              optional extension, as IssueToken's

The request becomes an `IssueTokenRequest` and goes the way of a gRPC IssueToken: the run
credential is authenticated and rate-limited by the same code, the message is checked
against the same limits, converted by the same function and handed to the same domain call
(`Issuance.issue`), which decides, audits (`token.issued`, `token.refused`) and counts it.

Decisions the RFCs leave open (docs: README "HTTP endpoints"):
- The run credential is a JWT the broker issued and accepts as a bearer credential, so both
  `…:jwt` (what the issue asks of callers) and `…:access_token` name it.
- The step token is an access token (`typ: at+jwt`, RFC 9068), so `token_type` is `Bearer`
  (`N_A` is for tokens that are not access tokens) and `issued_token_type` is
  `…:access_token`, or `…:jwt` when that was requested (the same token either way).
- No `actor_token`: the run credential already carries its run's actors (`act`); no
  `resource`: name the API in `audience`.
- DPoP (RFC 9449 §5): with a `DPoP` header the step token is bound to the proof's key
  (`cnf.jkt`) and `token_type` is `DPoP`. The proof's `htu` is this endpoint's URL as
  discovery announces it (`token_endpoint`), `htm` POST, and its `ath` hashes the
  subject_token it accompanies — so the proof also proves possession of a bound run
  credential, which without a proof is refused here as over gRPC. A proof that fails any
  check answers `invalid_dpop_proof`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from google.protobuf import duration_pb2

from broker.api import convert, validation
from broker.api.http import oauth
from broker.api.http.oauth import OAuthCall, Refusal
from broker.api.http.routes import Routes
from broker.api.oauth_status import Endpoint, OAuthError, invalid_request
from broker.auth.authn import Presented
from broker.errors import FieldViolation, InvalidArgument
from broker.identity import PrincipalKind
from broker.limits import MAX_PERMISSIONS
from broker.runs.permissions import PermissionSet
from tokenbroker.v1 import broker_pb2, types_pb2

if TYPE_CHECKING:
    from broker.app import Broker

TOKEN_PATH = "/oauth2/token"
DPOP_HEADER = "dpop"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = (JWT_TYPE, ACCESS_TOKEN_TYPE)
ISSUED_TOKEN_TYPES = (ACCESS_TOKEN_TYPE, JWT_TYPE)
_SECONDS = re.compile(r"[0-9]{1,6}")
# IssueTokenRequest fields as the form names them.
PARAMETER_OF = {"permissions": "scope", "audience": "audience", "ttl": "ttl", "step": "step"}


def scope_of(permissions: PermissionSet) -> str:
    """Permissions as an OAuth scope (RFC 6749 §3.3): `RESOURCE:LEVEL` tokens, space-separated,
    e.g. `artifacts:write pipelines:execute`."""
    return " ".join(f"{resource}:{level}" for resource, level in permissions.items())


def permissions_of_scope(scope: str) -> list[types_pb2.Permission]:
    """The inverse of `scope_of`; InvalidArgument naming `scope[i]` for a malformed token."""
    tokens = scope.split(" ") if scope else []
    if len(tokens) > MAX_PERMISSIONS:
        raise InvalidArgument.field("scope", f"at most {MAX_PERMISSIONS} permissions")
    violations = []
    permissions = []
    for i, token in enumerate(tokens):
        resource, sep, level = token.partition(":")
        if not sep or not resource or not level or ":" in level:
            violations.append(
                FieldViolation(f"scope[{i}]", "RESOURCE:LEVEL, e.g. 'pipelines:execute'")
            )
            continue
        permissions.append(types_pb2.Permission(resource=resource, level=level))
    if violations:
        raise InvalidArgument(violations)
    return permissions


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    routes.add("POST", TOKEN_PATH, oauth.serve(broker, Endpoint.TOKEN, _exchange))


def _exchange(call: OAuthCall) -> dict[str, Any]:
    grant_type = call.single("grant_type", required=True)
    if grant_type != GRANT_TYPE:
        raise Refusal(
            OAuthError(400, "unsupported_grant_type", f"only {GRANT_TYPE} is served here")
        )
    subject_token = call.single("subject_token", required=True)
    if call.single("subject_token_type", required=True) not in SUBJECT_TOKEN_TYPES:
        raise Refusal(
            invalid_request(
                "subject_token_type: a run credential is " + " or ".join(SUBJECT_TOKEN_TYPES)
            )
        )
    requested = call.single("requested_token_type") or ACCESS_TOKEN_TYPE
    if requested not in ISSUED_TOKEN_TYPES:
        raise Refusal(invalid_request("requested_token_type: " + " or ".join(ISSUED_TOKEN_TYPES)))
    if "actor_token" in call.form or "actor_token_type" in call.form:
        raise Refusal(
            invalid_request("actor_token: not accepted; the run credential names its actors")
        )
    proof = call.request.header(DPOP_HEADER)
    proofs = (proof,) if proof is not None else ()
    # Authenticated first, as over gRPC: an anonymous caller learns nothing of its request.
    # A proof is checked there too, against this endpoint's URL and the subject_token (ath).
    context = call.authenticate(
        Presented(
            authorization=(f"{'DPoP' if proofs else 'Bearer'} {subject_token}",),
            peer=call.peer,
            dpop=proofs,
            target=call.broker.tokens.issuer + TOKEN_PATH,
        ),
        "IssueToken",
    )
    if context.principal.kind is not PrincipalKind.RUN:
        raise Refusal(
            OAuthError(
                400,
                "unauthorized_client",
                "subject_token: only a run credential is exchanged for a step token; "
                "service accounts call IssueToken",
            )
        )
    request = _issue_token_request(call)
    request.bind_proof_key = bool(proofs)
    try:
        validation.check(request)
        token_request = convert.token_request(request)
    except InvalidArgument as error:
        raise oauth.renamed(error, PARAMETER_OF) from None
    minted = call.broker.issuance.issue(context, token_request)
    return {
        "access_token": minted.token,
        "issued_token_type": requested,
        # RFC 9449 §5: a token bound to the proof's key is of type DPoP.
        "token_type": "DPoP" if proofs else "Bearer",
        "expires_in": max(0, int(minted.expire_time - call.broker.clock())),
        "scope": scope_of(minted.permissions),
    }


def _issue_token_request(call: OAuthCall) -> broker_pb2.IssueTokenRequest:
    """The form as an IssueTokenRequest (checked against the limits later, once the caller is
    known, as over gRPC). Parameters the form alone gets wrong are refused here."""
    if call.form.get("resource"):
        raise Refusal(
            OAuthError(400, "invalid_target", "resource: not accepted; name the API in audience")
        )
    audiences = call.form.get("audience", [])
    if len(audiences) > 1:
        raise Refusal(OAuthError(400, "invalid_target", "audience: one API per step token"))
    audience = call.single("audience", required=True)
    request = broker_pb2.IssueTokenRequest(
        audience=audience,
        permissions=permissions_of_scope(call.single("scope")),
        step=call.single("step"),
    )
    ttl = call.single("ttl")
    if ttl:
        if not _SECONDS.fullmatch(ttl):
            raise InvalidArgument.field("ttl", "whole seconds, e.g. 600")
        request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl)))
    return request
