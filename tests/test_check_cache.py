"""Checking a token again from the cache gives exactly the verdict of checking it afresh."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support import eventually
from tokenbroker import verification
from tokenbroker.verification import CheckCache, PublicKey, TokenStatus, check_token

ISSUER = "https://broker.example"
AUDIENCE = "api.example.com"


class Keys:
    """A mutable published key set, like the broker's key ring."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.published: dict[str, PublicKey] = {"k1": self.public("k1", self.private)}

    @staticmethod
    def public(kid: str, private: ec.EllipticCurvePrivateKey) -> PublicKey:
        return PublicKey(kid, "ES256", private.public_key())

    def find(self, kid: str) -> PublicKey | None:
        return self.published.get(kid)


def step_token(keys: Keys, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "run:acme/web/deploy:r-1",
        "aud": AUDIENCE,
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "jti": "t-1",
        "run_id": "r-1",
    }
    claims.update(overrides)
    return jwt.encode(
        claims, keys.private, algorithm="ES256", headers={"kid": "k1", "typ": "at+jwt"}
    )


def checked(cache: CheckCache, keys: Keys, token: str, **options: Any) -> verification.CheckResult:
    arguments: dict[str, Any] = {
        "find_key": keys.find,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "expected_typ": "at+jwt",
        **options,
    }
    return cache.check(token, **arguments)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every signature verification `check_token` performs."""
    calls: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_a_token_checked_again_is_not_verified_again(decodes: list[str]) -> None:
    keys, cache = Keys(), CheckCache()
    token = step_token(keys)

    first, second = checked(cache, keys, token), checked(cache, keys, token)

    assert first.active and second == first
    assert len(decodes) == 1


def test_cached_verdicts_are_per_audience_and_type(decodes: list[str]) -> None:
    keys, cache = Keys(), CheckCache()
    token = step_token(keys)
    assert checked(cache, keys, token).active

    assert checked(cache, keys, token, audience="other.example.com").status is (
        TokenStatus.WRONG_AUDIENCE
    )
    assert checked(cache, keys, token, expected_typ="tokenbroker-run+jwt").status is (
        TokenStatus.WRONG_TYPE
    )


def test_a_cached_token_whose_key_was_unpublished_is_refused_as_fresh() -> None:
    keys, cache = Keys(), CheckCache()
    token = step_token(keys)
    assert checked(cache, keys, token).active

    del keys.published["k1"]

    assert checked(cache, keys, token).status is TokenStatus.UNKNOWN_KEY


def test_a_cached_token_whose_key_id_now_names_another_key_is_refused() -> None:
    keys, cache = Keys(), CheckCache()
    token = step_token(keys)
    assert checked(cache, keys, token).active

    keys.published["k1"] = Keys.public("k1", ec.generate_private_key(ec.SECP256R1()))

    assert checked(cache, keys, token).status is TokenStatus.BAD_SIGNATURE


def test_a_cached_token_that_expired_since_is_refused_as_expired() -> None:
    keys, cache = Keys(), CheckCache()
    token = step_token(keys, exp=int(time.time()) + 1)
    assert checked(cache, keys, token, leeway=0).active

    # PyJWT reads the wall clock: at most the one second until `exp`.
    eventually(lambda: check_expired(token, keys), within=3, interval=0.05, what="`exp` to pass")

    result = checked(cache, keys, token, leeway=0)
    assert result.status is TokenStatus.EXPIRED
    assert result.claims["run_id"] == "r-1"


def check_expired(token: str, keys: Keys) -> bool:
    fresh = check_token(
        token,
        find_key=keys.find,
        issuer=ISSUER,
        audience=AUDIENCE,
        expected_typ="at+jwt",
        leeway=0,
    )
    return fresh.status is TokenStatus.EXPIRED


def test_refused_tokens_are_checked_afresh_every_time(decodes: list[str]) -> None:
    keys, cache = Keys(), CheckCache()
    token = step_token(keys, iss="https://elsewhere.example")

    for _ in range(3):
        assert checked(cache, keys, token).status is TokenStatus.WRONG_ISSUER
    assert len(decodes) == 3 and len(cache) == 0


def test_a_full_cache_drops_entries_and_keeps_verifying_correctly() -> None:
    keys, cache = Keys(), CheckCache(max_entries=4)
    tokens = [step_token(keys, jti=f"t-{i}") for i in range(10)]

    verdicts = [checked(cache, keys, token) for token in tokens + tokens]

    assert all(v.active for v in verdicts)
    assert len(cache) <= 4
