"""What five relying parties check before they accept a broker token, each as a small
function that does what the party's documentation says — so that tests can play them against
a real broker (tests/test_relying_parties.py). None is the real service; each is the
documented rule set, no more lenient. Every check raises `Refused` saying which rule failed.

First, what all of them do (OpenID Connect Discovery 1.0 §4; RFC 7517): fetch
`{issuer}/.well-known/openid-configuration` over the issuer's own scheme, insist that its
`issuer` is exactly the configured one, then fetch and cache `jwks_uri` (PyJWT's PyJWKClient)
and verify the signature with the key the token's `kid` names, by an algorithm the discovery
document lists, and `exp`/`iat`.

- AWS STS AssumeRoleWithWebIdentity: "Create a role for OpenID Connect federation" and
  "Available keys for AWS OIDC federation" (IAM User Guide: condition keys `<provider>:aud`,
  `<provider>:sub`, where <provider> is the issuer URL without its scheme), "IAM JSON policy
  elements: Condition operators" (StringEquals / StringLike with `*` and `?`), "Pass session
  tags in AWS STS" (the `https://aws.amazon.com/tags` claim: `principal_tags` of one-value
  lists, `transitive_tag_keys`; the role's trust policy must allow `sts:TagSession`; at most
  50 tags, keys ≤ 128 characters, values ≤ 256).
- GCP workload identity federation: "Configure workload identity federation with other
  identity providers" and the WorkloadIdentityPoolProvider reference (allowed audiences,
  default `https://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/
  providers/V`; attribute mapping from `assertion.*`; `google.subject` required and at most
  127 bytes; a CEL attribute condition — here the subset `==`, `startsWith`, `&&`).
- Microsoft Entra federated identity credential: Microsoft Graph "federatedIdentityCredential"
  (issuer and subject must match the token's `iss` and `sub` exactly, case-sensitively; the
  audience, default `api://AzureADTokenExchange`, must be in `aud`).
- HashiCorp Vault JWT auth: "JWT/OIDC auth method (API)" (`bound_issuer`, `bound_audiences`,
  `bound_subject`, `bound_claims` with `bound_claims_type` "string" or "glob", JSON-pointer
  claim paths, list-valued claims matching any element; `user_claim` must be present) and the
  1.17 upgrade note "JWT auth login requires bound audiences on the role" (a token with `aud`
  is refused by a role with no `bound_audiences`).
- Sigstore Fulcio: the OIDC issuer configuration (`IssuerURL`, `ClientID` "sigstore") and the
  "OIDC usage in Fulcio" document (tokens carry `iss`, `sub`, `aud`, `iat` and `exp`; the
  certificate's identity is the subject under that issuer, so a subject must never be reused
  by another workload).
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

AWS_TAGS = "https://aws.amazon.com/tags"
AZURE_AUDIENCE = "api://AzureADTokenExchange"
FULCIO_CLIENT_ID = "sigstore"
GCP_SUBJECT_MAX_BYTES = 127


class Refused(Exception):
    """The relying party would not accept the token; the message says which rule."""


@dataclass
class OidcProvider:
    """A relying party's view of the broker as an OIDC issuer: discovery, then cached keys."""

    issuer: str
    ssl_context: ssl.SSLContext | None = None
    discovery: dict[str, Any] = field(init=False)
    keys: jwt.PyJWKClient = field(init=False)

    def __post_init__(self) -> None:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        with urllib.request.urlopen(url, timeout=10, context=self.ssl_context) as response:
            self.discovery = json.load(response)
        if self.discovery.get("issuer") != self.issuer:  # OIDC Discovery §4.3
            raise Refused(f"discovery names issuer {self.discovery.get('issuer')!r}")
        self.keys = jwt.PyJWKClient(
            self.discovery["jwks_uri"], cache_keys=True, ssl_context=self.ssl_context
        )

    def verify(self, token: str, audience: str | Sequence[str] | None) -> dict[str, Any]:
        algorithms = self.discovery.get("id_token_signing_alg_values_supported", ["RS256"])
        try:
            key = self.keys.get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=list(algorithms),
                audience=audience,
                issuer=self.issuer,
                options={
                    "require": ["iss", "sub", "exp", "iat"],
                    "verify_aud": audience is not None,
                },
            )
        except jwt.PyJWTError as exc:
            raise Refused(f"token rejected: {exc}") from None
        return claims


# --- AWS ---------------------------------------------------------------------------------


def _like(pattern: str, value: str) -> bool:
    """IAM StringLike: `*` any run of characters (also '/'), `?` one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def _equals(value: str, pattern: str) -> bool:
    return value == pattern


def _matches(value: str, pattern: str) -> bool:
    return _like(pattern, value)


_OPERATORS = {"StringEquals": _equals, "StringLike": _matches}


def _condition_holds(operator: str, wanted: Any, actual: Any) -> bool:
    if actual is None:  # without ...IfExists a missing key never matches
        return False
    values = actual if isinstance(actual, list) else [actual]
    patterns = wanted if isinstance(wanted, list) else [wanted]
    test = _OPERATORS[operator]
    return any(test(str(v), str(p)) for v in values for p in patterns)


@dataclass(frozen=True)
class AwsSession:
    role_arn: str
    subject: str
    principal_tags: Mapping[str, str]
    transitive_tag_keys: tuple[str, ...]


def aws_assume_role_with_web_identity(
    provider: OidcProvider,
    token: str,
    *,
    client_ids: Sequence[str],
    role_arn: str,
    trust_policy: Mapping[str, Any],
) -> AwsSession:
    """STS AssumeRoleWithWebIdentity against an IAM OIDC provider for the broker's issuer
    (with `client_ids` as its audiences) and a role with `trust_policy`."""
    claims = provider.verify(token, list(client_ids))
    host = provider.issuer.split("://", 1)[1].rstrip("/")
    context: dict[str, Any] = {f"{host}:aud": claims["aud"], f"{host}:sub": claims["sub"]}
    tags, transitive = _session_tags(claims.get(AWS_TAGS))
    context.update({f"aws:RequestTag/{key}": value for key, value in tags.items()})
    context["aws:TagKeys"] = list(tags)
    for statement in trust_policy["Statement"]:
        if _allows(statement, host, context, tagging=bool(tags)):
            return AwsSession(role_arn, claims["sub"], tags, transitive)
    raise Refused("Not authorized to perform sts:AssumeRoleWithWebIdentity")


def _session_tags(claim: Any) -> tuple[dict[str, str], tuple[str, ...]]:
    if claim is None:
        return {}, ()
    if not isinstance(claim, dict) or not isinstance(claim.get("principal_tags"), dict):
        raise Refused("malformed session tags claim")
    tags: dict[str, str] = {}
    for key, values in claim["principal_tags"].items():
        if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str):
            raise Refused(f"session tag {key!r}: AWS takes exactly one string value")
        if not 1 <= len(key) <= 128 or len(values[0]) > 256:
            raise Refused(f"session tag {key!r}: key or value too long")
        tags[key] = values[0]
    if len(tags) > 50:
        raise Refused("more than 50 session tags")
    transitive = tuple(claim.get("transitive_tag_keys", []))
    if not set(transitive) <= set(tags):
        raise Refused("a transitive tag key that is not a tag")
    return tags, transitive


def _allows(
    statement: Mapping[str, Any], host: str, context: Mapping[str, Any], tagging: bool
) -> bool:
    actions = statement.get("Action", [])
    actions = [actions] if isinstance(actions, str) else actions
    federated = statement.get("Principal", {}).get("Federated", "")
    if statement.get("Effect") != "Allow" or not federated.endswith(f":oidc-provider/{host}"):
        return False
    if "sts:AssumeRoleWithWebIdentity" not in actions:
        return False
    if tagging and "sts:TagSession" not in actions:
        return False  # a token with session tags needs sts:TagSession in the trust policy
    for operator, conditions in statement.get("Condition", {}).items():
        for key, wanted in conditions.items():
            if not _condition_holds(operator, wanted, context.get(key)):
                return False
    return True


# --- GCP ---------------------------------------------------------------------------------


def gcp_exchange(
    provider: OidcProvider,
    token: str,
    *,
    allowed_audiences: Sequence[str],
    attribute_mapping: Mapping[str, str],
    attribute_condition: str = "",
) -> dict[str, str]:
    """Google STS token exchange for a workload identity pool OIDC provider: the mapped
    attributes (`google.subject`, `attribute.*`) when the token is accepted."""
    assertion = provider.verify(token, list(allowed_audiences))
    mapped = {
        target: _cel_value(source, {"assertion": assertion})
        for target, source in attribute_mapping.items()
    }
    subject = mapped.get("google.subject")
    if not isinstance(subject, str) or not subject:
        raise Refused("google.subject is required and must be mapped to a string")
    if len(subject.encode()) > GCP_SUBJECT_MAX_BYTES:
        raise Refused(f"google.subject is {len(subject.encode())} bytes; at most 127")
    scope: dict[str, Any] = {
        "assertion": assertion,
        "google": {k.split(".", 1)[1]: v for k, v in mapped.items() if k.startswith("google.")},
        "attribute": {
            k.split(".", 1)[1]: v for k, v in mapped.items() if k.startswith("attribute.")
        },
    }
    if attribute_condition and not all(
        _cel_term(term.strip(), scope) for term in attribute_condition.split("&&")
    ):
        raise Refused("The given credential is rejected by the attribute condition.")
    return {k: str(v) for k, v in mapped.items()}


def _cel_value(path: str, scope: Mapping[str, Any]) -> Any:
    """`assertion.org_id`, `attribute.env`, `google.subject`: a dotted path into `scope`."""
    value: Any = scope
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


_EQUALS = re.compile(r"^([a-z_.]+)\s*==\s*'([^']*)'$")
_STARTS = re.compile(r"^([a-z_.]+)\.startsWith\('([^']*)'\)$")


def _cel_term(term: str, scope: Mapping[str, Any]) -> bool:
    if match := _EQUALS.match(term):
        return bool(_cel_value(match.group(1), scope) == match.group(2))
    if match := _STARTS.match(term):
        value = _cel_value(match.group(1), scope)
        return isinstance(value, str) and value.startswith(match.group(2))
    raise ValueError(f"CEL outside the tested subset: {term!r}")


# --- Azure -------------------------------------------------------------------------------


def azure_federated_credential(
    provider: OidcProvider, token: str, credential: Mapping[str, Any]
) -> str:
    """Entra token exchange with a federated identity credential {issuer, subject,
    audiences}: the app's token is issued only on exact matches. Returns the subject."""
    claims = provider.verify(token, list(credential["audiences"]))
    if claims["iss"] != credential["issuer"]:
        raise Refused("AADSTS700211: No matching federated identity record found for issuer")
    if claims["sub"] != credential["subject"]:  # exact and case-sensitive
        raise Refused("AADSTS700213: No matching federated identity record found for subject")
    return str(claims["sub"])


# --- Vault -------------------------------------------------------------------------------


def vault_jwt_login(provider: OidcProvider, token: str, role: Mapping[str, Any]) -> dict[str, str]:
    """`vault write auth/jwt/login role=R jwt=T` (Vault ≥ 1.17, `bound_issuer` = issuer):
    the token's metadata from `claim_mappings` when the role lets it in."""
    claims = provider.verify(token, None)
    audiences = role.get("bound_audiences", [])
    if "aud" in claims:
        if not audiences:
            raise Refused("audience claim found in JWT but no audiences bound to the role")
        token_aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if not set(token_aud) & set(audiences):
            raise Refused("aud claim does not match any bound audience")
    if role.get("bound_subject") and claims["sub"] != role["bound_subject"]:
        raise Refused("sub claim does not match bound subject")
    glob = role.get("bound_claims_type", "string") == "glob"
    for path, wanted in role.get("bound_claims", {}).items():
        if not _bound_claim_holds(_claim_at(claims, path), wanted, glob):
            raise Refused(f"claim {path!r} does not match any associated bound claim values")
    user = _claim_at(claims, role.get("user_claim", "sub"))
    if not isinstance(user, str) or not user:
        raise Refused("claim for user_claim not found in token")
    return {
        meta: str(_claim_at(claims, claim))
        for claim, meta in role.get("claim_mappings", {}).items()
    }


def _claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by JSON pointer (`/https:~1~1aws.amazon.com~1tags/...`)."""
    if not path.startswith("/"):
        return claims.get(path)
    value: Any = claims
    for part in path[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _bound_claim_holds(actual: Any, wanted: Any, glob: bool) -> bool:
    if actual is None:
        return False
    values = actual if isinstance(actual, list) else [actual]
    patterns = wanted if isinstance(wanted, list) else [wanted]
    if glob:
        return any(_vault_glob(str(p), str(v)) for v in values for p in patterns)
    return any(str(v) == str(p) for v in values for p in patterns)


def _vault_glob(pattern: str, value: str) -> bool:
    """Vault's glob (ryanuber/go-glob): only '*' is special, matching any run of characters."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value, re.DOTALL) is not None


# --- Fulcio ------------------------------------------------------------------------------


def fulcio_identity(provider: OidcProvider, token: str, seen: dict[str, str], org: str) -> str:
    """Fulcio's check of a CI token for `ClientID` sigstore: the claims it needs present and
    the certificate identity (issuer + subject). `seen` records which workload (here: org)
    each identity was issued for: an identity reused by another org is refused, since a
    verifier trusting the certificate could not tell them apart."""
    claims = provider.verify(token, FULCIO_CLIENT_ID)
    missing = [c for c in ("iss", "sub", "aud", "iat", "exp") if c not in claims]
    if missing:
        raise Refused(f"token lacks {', '.join(missing)}")
    identity = f"{claims['iss']}#{claims['sub']}"
    if seen.setdefault(identity, org) != org:
        raise Refused(f"subject {claims['sub']!r} was already issued to another organisation")
    return identity
