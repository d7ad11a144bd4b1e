"""The gRPC edge of authentication: what a call presented, handed to `broker.authn`.

The `authorization` metadata carries bearer credentials. Client-certificate SANs come from
the TLS auth context, which gRPC fills only after verifying the certificate against
--client-ca, so they can be trusted as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.api import interceptor as calls
from broker.auth.authn import Authenticator, Presented
from broker.auth.throttle import Throttle
from broker.context import CallContext
from broker.identity import Principal
from tokenbroker.dpop import certificate_thumbprint
from tokenbroker.v1 import broker_pb2

_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name
# Callable with no credential at all: the public keys that verify broker tokens.
OPEN_METHODS = frozenset({f"/{_SERVICE}/GetSigningKeys"})
# Where a call's DPoP proof travels (RFC 9449's DPoP header, as gRPC metadata).
DPOP_HEADER = "dpop"


def presented(context: grpc.ServicerContext, method: str = "") -> Presented:
    metadata = context.invocation_metadata()
    authorization = tuple(
        value for key, value in metadata if key == "authorization" and isinstance(value, str)
    )
    proofs = tuple(value for key, value in metadata if key == DPOP_HEADER)
    # Each property is a list of bytes (the type stubs say bytes).
    auth: Mapping[str, Any] = context.auth_context()
    sans: tuple[str, ...] = ()
    x5t = ""
    if list(auth.get("transport_security_type", [])) == [b"ssl"]:
        values = [*auth.get("peer_uri", []), *auth.get("peer_dns", [])]
        sans = tuple(bytes(v).decode(errors="replace") for v in values)
        x5t = _certificate_x5t(auth.get("x509_pem_cert", []))
    return Presented(
        authorization,
        sans,
        context.peer(),
        dpop=tuple(p if isinstance(p, str) else "" for p in proofs),
        target=method,
        certificate_x5t=x5t,
    )


def _certificate_x5t(pem: Any) -> str:
    """RFC 8705 x5t#S256 of the peer's (verified) certificate, "" when there is none."""
    pems = list(pem)
    if not pems:
        return ""
    try:
        certificate = x509.load_pem_x509_certificate(bytes(pems[0]))
    except ValueError:
        return ""
    return certificate_thumbprint(certificate.public_bytes(serialization.Encoding.DER))


def authenticator(authn: Authenticator, throttle: Throttle | None = None) -> calls.Authenticator:
    """The interceptor's hook: authenticate every call; only OPEN_METHODS allow anonymity.

    With a throttle, an authenticated call counts against its principal's rate and an
    anonymous one against its peer's (a refused one already did, inside the authenticator):
    over it, RESOURCE_EXHAUSTED.
    """

    def authenticate(context: grpc.ServicerContext, method: str) -> Principal:
        name = method.rsplit("/", 1)[-1]
        return admitted(
            authn,
            throttle,
            presented(context, method),
            calls.current(),
            name,
            required=method not in OPEN_METHODS,
        )

    return authenticate


def admitted(
    authn: Authenticator,
    throttle: Throttle | None,
    shown: Presented,
    call: CallContext,
    method: str,
    *,
    required: bool,
) -> Principal:
    """Who presented `shown`, within their rate: what every call goes through, over gRPC or
    HTTP, before the domain sees it. Raises Unauthenticated or ResourceExhausted (audited)."""
    principal = authn.authenticate(shown, call, method, required=required)
    if throttle is not None:
        if principal.is_anonymous:
            throttle.unauthenticated(call, shown.peer, method)
        else:
            throttle.authenticated(call, principal, method)
    return principal
