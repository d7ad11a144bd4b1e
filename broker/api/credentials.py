"""The gRPC edge of authentication: what a call presented, handed to `broker.authn`.

The `authorization` metadata carries bearer credentials. Client-certificate SANs come from
the TLS auth context, which gRPC fills only after verifying the certificate against
--client-ca, so they can be trusted as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from broker.api import interceptor as calls
from broker.auth.authn import Authenticator, Presented
from broker.auth.throttle import Throttle
from broker.identity import Principal
from tokenbroker.v1 import broker_pb2

_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name
# Callable with no credential at all: the public keys that verify broker tokens.
OPEN_METHODS = frozenset({f"/{_SERVICE}/GetSigningKeys"})


def presented(context: grpc.ServicerContext) -> Presented:
    authorization = tuple(
        value
        for key, value in context.invocation_metadata()
        if key == "authorization" and isinstance(value, str)
    )
    # Each property is a list of bytes (the type stubs say bytes).
    auth: Mapping[str, Any] = context.auth_context()
    sans: tuple[str, ...] = ()
    if list(auth.get("transport_security_type", [])) == [b"ssl"]:
        values = [*auth.get("peer_uri", []), *auth.get("peer_dns", [])]
        sans = tuple(bytes(v).decode(errors="replace") for v in values)
    return Presented(authorization, sans, context.peer())


def authenticator(authn: Authenticator, throttle: Throttle | None = None) -> calls.Authenticator:
    """The interceptor's hook: authenticate every call; only OPEN_METHODS allow anonymity.

    With a throttle, an authenticated call counts against its principal's rate and an
    anonymous one against its peer's (a refused one already did, inside the authenticator):
    over it, RESOURCE_EXHAUSTED.
    """

    def authenticate(context: grpc.ServicerContext, method: str) -> Principal:
        shown = presented(context)
        name = method.rsplit("/", 1)[-1]
        principal = authn.authenticate(
            shown, calls.current(), name, required=method not in OPEN_METHODS
        )
        if throttle is not None:
            if principal.is_anonymous:
                throttle.unauthenticated(calls.current(), shown.peer, name)
            else:
                throttle.authenticated(calls.current(), principal, name)
        return principal

    return authenticate
