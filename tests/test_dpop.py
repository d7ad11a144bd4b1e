"""`tokenbroker.dpop`: making DPoP proofs (RFC 9449) and checking them fully, each failure
with its own status; the thumbprint of RFC 7638; the request helpers of `tokenbroker.bound`."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbroker.bound import DPoPAuth, StepToken
from tokenbroker.dpop import (
    DPoPKey,
    MemoryReplayCache,
    Presentation,
    check_binding,
    check_proof,
    jwk_thumbprint,
    token_hash,
)
from tokenbroker.verification import CheckResult, TokenStatus

NOW = 1_800_000_000.0
URL = "https://api.example.com/deploy"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


def _check(proof: str, **overrides: Any) -> TokenStatus:
    options: dict[str, Any] = {
        "htm": "POST",
        "htu": URL,
        "now": NOW,
        "replay": MemoryReplayCache(),
        "token": TOKEN,
    }
    options.update(overrides)
    return check_proof(proof, **options).status


def _signed(header: dict[str, Any], claims: dict[str, Any], key: Any, alg: str) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=header)


def _claims(**more: Any) -> dict[str, Any]:
    return {
        "jti": "j-1",
        "htm": "POST",
        "htu": URL,
        "iat": int(NOW),
        "ath": token_hash(TOKEN),
        **more,
    }


def test_the_rfc_7638_example_thumbprint_is_reproduced() -> None:
    # RFC 7638 §3.1: this RSA key's thumbprint is NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJ"
        "ECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW"
        "2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQ"
        "Fh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    jwk = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_a_proof_carries_what_rfc_9449_asks_and_only_the_public_key() -> None:
    key = DPoPKey.generate()
    proof = key.proof("POST", URL + "?q=1#frag", token=TOKEN, nonce="n-1", now=NOW)
    header = jwt.get_unverified_header(proof)
    claims = jwt.decode(proof, options={"verify_signature": False})
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert header["jwk"] == key.public_jwk and "d" not in header["jwk"]
    assert claims["htm"] == "POST" and claims["htu"] == URL  # query and fragment dropped
    assert claims["iat"] == int(NOW) and claims["nonce"] == "n-1"
    digest = base64.urlsafe_b64encode(__import__("hashlib").sha256(TOKEN.encode()).digest())
    assert claims["ath"] == digest.rstrip(b"=").decode()
    assert len(claims["jti"]) >= 16
    assert repr(key) == f"DPoPKey(jkt={key.thumbprint})"  # never the private key


def test_a_valid_proof_passes_and_names_its_key() -> None:
    key = DPoPKey.generate()
    verdict = check_proof(
        key.proof("POST", URL, token=TOKEN, now=NOW),
        htm="POST",
        htu=URL + "?other=query",
        now=NOW + 30,
        replay=MemoryReplayCache(),
        token=TOKEN,
        expected_jkt=key.thumbprint,
    )
    assert verdict.ok and verdict.jkt == key.thumbprint


def _other_algorithms() -> dict[str, Callable[[], str]]:
    public = DPoPKey.generate().public_jwk
    header = {"typ": "dpop+jwt", "jwk": public}
    symmetric = {"typ": "dpop+jwt", "jwk": {"kty": "oct", "k": "c2VjcmV0"}}
    es512 = ec.generate_private_key(ec.SECP521R1())
    return {
        "none": lambda: jwt.encode(_claims(), "", algorithm="none", headers=header),
        "HS256": lambda: _signed(symmetric, _claims(), "secret-secret-secret-secret-1234", "HS256"),
        "ES512": lambda: _signed(header, _claims(), es512, "ES512"),
    }


@pytest.mark.parametrize("alg", ["none", "HS256", "ES512"])
def test_a_proof_with_an_algorithm_outside_the_allow_list_is_refused(alg: str) -> None:
    assert _check(_other_algorithms()[alg]()) is TokenStatus.PROOF_DISALLOWED_ALGORITHM


def test_every_malformation_of_a_proof_has_its_own_status() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = DPoPKey(key).public_jwk
    good = {"typ": "dpop+jwt", "jwk": public}
    claims = _claims()
    without_ath = {k: v for k, v in claims.items() if k != "ath"}

    def es256(header: dict[str, Any], payload: dict[str, Any] = claims) -> str:
        return _signed(header, payload, key, "ES256")

    s = TokenStatus
    cases: list[tuple[str, TokenStatus]] = [
        ("not.a.jwt", s.PROOF_MALFORMED),
        ("a.b", s.PROOF_MALFORMED),
        ("x" * 9000, s.PROOF_MALFORMED),
        (es256({**good, "crit": ["x"]}), s.PROOF_MALFORMED),
        (es256({"typ": "JWT", "jwk": public}), s.PROOF_WRONG_TYPE),
        (es256({"typ": "at+jwt", "jwk": public}), s.PROOF_WRONG_TYPE),
        (es256({"typ": "dpop+jwt"}), s.PROOF_BAD_KEY),
        (es256({**good, "jwk": {**public, "d": "AAAA"}}), s.PROOF_BAD_KEY),
        (es256({**good, "jwk": {**public, "x": public["y"]}}), s.PROOF_BAD_KEY),
        (es256({**good, "jwk": "a string"}), s.PROOF_BAD_KEY),
        (es256({**good, "jwk": DPoPKey.generate().public_jwk}), s.PROOF_BAD_SIGNATURE),
        (es256(good, {**claims, "jti": None}), s.PROOF_MALFORMED),
        (es256(good, {**claims, "htu": 7}), s.PROOF_MALFORMED),
        (es256(good, {**claims, "iat": "now"}), s.PROOF_MALFORMED),
        (es256(good, {**claims, "iat": float("nan")}), s.PROOF_MALFORMED),
        (es256(good, {**claims, "iat": NOW + 61}), s.PROOF_STALE),
        (es256(good, {**claims, "iat": NOW - 61}), s.PROOF_STALE),
        (es256(good, without_ath), s.PROOF_WRONG_TOKEN_HASH),
    ]
    for proof, status in cases:
        assert _check(proof) is status, (proof[:60], status)


def test_ed25519_and_rsa_proofs_are_accepted_too() -> None:
    for private, kty_members, alg in (
        (ed25519.Ed25519PrivateKey.generate(), {"kty": "OKP", "crv": "Ed25519"}, "EdDSA"),
        (rsa.generate_private_key(65537, 2048), {"kty": "RSA"}, "RS256"),
    ):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key()))
        assert kty_members.items() <= jwk.items()
        proof = _signed({"typ": "dpop+jwt", "jwk": jwk}, _claims(), private, alg)
        assert _check(proof) is TokenStatus.ACTIVE


def test_a_short_rsa_key_is_refused() -> None:
    private = rsa.generate_private_key(65537, 1024)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))

    def segment(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    # Signed by hand: PyJWT itself refuses to sign with a key this short.
    signing_input = (
        f"{segment({'typ': 'dpop+jwt', 'alg': 'RS256', 'jwk': jwk})}.{segment(_claims())}"
    )
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    proof = signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    assert _check(proof) is TokenStatus.PROOF_BAD_KEY


def test_the_replay_cache_accepts_a_proof_once_and_forgets_it_when_it_expires() -> None:
    cache = MemoryReplayCache(max_entries=2)
    assert cache.first_use("k", "a", expires=100.0, now=50.0)
    assert not cache.first_use("k", "a", expires=100.0, now=60.0)
    assert cache.first_use("k", "b", expires=100.0, now=60.0)
    # Full of live entries: refuse rather than forget one that could then be replayed.
    assert not cache.first_use("k", "c", expires=100.0, now=60.0)
    assert cache.first_use("k", "c", expires=300.0, now=200.0)  # the others expired
    assert len(cache) == 1


def test_a_nonce_may_be_one_value_or_any_the_server_accepts() -> None:
    key = DPoPKey.generate()
    with_nonce = key.proof("POST", URL, token=TOKEN, nonce="n-7", now=NOW)
    assert _check(with_nonce, nonce="n-7") is TokenStatus.ACTIVE
    assert _check(with_nonce, nonce="n-8") is TokenStatus.PROOF_NONCE_REQUIRED
    assert _check(with_nonce, nonce=lambda n: n.startswith("n-")) is TokenStatus.ACTIVE
    assert _check(key.proof("POST", URL, token=TOKEN, now=NOW), nonce="n-7") is (
        TokenStatus.PROOF_NONCE_REQUIRED
    )


def test_a_token_bound_to_a_certificate_needs_that_certificate() -> None:
    active = CheckResult(TokenStatus.ACTIVE, "active", {"run_id": "r", "cnf": {"x5t#S256": "abc"}})
    replay = MemoryReplayCache()

    def status(thumbprint: str) -> TokenStatus:
        presented = Presentation(certificate_thumbprint=thumbprint)
        return check_binding(active, TOKEN, presented, now=NOW, replay=replay).status

    assert status("abc") is TokenStatus.ACTIVE
    assert status("abd") is TokenStatus.CERTIFICATE_MISMATCH
    assert status("") is TokenStatus.CERTIFICATE_MISMATCH


def test_an_unusable_cnf_claim_makes_the_token_malformed() -> None:
    for cnf in ("jkt", {}, {"jkt": 5}, {"x5t": "sha1"}):
        result = CheckResult(TokenStatus.ACTIVE, "active", {"cnf": cnf})
        checked = check_binding(result, TOKEN, Presentation(), now=NOW, replay=MemoryReplayCache())
        assert checked.status is TokenStatus.MALFORMED


class _Headers(dict[str, str]):
    pass


class _RequestsLike:
    """The parts of requests.PreparedRequest an auth callable uses."""

    def __init__(self, method: str, url: str) -> None:
        self.method, self.url, self.headers = method, url, _Headers()
        self.hooks: list[Callable[..., Any]] = []

    def register_hook(self, event: str, hook: Callable[..., Any]) -> None:
        assert event == "response"
        self.hooks.append(hook)


class _Response:
    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code, self.headers = status_code, headers


def test_the_auth_helper_attaches_a_fresh_proof_to_each_requests_request() -> None:
    key = DPoPKey.generate()
    auth = StepToken(TOKEN, key).auth()
    first, second = _RequestsLike("get", URL), _RequestsLike("POST", URL)
    assert auth(first) is first and auth(second) is second
    assert first.headers["Authorization"] == f"DPoP {TOKEN}"
    assert first.headers["DPoP"] != second.headers["DPoP"]
    replay = MemoryReplayCache()
    for request, method in ((first, "GET"), (second, "POST")):
        verdict = check_proof(
            request.headers["DPoP"], htm=method, htu=URL, now=__import__("time").time(),
            replay=replay, token=TOKEN, expected_jkt=key.thumbprint,
        )  # fmt: skip
        assert verdict.ok, verdict.reason
    # A server that answers with a nonce gets it in the next proof.
    first.hooks[0](_Response(401, {"DPoP-Nonce": "n-9"}))
    third = auth(_RequestsLike("GET", URL))
    assert jwt.decode(third.headers["DPoP"], options={"verify_signature": False})["nonce"] == "n-9"


def test_the_auth_helper_retries_an_httpx_request_once_with_the_servers_nonce() -> None:
    key = DPoPKey.generate()
    auth = DPoPAuth(TOKEN, key)
    request = _RequestsLike("GET", URL)
    flow = auth.auth_flow(request)
    sent = next(flow)
    assert "nonce" not in jwt.decode(sent.headers["DPoP"], options={"verify_signature": False})
    retried = flow.send(_Response(401, {"DPoP-Nonce": "n-1"}))
    assert (
        jwt.decode(retried.headers["DPoP"], options={"verify_signature": False})["nonce"] == "n-1"
    )
    with pytest.raises(StopIteration):
        flow.send(_Response(200, {}))
    # A success ends the flow at once.
    done = auth.auth_flow(_RequestsLike("GET", URL))
    next(done)
    with pytest.raises(StopIteration):
        done.send(_Response(200, {}))


def test_a_step_token_is_its_string_and_never_shows_it() -> None:
    token = StepToken(TOKEN, DPoPKey.generate())
    assert token == TOKEN and f"Bearer {token}" == f"Bearer {TOKEN}"
    assert TOKEN not in repr(token)
    headers = token.headers("GET", URL)
    assert headers["Authorization"] == f"DPoP {TOKEN}" and headers["DPoP"].count(".") == 2


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = ("typ", "alg", "jwk", "crit", "jti", "htm", "htu", "iat", "ath", "nonce")
_SIGNER = ec.generate_private_key(ec.SECP256R1())


@settings(max_examples=150, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=3))
def test_any_json_in_a_validly_signed_proof_gets_a_verdict_never_an_exception(
    changes: dict[str, Any],
) -> None:
    header: dict[str, Any] = {"typ": "dpop+jwt", "jwk": DPoPKey(_SIGNER).public_jwk}
    claims = _claims()
    for name, value in changes.items():
        (header if name in ("typ", "jwk", "crit") else claims)[name] = value
    segments = [
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
        for part in ({**header, "alg": changes.get("alg", "ES256")}, claims)
    ]
    signing_input = ".".join(segments).encode()
    der = _SIGNER.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    signature = base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    proof = signing_input.decode() + "." + signature.rstrip(b"=").decode()
    verdict = check_proof(proof, htm="POST", htu=URL, now=NOW, replay=MemoryReplayCache())
    assert isinstance(verdict.status, TokenStatus) and verdict.reason
    if not changes:
        assert verdict.ok  # the control: the untouched proof is valid
