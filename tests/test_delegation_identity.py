"""How the broker establishes the person behind a delegated run (no server needed)."""

from __future__ import annotations

import dataclasses

import pytest

from broker.errors import InvalidArgument
from broker.identity import VerificationMethod
from broker.runs.delegation import (
    AssertedIdentity,
    DelegationRules,
    Refused,
    TrustedIdp,
    asserted_person,
    verify_id_token,
)
from tokenbroker.samples.idp import TestIdentityProvider
from tokenbroker.verifier import JwksCache

AUDIENCE = "token-broker"


@pytest.fixture(scope="module")
def rules(idp: TestIdentityProvider) -> DelegationRules:
    keys = JwksCache(idp.jwks)
    trusted = TrustedIdp(idp.issuer, AUDIENCE, keys.find)
    return DelegationRules(
        idps={idp.issuer: trusted},
        user_domains=frozenset({"example.com"}),
        asserted_domains=frozenset({"contractors.example.com"}),
    )


def test_valid_id_token_yields_a_verified_person_with_only_a_hash_of_the_evidence(
    idp: TestIdentityProvider, rules: DelegationRules
) -> None:
    token = idp.id_token(subject="u-1", email="alice@example.com", audience=AUDIENCE, name="Alice")
    person = verify_id_token(token, rules)
    assert (person.subject, person.issuer, person.email) == (
        "u-1",
        "https://idp.example.com",
        "alice@example.com",
    )
    assert person.method is VerificationMethod.IDP_VERIFIED
    assert person.display_name == "Alice"
    assert len(person.evidence_sha256) == 64 and token not in repr(person)


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (
            lambda idp: TestIdentityProvider("https://evil.example").id_token(
                subject="u", email="alice@example.com", audience=AUDIENCE
            ),
            "may not act for people from issuer 'https://evil.example'",
        ),
        (
            lambda idp: idp.id_token(
                subject="u", email="alice@example.com", audience=AUDIENCE, lifetime=-120
            ),
            "ID token has expired",
        ),
        (
            lambda idp: idp.id_token(subject="u", email="alice@example.com", audience="other-app"),
            "not for this broker's audience",
        ),
        (
            lambda idp: idp.id_token(
                subject="u", email="alice@example.com", audience=AUDIENCE, email_verified=False
            ),
            "has not verified the email address alice@example.com",
        ),
        (
            lambda idp: _resigned_by_impostor(idp),
            "signature does not verify with https://idp.example.com's keys",
        ),
    ],
)
def test_id_tokens_that_prove_nothing_are_refused_with_the_reason(
    idp: TestIdentityProvider, rules: DelegationRules, make_token: object, reason: str
) -> None:
    assert callable(make_token)
    with pytest.raises(Refused) as refused:
        verify_id_token(make_token(idp), rules)
    assert reason in refused.value.message


def _resigned_by_impostor(idp: TestIdentityProvider) -> str:
    impostor = TestIdentityProvider(idp.issuer)
    impostor.kid = idp.kid  # claims the real key id, signs with its own key
    return impostor.id_token(subject="u", email="alice@example.com", audience=AUDIENCE)


def test_garbage_instead_of_an_id_token_is_an_invalid_argument(rules: DelegationRules) -> None:
    with pytest.raises(InvalidArgument) as invalid:
        verify_id_token("definitely-not-a-jwt", rules)
    assert invalid.value.violations[0].field == "id_token"


def test_asserted_identity_is_accepted_only_where_the_policy_allows_it(
    rules: DelegationRules,
) -> None:
    person = asserted_person(
        AssertedIdentity("c-7", "bob@contractors.example.com"), rules, "deploy-portal"
    )
    assert person.method is VerificationMethod.ASSERTED_BY_CALLER
    assert person.issuer == "deploy-portal"
    with pytest.raises(Refused) as refused:
        asserted_person(AssertedIdentity("u-1", "alice@example.com"), rules, "deploy-portal")
    assert "may not assert identities in domain 'example.com'" in refused.value.message


def test_a_star_in_the_policy_allows_every_domain(rules: DelegationRules) -> None:
    anything = dataclasses.replace(rules, asserted_domains=frozenset({"*"}))
    person = asserted_person(AssertedIdentity("u-1", "carol@anywhere.org"), anything, "portal")
    assert person.email == "carol@anywhere.org"
