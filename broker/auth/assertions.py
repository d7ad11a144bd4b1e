"""Service-account assertions (RFC 7523 style): a short JWT the account signs itself.

    header  {"alg": "ES256", "typ": "JWT", "kid": "..."}      alg: ES256, EdDSA or RS256
    claims  {"iss": ACCOUNT, "sub": ACCOUNT, "aud": BROKER ISSUER,
             "iat": ..., "exp": <= iat + 300, "jti": ...}

The broker holds only the account's public key, from the policy. Reasons for a refusal
name what is wrong (expired, wrong audience, bad signature, ...) but never echo the
credential.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.exceptions import (
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
)

from broker import limits
from broker.errors import Unauthenticated
from broker.identity import STEP_TOKEN_TYP
from broker.policy.model import ASSERTION_ALGORITHMS, AccountKey, Policy, ServiceAccount
from tokenbroker.verification import PARSE_ERRORS, header_problem, read_claims, read_header

MAX_LIFETIME = 300.0
CLOCK_SKEW = 30.0
MAX_CREDENTIAL_LENGTH = 4096
ACCEPTED_TYPES = (None, "JWT")
REQUIRED_CLAIMS = ["iss", "sub", "aud", "iat", "exp", "jti"]
MAX_SHOWN = 64


@dataclass(frozen=True)
class VerifiedAssertion:
    account: ServiceAccount
    expires: float
    key: AccountKey


# Seconds since the epoch beyond which a time claim is nonsense (and floats lose precision).
MAX_TIME = 2**53


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, read without verifying anything (to route and to pick a key)."""
    if len(token) > MAX_CREDENTIAL_LENGTH:
        raise Unauthenticated(f"credential longer than {MAX_CREDENTIAL_LENGTH} characters")
    header = read_header(token)
    if header is None or read_claims(token) is None:  # three segments, two JSON objects
        raise Unauthenticated("malformed credential: not a JWT")
    return header


def routing_typ(token: str) -> str | None:
    """The header's `typ`, read from the first segment only: enough to pick a verifier, which
    then reads and checks everything. None when that segment does not parse."""
    header = read_header(token)
    typ = None if header is None else header.get("typ")
    return typ if isinstance(typ, str) else None


def claimed_account(token: str) -> str:
    """The unverified `iss`, for the audit record of a refusal ("" when unreadable)."""
    claims = read_claims(token) or {}
    iss = claims.get("iss")
    return shown(iss) if isinstance(iss, str) else ""


def _shown(value: Any) -> str:
    """A header value of any type, quoted safely for a message."""
    return repr(shown(value)) if isinstance(value, str) else shown(repr(value))


def shown(text: str) -> str:
    """Caller-supplied text made safe for messages and logs: printable and short."""
    return limits.shown(text, MAX_SHOWN)


def verify(token: str, policy: Policy, audience: str, now: float) -> VerifiedAssertion:
    header = unverified_header(token)
    problem = header_problem(header)
    if problem is not None:
        raise Unauthenticated(f"assertion refused: {problem}")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ASSERTION_ALGORITHMS:
        allowed = ", ".join(ASSERTION_ALGORITHMS)
        raise Unauthenticated(f"algorithm {_shown(alg)} is not allowed (use {allowed})")
    if "kid" in header and not isinstance(header["kid"], str):
        raise Unauthenticated("the kid header must be a string")
    typ = header.get("typ")
    if typ == STEP_TOKEN_TYP:
        raise Unauthenticated("a step token cannot authenticate a caller")
    if typ not in ACCEPTED_TYPES:
        raise Unauthenticated(f"credential type {_shown(typ)} is not an assertion")
    account = _account(token, policy)
    key = None
    claims: dict[str, Any] = {}
    for candidate in _candidate_keys(account, header, alg):
        try:
            claims = _decode(token, candidate, alg, audience, account.name)
        except InvalidSignatureError:
            continue
        key = candidate
        break
    if key is None:
        raise Unauthenticated(
            f"bad signature: not signed by a key the policy holds for account {account.name}"
        )
    expires = _check_times(claims, now)
    return VerifiedAssertion(account, expires, key)


def _account(token: str, policy: Policy) -> ServiceAccount:
    claims = read_claims(token)
    if claims is None:
        raise Unauthenticated("malformed credential: unreadable claims")
    iss, sub = claims.get("iss"), claims.get("sub")
    if not isinstance(iss, str) or not iss:
        raise Unauthenticated("assertion lacks the iss claim (the service account name)")
    account = policy.account(iss)
    if account is None:
        raise Unauthenticated(f"unknown service account {shown(iss)!r}")
    if sub != iss:
        raise Unauthenticated("assertion sub must equal iss (the service account name)")
    return account


def _candidate_keys(account: ServiceAccount, header: dict[str, Any], alg: str) -> list[AccountKey]:
    kid = header.get("kid")
    keys = list(account.keys)
    if kid is not None:
        keys = [k for k in keys if k.kid == kid]
        if not keys:
            raise Unauthenticated(
                f"unknown key id {_shown(kid)} for service account {account.name}"
            )
    keys = [k for k in keys if k.alg == alg]
    if not keys:
        raise Unauthenticated(f"service account {account.name} has no {alg} key in the policy")
    return keys


def _decode(token: str, key: AccountKey, alg: str, audience: str, account: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public_key,
            algorithms=[alg],
            audience=audience,
            issuer=account,
            # Times are checked below against the broker's clock, with our own messages.
            options={
                "require": REQUIRED_CLAIMS,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except InvalidSignatureError:
        raise
    except InvalidAudienceError:
        raise Unauthenticated(
            f"assertion is for another audience; this broker's audience is {audience}"
        ) from None
    except MissingRequiredClaimError as exc:
        raise Unauthenticated(f"assertion lacks the {exc.claim} claim") from None
    except InvalidIssuerError:
        raise Unauthenticated("assertion iss does not name the service account") from None
    except InvalidTokenError:
        raise Unauthenticated("malformed assertion") from None
    except PARSE_ERRORS:
        raise Unauthenticated("malformed assertion: unreadable claims") from None
    return claims


def _check_times(claims: dict[str, Any], now: float) -> float:
    iat, exp = _seconds(claims, "iat"), _seconds(claims, "exp")
    nbf = _seconds(claims, "nbf") if "nbf" in claims else iat
    if exp - iat > MAX_LIFETIME:
        raise Unauthenticated("assertion lifetime (exp - iat) exceeds 5 minutes")
    if exp <= iat:
        raise Unauthenticated("assertion exp must be after iat")
    if now > exp + CLOCK_SKEW:
        raise Unauthenticated(f"assertion expired {now - exp:.0f} s ago")
    if max(iat, nbf) > now + CLOCK_SKEW:
        raise Unauthenticated("assertion is not valid yet (issued in the future: check clocks)")
    return exp


def _seconds(claims: dict[str, Any], name: str) -> float:
    """A time claim as a finite number of seconds (NaN would pass every comparison, and an
    assertion that never expires is exactly what the 5-minute rule forbids)."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"assertion {name} must be a number of seconds")
    if isinstance(value, int) and not -MAX_TIME < value < MAX_TIME:
        raise Unauthenticated(f"assertion {name} is out of range")
    seconds = float(value)
    if not math.isfinite(seconds) or abs(seconds) >= MAX_TIME:
        raise Unauthenticated(f"assertion {name} must be a finite number of seconds")
    return seconds
