"""Sender-constrained tokens: DPoP proofs (RFC 9449) and certificate binding (RFC 8705).

A bound token carries `cnf: {"jkt": <RFC 7638 thumbprint>}` (or `{"x5t#S256": ...}` for a
client certificate). Presented alone — leaked into a build log, say — it is worthless: each
request must also carry a fresh *proof*, a JWT signed by the key the token is bound to,
naming the request's method and URL, its time, a unique id and the hash of the token.

    key = DPoPKey.generate()                           # private half in memory only
    proof = key.proof("GET", "https://api.example.com/deploy", token=token)
    # send: Authorization: DPoP <token>, DPoP: <proof>

    verdict = check_proof(proof, htm="GET", htu="https://api.example.com/deploy",
                          token=token, expected_jkt=claims["cnf"]["jkt"],
                          replay=MemoryReplayCache(), now=time.time())

**gRPC.** A gRPC call is an HTTP/2 POST to `/<package>.<Service>/<Method>`, so the proof of a
gRPC call has `htm = "POST"` and `htu` = that method path (`grpc_htu`), e.g.
`/tokenbroker.v1.TokenBrokerService/IssueToken`. The authority is left out on purpose: one
broker is reached as a load-balanced name, a replica address or through a proxy, each a
different authority, and the `ath` already ties the proof to one credential that only one
broker accepts (its `aud`).

This module needs only PyJWT and cryptography (no gRPC, no server), so an API verifying
tokens offline can check proofs too, and nothing in it reads the wall clock unless asked.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tokenbroker.verification import CheckResult, TokenStatus, read_claims

DPOP_TYP = "dpop+jwt"
# RFC 9449 §4.3: asymmetric algorithms only; never "none", never a MAC (HS*).
PROOF_ALGORITHMS = frozenset({"ES256", "EdDSA", "RS256"})
DEFAULT_WINDOW = 60.0  # seconds a proof's iat may lie before or after the verifier's clock
MAX_PROOF_LENGTH = 8 * 1024
MAX_JTI_LENGTH = 256
MIN_RSA_BITS = 2048
GRPC_HTM = "POST"
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
# RFC 7638 §3.2: the required members of each key type, the only ones hashed.
THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
CNF_JKT = "jkt"
CNF_X5T = "x5t#S256"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK, base64url: the `cnf.jkt` of a bound token.
    ValueError for a JWK without its key type's required members."""
    members = THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        raise ValueError("not a public EC, RSA or OKP JWK with all its required members")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def token_hash(token: str) -> str:
    """The `ath` claim: base64url(SHA-256(ASCII of the token)) (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii", errors="replace")).digest())


def certificate_thumbprint(der: bytes) -> str:
    """RFC 8705 `x5t#S256`: base64url(SHA-256(DER of the client certificate))."""
    return b64url(hashlib.sha256(der).digest())


def grpc_htu(method: str) -> str:
    """The `htu` of a gRPC call: its method path, `/package.Service/Method`."""
    return method if method.startswith("/") else "/" + method


@functools.lru_cache(maxsize=1024)  # an API sees a few URLs again and again
def normalized_htu(url: str) -> str:
    """A URL as RFC 9449 §4.3 compares it: without query and fragment, scheme and host in
    lower case (a gRPC method path stays as it is)."""
    if url.startswith("/"):
        return url.split("?", 1)[0].split("#", 1)[0]
    try:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", "", ""))
    except ValueError:
        return url


class DPoPKey:
    """A proof-of-possession key made in memory (EC P-256, ES256); it never leaves the process.

    `public_jwk` goes to the broker (IssueToken's `dpop_jwk`), `thumbprint` is what bound tokens
    carry as `cnf.jkt`, and `proof()` signs one proof per request."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("DPoP keys are EC P-256 (ES256)")
        self._key = private_key
        numbers = private_key.public_key().public_numbers()
        self.public_jwk: dict[str, str] = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }
        self.thumbprint = jwk_thumbprint(self.public_jwk)

    @classmethod
    def generate(cls) -> DPoPKey:
        """A fresh key; its private half exists only in this object."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_jwk_json(self) -> str:
        """The public JWK as JSON, for IssueToken/StartRun's `dpop_jwk` field."""
        return json.dumps(self.public_jwk, separators=(",", ":"))

    def proof(
        self,
        htm: str,
        htu: str,
        *,
        token: str | None = None,
        nonce: str | None = None,
        now: float | None = None,
    ) -> str:
        """A proof for one request: `htm` its method, `htu` its URL (query and fragment are
        dropped, as verifiers ignore them), `token` the bound token it accompanies (→ `ath`),
        `nonce` the server's DPoP-Nonce when it asked for one."""
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": htm,
            "htu": normalized_htu(htu),
            "iat": int(time.time() if now is None else now),
        }
        if token is not None:
            claims["ath"] = token_hash(token)
        if nonce is not None:
            claims["nonce"] = nonce
        headers = {"typ": DPOP_TYP, "jwk": self.public_jwk}
        return jwt.encode(claims, self._key, algorithm="ES256", headers=headers)

    def __repr__(self) -> str:  # never the private key
        return f"DPoPKey(jkt={self.thumbprint})"


class ReplayCache(Protocol):
    """Remembers proofs seen, so that each is accepted once (RFC 9449 §11.1)."""

    def first_use(self, jkt: str, jti: str, expires: float, now: float) -> bool:
        """Record (jkt, jti) until `expires`; False when it was already recorded and unexpired."""
        ...


class MemoryReplayCache:
    """A replay cache for one process: enough for one API instance. Bounded: when full, the
    expired entries go, then — since a forgotten entry could be replayed — further proofs are
    refused until some expire rather than forgetting live ones."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max = max_entries
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def first_use(self, jkt: str, jti: str, expires: float, now: float) -> bool:
        key = (jkt, jti)
        with self._lock:
            known = self._seen.get(key)
            if known is not None and known >= now:
                return False
            if len(self._seen) >= self._max:
                self._seen = {k: v for k, v in self._seen.items() if v >= now}
                if len(self._seen) >= self._max:
                    return False
            self._seen[key] = expires
            return True


@dataclass(frozen=True)
class ProofVerdict:
    """The outcome of checking a proof: `status` ACTIVE when it holds, `jkt` the proof key's
    thumbprint once the signature verified."""

    status: TokenStatus
    reason: str
    jkt: str = ""
    jti: str = ""

    @property
    def ok(self) -> bool:
        return self.status is TokenStatus.ACTIVE


def _refused(status: TokenStatus, reason: str = "", jkt: str = "") -> ProofVerdict:
    return ProofVerdict(status, reason or status.value, jkt)


@functools.lru_cache(maxsize=4096)
def _public_key(kty: str, crv: str, x: str, y: str, n: str, e: str) -> tuple[Any, str]:
    """A cryptography key from JWK members, and its RFC 7638 thumbprint (cached: a step
    proves with one key all along). ValueError for anything not an acceptable public key."""
    key = _load_key(kty, crv, x, y, n, e)
    members = {"kty": kty, "crv": crv, "x": x, "y": y, "n": n, "e": e}
    return key, jwk_thumbprint({k: v for k, v in members.items() if v})


def _load_key(kty: str, crv: str, x: str, y: str, n: str, e: str) -> Any:
    if kty == "EC":
        if crv != "P-256":
            raise ValueError("EC keys must use curve P-256")
        xb, yb = _unb64url(x), _unb64url(y)
        if len(xb) != 32 or len(yb) != 32:
            raise ValueError("P-256 coordinates are 32 bytes")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(xb, "big"), int.from_bytes(yb, "big"), ec.SECP256R1()
        )
        return numbers.public_key()  # raises ValueError for a point off the curve
    if kty == "OKP":
        if crv != "Ed25519":
            raise ValueError("OKP keys must be Ed25519")
        return ed25519.Ed25519PublicKey.from_public_bytes(_unb64url(x))
    if kty == "RSA":
        key = rsa.RSAPublicNumbers(
            int.from_bytes(_unb64url(e), "big"), int.from_bytes(_unb64url(n), "big")
        ).public_key()
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
        return key
    raise ValueError("unsupported key type")


ALG_OF_KTY = {"EC": "ES256", "OKP": "EdDSA", "RSA": "RS256"}


def key_of(jwk: Any, alg: str) -> tuple[Any, str] | str:
    """(public key, jkt) of the header's jwk, or why it is not acceptable."""
    if not isinstance(jwk, dict):
        return "the jwk header must be a JSON object holding the public key"
    if any(member in jwk for member in PRIVATE_JWK_MEMBERS):
        return "the jwk header holds private or symmetric key material"
    kty = jwk.get("kty")
    if not isinstance(kty, str) or ALG_OF_KTY.get(kty) != alg:
        return f"a {shown_value(kty)} key cannot sign {alg}"
    members = [jwk.get(m, "") for m in ("crv", "x", "y", "n", "e")]
    if not all(isinstance(m, str) and len(m) <= 1024 for m in members):
        return "the jwk members must be short strings"
    try:
        key, jkt = _public_key(kty, *members)
    except (ValueError, TypeError, OverflowError) as exc:
        return f"the jwk is not a usable public key ({str(exc)[:80]})"
    return key, jkt


def shown_value(value: Any) -> str:
    text = repr(value)[:40]
    return "".join(c if c.isprintable() else "?" for c in text)


def _signature_holds(key: Any, alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        if alg == "ES256":
            if len(signature) != 64:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        elif alg == "RS256":
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, signing_input)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _segments(proof: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes] | str:
    if len(proof) > MAX_PROOF_LENGTH:
        return f"longer than {MAX_PROOF_LENGTH} characters"
    parts = proof.split(".")
    if len(parts) != 3:
        return "not a JWS compact serialization"
    try:
        header = json.loads(_unb64url(parts[0]))
        claims = json.loads(_unb64url(parts[1]))
        signature = _unb64url(parts[2])
    except (ValueError, RecursionError):
        return "unreadable header, claims or signature"
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return "header and claims must be JSON objects"
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), signature


def check_proof(
    proof: str,
    *,
    htm: str,
    htu: str,
    now: float,
    replay: ReplayCache,
    token: str | None = None,
    expected_jkt: str | None = None,
    nonce: str | Callable[[str], bool] | None = None,
    window: float = DEFAULT_WINDOW,
) -> ProofVerdict:
    """Check a DPoP proof fully (RFC 9449 §4.3), each failure with its own status.

    `htm`/`htu`: the request's method and URL (gRPC: `GRPC_HTM`, `grpc_htu(method)`);
    `token`: the access token it accompanies (its `ath` must match); `expected_jkt`: the
    token's `cnf.jkt`; `nonce`: the nonce the server requires (a string, or a predicate for
    servers that accept any nonce they issued recently); `window`: seconds `iat` may differ
    from `now`. The replay cache is consulted last, so an invalid proof never occupies it.
    Never raises for a bad proof."""
    read = _segments(proof)
    if isinstance(read, str):
        return _refused(TokenStatus.PROOF_MALFORMED, f"DPoP proof malformed: {read}")
    header, claims, signing_input, signature = read
    if "crit" in header:
        return _refused(TokenStatus.PROOF_MALFORMED, "DPoP proof has critical extensions (crit)")
    if header.get("typ") != DPOP_TYP:
        return _refused(
            TokenStatus.PROOF_WRONG_TYPE,
            f"DPoP proof typ {shown_value(header.get('typ'))} is not {DPOP_TYP!r}",
        )
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in PROOF_ALGORITHMS:
        return _refused(
            TokenStatus.PROOF_DISALLOWED_ALGORITHM,
            f"DPoP proof algorithm {shown_value(alg)} is not accepted "
            f"(use {', '.join(sorted(PROOF_ALGORITHMS))})",
        )
    found = key_of(header.get("jwk"), alg)
    if isinstance(found, str):
        return _refused(TokenStatus.PROOF_BAD_KEY, f"DPoP proof key refused: {found}")
    key, jkt = found
    if not _signature_holds(key, alg, signing_input, signature):
        return _refused(TokenStatus.PROOF_BAD_SIGNATURE, jkt=jkt)
    jti, iat = claims.get("jti"), claims.get("iat")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH:
        return _refused(TokenStatus.PROOF_MALFORMED, "DPoP proof jti must be a short string", jkt)
    if not isinstance(claims.get("htm"), str) or not isinstance(claims.get("htu"), str):
        return _refused(TokenStatus.PROOF_MALFORMED, "DPoP proof lacks htm or htu", jkt)
    if isinstance(iat, bool) or not isinstance(iat, int | float) or not abs(iat) < 2**53:
        return _refused(TokenStatus.PROOF_MALFORMED, "DPoP proof iat must be a time", jkt)
    if expected_jkt is not None and jkt != expected_jkt:
        return _refused(
            TokenStatus.PROOF_WRONG_KEY,
            "DPoP proof signed by another key than the one the token is bound to",
            jkt,
        )
    if claims["htm"] != htm:
        return _refused(
            TokenStatus.PROOF_WRONG_METHOD,
            f"DPoP proof is for method {shown_value(claims['htm'])}, not {htm!r}",
            jkt,
        )
    if normalized_htu(claims["htu"]) != normalized_htu(htu):
        return _refused(
            TokenStatus.PROOF_WRONG_URL,
            f"DPoP proof is for {shown_value(claims['htu'])}, not {shown_value(htu)}",
            jkt,
        )
    if not now - window <= iat <= now + window:
        return _refused(
            TokenStatus.PROOF_STALE,
            f"DPoP proof iat is {iat - now:+.0f} s from now (accepted: ±{window:g} s)",
            jkt,
        )
    if token is not None and claims.get("ath") != token_hash(token):
        why = "lacks ath" if "ath" not in claims else "ath is the hash of another token"
        return _refused(TokenStatus.PROOF_WRONG_TOKEN_HASH, f"DPoP proof {why}", jkt)
    if nonce is not None:
        given = claims.get("nonce")
        good = isinstance(given, str) and (
            given == nonce if isinstance(nonce, str) else nonce(given)
        )
        if not good:
            why = "lacks the server's nonce" if given is None else "carries a stale or wrong nonce"
            return _refused(
                TokenStatus.PROOF_NONCE_REQUIRED, f"DPoP proof {why} (use_dpop_nonce)", jkt
            )
    # Remembered until it could no longer pass the iat window anyway.
    if not replay.first_use(jkt, jti, float(iat) + window, now):
        return _refused(TokenStatus.PROOF_REPLAYED, "DPoP proof already used (same jti)", jkt)
    return ProofVerdict(TokenStatus.ACTIVE, "proof valid", jkt, jti)


def confirmation(claims: Mapping[str, Any]) -> Mapping[str, Any] | str | None:
    """The token's `cnf` (RFC 7800): None when unbound, a reason when unusable."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    if not isinstance(cnf, dict) or not cnf:
        return "cnf claim must be a non-empty object"
    for member in (CNF_JKT, CNF_X5T):
        if member in cnf and not isinstance(cnf[member], str):
            return f"cnf {member} must be a string"
    if CNF_JKT not in cnf and CNF_X5T not in cnf:
        return "cnf names no confirmation method this verifier knows (jkt, x5t#S256)"
    return cnf


@dataclass(frozen=True)
class Presentation:
    """What came with a token on one request, for checking its binding: the DPoP proof, the
    request's method and URL, the client certificate's thumbprint (mTLS), and the nonce the
    server requires, if any."""

    proof: str = ""
    htm: str = ""
    htu: str = ""
    certificate_thumbprint: str = ""
    nonce: str | Callable[[str], bool] | None = None


def check_binding(
    result: CheckResult,
    token: str,
    presented: Presentation,
    *,
    now: float,
    replay: ReplayCache,
    window: float = DEFAULT_WINDOW,
) -> CheckResult:
    """`result` (an ACTIVE verdict on `token`) held against the token's `cnf`: an unbound
    token passes as it is; a bound one only with a valid proof by its key, or over the
    certificate it is bound to. Each failure keeps the token's claims for the record."""
    if not result.active:
        return result
    cnf = confirmation(result.claims)
    if cnf is None:
        return result
    kept = {k: result.claims[k] for k in ("run_id", "exp", "jti") if k in result.claims}
    if isinstance(cnf, str):
        return CheckResult(TokenStatus.MALFORMED, cnf, kept)
    if CNF_X5T in cnf:
        thumbprint = presented.certificate_thumbprint
        if not thumbprint or not secrets.compare_digest(thumbprint, str(cnf[CNF_X5T])):
            why = "no client certificate" if not thumbprint else "another client certificate"
            return CheckResult(
                TokenStatus.CERTIFICATE_MISMATCH, f"token bound to a certificate; {why}", kept
            )
    if CNF_JKT in cnf:
        if not presented.proof:
            return CheckResult(
                TokenStatus.PROOF_MISSING,
                "token is bound to a key (cnf.jkt): send a DPoP proof with it",
                kept,
            )
        verdict = check_proof(
            presented.proof,
            htm=presented.htm,
            htu=presented.htu,
            now=now,
            replay=replay,
            token=token,
            expected_jkt=str(cnf[CNF_JKT]),
            nonce=presented.nonce,
            window=window,
        )
        if not verdict.ok:
            return CheckResult(verdict.status, verdict.reason, kept)
    return result


def is_bound(token: str) -> bool:
    """Whether a token (read without verifying) carries a `cnf` claim."""
    claims = read_claims(token)
    return claims is not None and "cnf" in claims
