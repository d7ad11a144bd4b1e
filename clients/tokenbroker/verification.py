"""Checking a broker-signed JWT: one implementation for the broker's online VerifyToken and
the offline `TokenVerifier`, so both answer with the same precise reasons.

RFC 8725 in practice: the algorithm comes from *our* key, never from the token; only
asymmetric algorithms are accepted; the `typ` header must say what kind of token this is;
issuer and audience are always checked when known.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

ALLOWED_ALGORITHMS = frozenset({"ES256", "RS256"})
DEFAULT_LEEWAY = 30.0
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "run_id")
# Broker tokens are a few hundred bytes; anything this long is refused unread.
MAX_TOKEN_LENGTH = 16 * 1024
# Header parameters that would bring their own key or key location (RFC 8725 §3.10, RFC 7515
# §4.1.2-6): keys come only from the published set, so a token naming one is refused outright.
KEY_BEARING_HEADERS = ("jku", "jwk", "x5u", "x5c")
# What parsing hostile input may raise besides PyJWT's own errors (deep nesting, huge numbers,
# non-UTF-8 bytes, values of unexpected types): each is a malformed token, never a crash.
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    jwt.PyJWTError,
    ValueError,
    TypeError,
    KeyError,
    OverflowError,
    RecursionError,
)
MAX_SHOWN = 48
TIME_CLAIMS = ("exp", "iat", "nbf")
# Beyond this many seconds a time claim is nonsense (and no longer exact as a float).
MAX_TIME = 2**53


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
    # Sender-constrained tokens (RFC 9449 DPoP, RFC 8705 mTLS): see tokenbroker.dpop.
    PROOF_MISSING = "bound token presented without a DPoP proof"
    PROOF_MALFORMED = "DPoP proof malformed"
    PROOF_WRONG_TYPE = "DPoP proof typ is not dpop+jwt"
    PROOF_DISALLOWED_ALGORITHM = "DPoP proof algorithm not accepted"
    PROOF_BAD_KEY = "DPoP proof jwk is not an acceptable public key"
    PROOF_BAD_SIGNATURE = "DPoP proof signature does not verify"
    PROOF_WRONG_KEY = "DPoP proof signed by a key the token is not bound to"
    PROOF_WRONG_METHOD = "DPoP proof is for another method"
    PROOF_WRONG_URL = "DPoP proof is for another URL"
    PROOF_STALE = "DPoP proof iat outside the accepted window"
    PROOF_REPLAYED = "DPoP proof replayed"
    PROOF_WRONG_TOKEN_HASH = "DPoP proof ath does not match the token"
    PROOF_NONCE_REQUIRED = "DPoP proof lacks the server nonce (use_dpop_nonce)"
    CERTIFICATE_MISMATCH = "client certificate does not match the token's x5t#S256"


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


def shown(value: Any) -> str:
    """A value read from a token, made safe to put in a reason: its repr, printable and short."""
    text = repr(value) if not isinstance(value, str) else repr(value[: MAX_SHOWN + 1])
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def _is_time(value: Any) -> bool:
    """A finite number of seconds that any consumer can hold as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return -MAX_TIME < value < MAX_TIME  # False for NaN and the infinities too


def header_problem(header: Mapping[str, Any]) -> str | None:
    """Why a header is refused before any key is looked up, or None: critical extensions (we
    understand none, so RFC 7515 §4.1.11 says reject) and key-bearing parameters."""
    if "crit" in header:
        return "critical header extensions (crit) are not supported"
    for name in KEY_BEARING_HEADERS:
        if name in header:
            return f"header parameter {name!r} is not accepted: keys come from the published set"
    return None


def check_token(
    token: str,
    *,
    find_key: Callable[[str], PublicKey | None],
    issuer: str,
    audience: str | None,
    expected_typ: str,
    leeway: float = DEFAULT_LEEWAY,
    now: float | None = None,
) -> CheckResult:
    """Verify signature, type, time, issuer and audience. Run state is the caller's job.

    `now` (POSIX seconds, default the wall clock) is the time the time claims are judged
    at: the broker passes its own clock, so that a token and its run are judged at one
    instant. Never raises for a bad token: whatever the bytes, the answer is a status and a
    reason."""
    if len(token) > MAX_TOKEN_LENGTH:
        return _fail(TokenStatus.MALFORMED, f"longer than {MAX_TOKEN_LENGTH} characters")
    header = read_header(token)
    if header is None or token.count(".") != 2:
        return _fail(TokenStatus.MALFORMED, "not a JWS compact serialization")
    problem = header_problem(header)
    if problem is not None:
        return _fail(TokenStatus.MALFORMED, problem)
    alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        return _fail(TokenStatus.DISALLOWED_ALGORITHM, f"algorithm {shown(alg)} is not accepted")
    if typ != expected_typ:
        return _fail(TokenStatus.WRONG_TYPE, f"typ {shown(typ)} is not {expected_typ!r}")
    if not isinstance(kid, str) or not kid:
        return _fail(TokenStatus.UNKNOWN_KEY, "no key id (kid) in the header")
    key = find_key(kid)
    if key is None:
        return _fail(TokenStatus.UNKNOWN_KEY, f"no published key with id {shown(kid)}")
    if key.alg != alg:
        return _fail(
            TokenStatus.DISALLOWED_ALGORITHM, f"key {shown(kid)} signs with {key.alg}, not {alg}"
        )
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.alg],
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            # Time is judged below, against `now`: PyJWT reads only the wall clock.
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_aud": audience is not None,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidSignatureError:
        return _fail(TokenStatus.BAD_SIGNATURE)
    except jwt.InvalidIssuerError:
        return _fail(TokenStatus.WRONG_ISSUER)
    except jwt.InvalidAudienceError:
        return _fail(TokenStatus.WRONG_AUDIENCE, f"not issued for audience {shown(audience)}")
    except jwt.InvalidTokenError as exc:
        return _fail(TokenStatus.MALFORMED, str(exc)[:200])
    except PARSE_ERRORS:
        return _fail(TokenStatus.MALFORMED, "unreadable claims")
    for name in TIME_CLAIMS:
        if not _is_time(claims[name]):
            return _fail(TokenStatus.MALFORMED, f"{name} claim is not a time in seconds")
    times = time_claims(claims)
    if times is None:
        return _fail(TokenStatus.MALFORMED, "iat, nbf and exp must be integers")
    status = times.status_at(time.time() if now is None else now, leeway)
    if status is not TokenStatus.ACTIVE:
        # Reported for what it is (run id, exp), not as valid claims.
        return _fail(status, claims={k: claims[k] for k in ("run_id", "exp") if k in claims})
    if not isinstance(claims.get("run_id"), str):
        return _fail(TokenStatus.MALFORMED, "run_id claim is not a string")
    return CheckResult(TokenStatus.ACTIVE, "active", claims, header)


@dataclass(frozen=True)
class TimeClaims:
    """A token's iat, nbf and exp, judged exactly as PyJWT judges them, at a given time."""

    iat: int
    nbf: int
    exp: int

    def status_at(self, now: float, leeway: float) -> TokenStatus:
        # PyJWT's comparisons (jwt.api_jwt._validate_iat/_nbf/_exp), with a clock passed in.
        if self.iat > now + leeway or self.nbf > now + leeway:
            return TokenStatus.NOT_YET_VALID
        if self.exp <= now - leeway:
            return TokenStatus.EXPIRED
        return TokenStatus.ACTIVE


def time_claims(claims: Mapping[str, Any]) -> TimeClaims | None:
    """The time claims as integers the way PyJWT reads them; None when one is not a number."""
    try:
        return TimeClaims(int(claims["iat"]), int(claims["nbf"]), int(claims["exp"]))
    except (ValueError, TypeError, OverflowError):
        return None


def read_header(token: str) -> dict[str, Any] | None:
    """The JOSE header, read only to pick the key or the verifier; PyJWT re-reads and
    verifies it (the signature covers these very bytes). Cheaper than get_unverified_header,
    which decodes every segment, on the hot path. None when the header does not parse."""
    segment, dot, _ = token.partition(".")
    if not dot or len(segment) > MAX_TOKEN_LENGTH or not _BASE64URL.fullmatch(segment):
        return None
    return _json_segment(segment)


def read_claims(token: str) -> dict[str, Any] | None:
    """The claims, read without verifying anything (for the record of a refusal, or to find
    the claimed account's keys). None when they do not parse as a JSON object."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > MAX_TOKEN_LENGTH or not _BASE64URL.fullmatch(parts[1]):
        return None
    return _json_segment(parts[1])


def _json_segment(segment: str) -> dict[str, Any] | None:
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # bad base64, bad UTF-8, bad JSON, deep nesting
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class _Checked:
    """What stays true of a token that passed `check_token` once: its signature by `key`,
    header and claims. Only the time claims need checking again."""

    result: CheckResult
    key: PublicKey
    times: TimeClaims

    def holds(self, find_key: Callable[[str], PublicKey | None], now: float, leeway: float) -> bool:
        key = find_key(self.key.kid)
        if key is None or key.alg != self.key.alg:
            return False
        if key.key is not self.key.key and key.key != self.key.key:
            return False
        return self.times.status_at(now, leeway) is TokenStatus.ACTIVE


class CheckCache:
    """`check_token` for tokens presented again and again, by their SHA-256.

    A pipeline step shows the same token on every call it makes, and an executor its run
    credential. Parsing and verifying the signature again would give the same answer as long
    as the key that verified it is still published unchanged, so a hit checks only that and
    the time claims, exactly as PyJWT does (iat and nbf not in the future, exp not past, with
    the leeway). Anything else, and every token that fails, goes through `check_token` from
    scratch, so every refusal and its reason comes from there. Only ACTIVE verdicts are
    remembered; the run's state is the caller's job on every call, as without the cache.
    Bounded: when full, expired entries go first, then the oldest.
    """

    def __init__(self, max_entries: int = 8192) -> None:
        self._max = max_entries
        self._entries: dict[tuple[Any, ...], _Checked] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def check(
        self,
        token: str,
        *,
        find_key: Callable[[str], PublicKey | None],
        issuer: str,
        audience: str | None,
        expected_typ: str,
        leeway: float = DEFAULT_LEEWAY,
        now: float | None = None,
    ) -> CheckResult:
        """As `check_token`, with the same verdicts."""
        now = time.time() if now is None else now
        digest = hashlib.sha256(token.encode()).digest()
        cache_key = (digest, issuer, audience, expected_typ, leeway)
        known = self._entries.get(cache_key)
        if known is not None and known.holds(find_key, now, leeway):
            return known.result
        result = check_token(
            token,
            find_key=find_key,
            issuer=issuer,
            audience=audience,
            expected_typ=expected_typ,
            leeway=leeway,
            now=now,
        )
        if result.active:
            self._remember(cache_key, result, find_key, now - leeway)
        return result

    def _remember(
        self,
        cache_key: tuple[Any, ...],
        result: CheckResult,
        find_key: Callable[[str], PublicKey | None],
        expired_before: float,
    ) -> None:
        key = find_key(str(result.header["kid"]))
        times = time_claims(result.claims)
        if key is None or times is None:
            return
        with self._lock:
            if len(self._entries) >= self._max:
                self._evict(expired_before)
            self._entries[cache_key] = _Checked(result, key, times)

    def _evict(self, expired_before: float) -> None:
        for cache_key in [k for k, v in self._entries.items() if v.times.exp <= expired_before]:
            del self._entries[cache_key]
        if len(self._entries) >= self._max:
            oldest = list(self._entries)[: max(self._max // 8, 1)]
            for cache_key in oldest:
                del self._entries[cache_key]
