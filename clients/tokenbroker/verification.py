"""Checking a broker-signed JWT: one implementation for the broker's online VerifyToken and
the offline `TokenVerifier`, so both answer with the same precise reasons.

RFC 8725 in practice: the algorithm comes from *our* key, never from the token; only
asymmetric algorithms are accepted; the `typ` header must say what kind of token this is;
issuer and audience are always checked when known.
"""

from __future__ import annotations

import base64
import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

ALLOWED_ALGORITHMS = frozenset({"ES256", "RS256"})
DEFAULT_LEEWAY = 30.0
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "run_id")


class TokenStatus(enum.Enum):
    """Why a token is (in)valid. Mirrors tokenbroker.v1.TokenStatus."""

    ACTIVE = "active"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad signature"
    UNKNOWN_KEY = "unknown key"
    DISALLOWED_ALGORITHM = "disallowed algorithm"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    WRONG_ISSUER = "wrong issuer"
    WRONG_AUDIENCE = "wrong audience"
    RUN_ENDED = "run ended"
    RUN_EXPIRED = "run expired"
    UNKNOWN_RUN = "unknown run"
    WRONG_TYPE = "wrong token type"


@dataclass(frozen=True)
class CheckResult:
    """The verdict on a token: its status, a reason for people, and the claims read."""

    status: TokenStatus
    reason: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    header: Mapping[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """True only when the token is valid."""
        return self.status is TokenStatus.ACTIVE


@dataclass(frozen=True)
class PublicKey:
    """A verification key: its algorithm is fixed here, not read from tokens."""

    kid: str
    alg: str
    key: Any  # a cryptography public key object


def _fail(
    status: TokenStatus, reason: str = "", claims: Mapping[str, Any] | None = None
) -> CheckResult:
    return CheckResult(status, reason or status.value, claims or {})


def check_token(
    token: str,
    *,
    find_key: Callable[[str], PublicKey | None],
    issuer: str,
    audience: str | None,
    expected_typ: str,
    leeway: float = DEFAULT_LEEWAY,
) -> CheckResult:
    """Verify signature, type, time, issuer and audience. Run state is the caller's job."""
    header = _header(token)
    if header is None:
        return _fail(TokenStatus.MALFORMED, "not a JWS compact serialization")
    alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
    if alg not in ALLOWED_ALGORITHMS:
        return _fail(TokenStatus.DISALLOWED_ALGORITHM, f"algorithm {alg!r} is not accepted")
    if typ != expected_typ:
        return _fail(TokenStatus.WRONG_TYPE, f"typ {typ!r} is not {expected_typ!r}")
    if not isinstance(kid, str) or not kid:
        return _fail(TokenStatus.UNKNOWN_KEY, "no key id (kid) in the header")
    key = find_key(kid)
    if key is None:
        return _fail(TokenStatus.UNKNOWN_KEY, f"no published key with id {kid!r}")
    if key.alg != alg:
        return _fail(
            TokenStatus.DISALLOWED_ALGORITHM, f"key {kid!r} signs with {key.alg}, not {alg}"
        )
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.alg],
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            options={"require": list(REQUIRED_CLAIMS), "verify_aud": audience is not None},
        )
    except jwt.InvalidSignatureError:
        return _fail(TokenStatus.BAD_SIGNATURE)
    except jwt.ExpiredSignatureError:
        return _fail(TokenStatus.EXPIRED, claims=_unverified(token))
    except jwt.ImmatureSignatureError:
        return _fail(TokenStatus.NOT_YET_VALID, claims=_unverified(token))
    except jwt.InvalidIssuerError:
        return _fail(TokenStatus.WRONG_ISSUER)
    except jwt.InvalidAudienceError:
        return _fail(TokenStatus.WRONG_AUDIENCE, f"not issued for audience {audience!r}")
    except jwt.InvalidTokenError as exc:
        return _fail(TokenStatus.MALFORMED, str(exc))
    if not isinstance(claims.get("run_id"), str):
        return _fail(TokenStatus.MALFORMED, "run_id claim is not a string")
    return CheckResult(TokenStatus.ACTIVE, "active", claims, header)


def _header(token: str) -> dict[str, Any] | None:
    """The JOSE header, read only to pick the key; PyJWT re-reads and verifies it (the
    signature covers these very bytes). Cheaper than get_unverified_header on the hot path."""
    segment, dot, _ = token.partition(".")
    if not dot or not _BASE64URL.fullmatch(segment):
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _unverified(token: str) -> dict[str, Any]:
    """Claims of a correctly signed but time-invalid token, for reporting only (run id, exp)."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return {k: claims[k] for k in ("run_id", "exp") if k in claims}
