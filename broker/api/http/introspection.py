"""RFC 7662 token introspection at the discovery document's `introspection_endpoint`:
VerifyToken for APIs that prefer asking to verifying.

    POST /oauth2/introspect   (application/x-www-form-urlencoded)
    Authorization: Bearer <service-account assertion or run credential>
    token=<step token>
    token_type_hint=access_token   optional, ignored (the broker introspects step tokens only)
    audience=<the API>             optional extension: also check `aud`, as VerifyToken does

The caller proves who it is as over gRPC — a signed assertion or a run credential in the
`Authorization` header, or the same assertion as an RFC 7523 client assertion in the form
(`client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`,
`client_assertion=<assertion>`) — and needs what VerifyToken needs. The answer is the same
domain call's (`Issuance.verify`): an active token's claims with `active: true`, `scope`
(its permissions as `RESOURCE:LEVEL` tokens) and `token_type: Bearer`; for any token that
is not active — expired, revoked with its run, forged, malformed, for another audience —
only `{"active": false}` (RFC 7662 §2.2: no reason is disclosed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.api import validation
from broker.api.http import oauth
from broker.api.http.exchange import scope_of
from broker.api.http.oauth import OAuthCall, Refusal
from broker.api.http.routes import Routes
from broker.api.oauth_status import Endpoint, invalid_request
from broker.auth.authn import Presented
from broker.errors import InvalidArgument
from broker.runs.permissions import PermissionSet
from tokenbroker.v1 import broker_pb2

if TYPE_CHECKING:
    from broker.app import Broker

INTROSPECTION_PATH = "/oauth2/introspect"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
INACTIVE: dict[str, Any] = {"active": False}


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    routes.add("POST", INTROSPECTION_PATH, oauth.serve(broker, Endpoint.INTROSPECTION, _introspect))


def _introspect(call: OAuthCall) -> dict[str, Any]:
    context = call.authenticate(_presented(call), "VerifyToken")
    token = call.single("token", required=True)
    call.single("token_type_hint")  # once at most; its value may be ignored (RFC 7662 §2.1)
    audience = call.single("audience")
    request = broker_pb2.VerifyTokenRequest(token=token, audience=audience)
    try:
        validation.check(request)
        result = call.broker.issuance.verify(context, token, audience)
    except InvalidArgument as error:
        if {v.field for v in error.violations} == {"token"}:
            return INACTIVE  # not a token the broker could have issued
        raise
    if not result.active:
        return INACTIVE
    claims = dict(result.claims)
    levels = claims.get("permissions")
    scope = scope_of(PermissionSet.of(levels)) if isinstance(levels, dict) else ""
    return {**claims, "scope": scope, "token_type": "Bearer", "active": True}


def _presented(call: OAuthCall) -> Presented:
    """The caller's credential: the Authorization header, or an RFC 7523 client assertion
    in the form — one of them (RFC 6749 §2.3)."""
    header = call.request.header("authorization")
    assertion_type = call.single("client_assertion_type")
    assertion = call.single("client_assertion")
    if assertion_type or assertion:
        if header is not None:
            raise Refusal(
                invalid_request("one client authentication: Authorization or client_assertion")
            )
        if assertion_type != CLIENT_ASSERTION_TYPE or not assertion:
            raise Refusal(
                invalid_request(
                    f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}, "
                    "with the assertion in client_assertion"
                )
            )
        header = f"Bearer {assertion}"
    authorization = (header,) if header is not None else ()
    return Presented(authorization=authorization, peer=call.peer)
