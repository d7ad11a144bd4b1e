"""HTTP discovery for standard verifiers: `/.well-known/openid-configuration` and
`/.well-known/jwks.json`, so PyJWT's PyJWKClient or a cloud's workload-identity federation
verify broker tokens with no broker-specific code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.api.http.exchange import GRANT_TYPE, TOKEN_PATH
from broker.api.http.introspection import INTROSPECTION_PATH
from broker.api.http.oauth import carries_credentials_safely
from broker.api.http.routes import Request, Response, Routes

if TYPE_CHECKING:
    from broker.app import Broker

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Verifiers cache these; a minute keeps a rotation visible quickly without a fetch per token.
_CACHE = (("Cache-Control", "public, max-age=60"),)


def discovery_document(issuer: str, algorithms: list[str], oauth: bool = True) -> dict[str, Any]:
    """`oauth`: whether the token and introspection endpoints are served (not over plaintext
    HTTP on a non-loopback address without --insecure)."""
    document = _verifying(issuer, algorithms)
    if oauth:
        document.update(_oauth(issuer))
    return document


def _verifying(issuer: str, algorithms: list[str]) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_PATH,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        # Every algorithm of a published key: ES256, and RS256 once the policy asks for it.
        "id_token_signing_alg_values_supported": algorithms,
        # As GitHub's and GitLab's issuers, whose tokens AWS, GCP, Azure and Vault accept.
        "scopes_supported": ["openid"],
        "claims_supported": [
            "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "run_id", "org", "project",
            "pipeline", "step", "permissions", "on_behalf_of", "act", "triggered_via",
            "org_id", "project_id", "pipeline_id", "environment",
        ],
    }  # fmt: skip


def _oauth(issuer: str) -> dict[str, Any]:
    return {
        "token_endpoint": issuer + TOKEN_PATH,
        "grant_types_supported": [GRANT_TYPE],
        # Token exchange authenticates by its subject_token (the run credential) alone.
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint": issuer + INTROSPECTION_PATH,
        # A signed assertion: as a client assertion (RFC 7523) or, as over gRPC, a bearer.
        "introspection_endpoint_auth_methods_supported": ["private_key_jwt"],
        "introspection_endpoint_auth_signing_alg_values_supported": ["ES256", "EdDSA", "RS256"],
    }


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    oauth = carries_credentials_safely(broker.settings)

    def jwks(request: Request) -> Response:
        return Response.json(200, broker.keys.jwks(), _CACHE)

    def discovery(request: Request) -> Response:
        algorithms = sorted({key["alg"] for key in broker.keys.jwks()["keys"]})
        document = discovery_document(issuer, algorithms, oauth)
        return Response.json(200, document, _CACHE)

    routes.add("GET", JWKS_PATH, jwks)
    routes.add("GET", DISCOVERY_PATH, discovery)
