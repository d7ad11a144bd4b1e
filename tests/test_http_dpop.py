"""DPoP at the HTTP token exchange (RFC 9449 §5): a proof binds the step token to the step's
key, proves possession of a bound run credential, and any failing check of it answers
`invalid_dpop_proof` — the same checks as over gRPC, at the endpoint's own URL."""

from __future__ import annotations

import jwt

from broker.api.http.exchange import TOKEN_PATH
from broker.api.server import BrokerServer
from tests import test_http_oauth
from tests.accounts import Callers
from tests.test_http_oauth import exchange, exchange_form, run_credential
from tokenbroker.dpop import DPoPKey

# The brokers and callers of the token exchange's own tests.
http_server = test_http_oauth.http_server
http_callers = test_http_oauth.http_callers


def _endpoint(server: BrokerServer) -> str:
    return server.broker.tokens.issuer + TOKEN_PATH


def _claims(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def test_a_proof_binds_the_step_token_to_the_steps_key(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    key = DPoPKey.generate()
    proof = key.proof("POST", _endpoint(http_server), token=credential)
    reply = exchange(http_server, exchange_form(credential), {"DPoP": proof})
    assert reply.status == 200, reply.document
    assert reply.document["token_type"] == "DPoP"
    assert _claims(reply.document["access_token"])["cnf"] == {"jkt": key.thumbprint}


def test_without_a_proof_the_step_token_is_a_bearer_token(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    reply = exchange(http_server, exchange_form(credential))
    assert reply.status == 200
    assert reply.document["token_type"] == "Bearer"
    assert "cnf" not in _claims(reply.document["access_token"])


def test_a_proof_for_another_url_a_replayed_proof_or_another_token_is_invalid_dpop_proof(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    key = DPoPKey.generate()
    elsewhere = key.proof("POST", "https://elsewhere.example" + TOKEN_PATH, token=credential)
    other_token = key.proof("POST", _endpoint(http_server), token=credential + "x")
    for proof in (elsewhere, other_token, "not-a-jwt"):
        reply = exchange(http_server, exchange_form(credential), {"DPoP": proof})
        assert (reply.status, reply.document["error"]) == (400, "invalid_dpop_proof"), proof

    proof = key.proof("POST", _endpoint(http_server), token=credential)
    assert exchange(http_server, exchange_form(credential), {"DPoP": proof}).status == 200
    replayed = exchange(http_server, exchange_form(credential), {"DPoP": proof})
    assert (replayed.status, replayed.document["error"]) == (400, "invalid_dpop_proof")


def test_a_bound_run_credential_is_exchanged_only_with_a_proof_by_its_key(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    runner = DPoPKey.generate()
    _, credential = run_credential(http_callers, dpop_jwk=runner.public_jwk_json)

    leaked = exchange(http_server, exchange_form(credential))
    assert (leaked.status, leaked.document["error"]) == (400, "invalid_dpop_proof")
    assert "DPoP proof" in leaked.document["error_description"]

    thief = DPoPKey.generate().proof("POST", _endpoint(http_server), token=credential)
    stolen = exchange(http_server, exchange_form(credential), {"DPoP": thief})
    assert (stolen.status, stolen.document["error"]) == (400, "invalid_dpop_proof")

    proof = runner.proof("POST", _endpoint(http_server), token=credential)
    reply = exchange(http_server, exchange_form(credential), {"DPoP": proof})
    assert reply.status == 200, reply.document
    assert _claims(reply.document["access_token"])["cnf"] == {"jkt": runner.thumbprint}
