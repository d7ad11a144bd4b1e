"""Sender-constrained tokens (issue 19): a leaked bound step token or run credential is useless
without the key it is bound to — online (VerifyToken), offline (TokenVerifier) and at the
broker itself (a bound run credential) — each refusal with its own status."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from tests.accounts import standard_accounts, write_policy
from tests.conftest import make_settings
from tests.conftest import standard_policy as _standard_policy
from tests.support import ShiftedClock, as_dict, details, perms, rpc_error, start_run_request
from tokenbroker.bound import dpop_credentials
from tokenbroker.credentials import local_channel
from tokenbroker.dpop import DPoPKey
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc
from tokenbroker.verification import TokenStatus, read_claims
from tokenbroker.verifier import JwksCache, TokenVerifier, jwks_from_broker

Stub = broker_pb2_grpc.TokenBrokerServiceStub
AUDIENCE = "deploy.example.com"
URL = "https://deploy.example.com/releases?page=2"
ISSUE_TOKEN = "/tokenbroker.v1.TokenBrokerService/IssueToken"


@dataclass(frozen=True)
class Presented:
    """What a holder of a leaked token shows an API along with it."""

    proof: str
    method: str = "POST"
    url: str = URL


# Each case: how the leaked token is presented, given the token and its owner's key, and
# the precise status it must be refused with. The "replayed" case presents a proof that the
# owner already used once.
def _no_proof(token: str, key: DPoPKey) -> Presented:
    return Presented("")


def _other_key(token: str, key: DPoPKey) -> Presented:
    return Presented(DPoPKey.generate().proof("POST", URL, token=token))


def _other_method(token: str, key: DPoPKey) -> Presented:
    return Presented(key.proof("DELETE", URL, token=token))


def _other_url(token: str, key: DPoPKey) -> Presented:
    return Presented(key.proof("POST", "https://deploy.example.com/admin", token=token))


def _stale_iat(token: str, key: DPoPKey) -> Presented:
    return Presented(key.proof("POST", URL, token=token, now=time.time() - 300))


def _wrong_ath(token: str, key: DPoPKey) -> Presented:
    return Presented(key.proof("POST", URL, token=token + "x"))


LEAKED_CASES: dict[str, tuple[Callable[[str, DPoPKey], Presented], TokenStatus]] = {
    "without proof": (_no_proof, TokenStatus.PROOF_MISSING),
    "with a proof by another key": (_other_key, TokenStatus.PROOF_WRONG_KEY),
    "for another method": (_other_method, TokenStatus.PROOF_WRONG_METHOD),
    "for another url": (_other_url, TokenStatus.PROOF_WRONG_URL),
    "with a stale iat": (_stale_iat, TokenStatus.PROOF_STALE),
    "with a wrong ath": (_wrong_ath, TokenStatus.PROOF_WRONG_TOKEN_HASH),
}


def _bound_step_token(stub: Stub, key: DPoPKey, **fields: Any) -> broker_pb2.IssueTokenResponse:
    run = stub.StartRun(start_run_request()).run
    return stub.IssueToken(
        broker_pb2.IssueTokenRequest(
            run_id=run.run_id,
            audience=AUDIENCE,
            permissions=perms(artifacts="write"),
            dpop_jwk=key.public_jwk_json,
            **fields,
        )
    )


@pytest.fixture
def verifier(server: BrokerServer, channel: grpc.Channel) -> TokenVerifier:
    return TokenVerifier(
        issuer=server.broker.tokens.issuer,
        audience=AUDIENCE,
        keys=JwksCache(jwks_from_broker(channel)),
    )


def test_a_bound_step_token_carries_the_thumbprint_of_the_steps_key(stub: Stub) -> None:
    key = DPoPKey.generate()
    issued = _bound_step_token(stub, key)
    assert issued.cnf_jkt == key.thumbprint
    verdict = stub.VerifyToken(broker_pb2.VerifyTokenRequest(token=issued.token))
    assert verdict.status == broker_pb2.TOKEN_STATUS_PROOF_MISSING
    assert verdict.run_id  # what the token is, for the record: never its claims
    assert not verdict.claims.fields


def test_a_bound_step_token_with_its_proof_is_valid_online_and_offline(
    stub: Stub, verifier: TokenVerifier
) -> None:
    key = DPoPKey.generate()
    token = _bound_step_token(stub, key).token
    online = stub.VerifyToken(
        broker_pb2.VerifyTokenRequest(
            token=token,
            audience=AUDIENCE,
            dpop_proof=key.proof("POST", URL, token=token),
            http_method="POST",
            http_url=URL,
        )
    )
    assert online.active, online.reason
    assert as_dict(online.claims)["cnf"] == {"jkt": key.thumbprint}
    offline = verifier.check(
        token, proof=key.proof("POST", URL, token=token), method="POST", url=URL
    )
    assert offline.active, offline.reason


@pytest.mark.parametrize("case", list(LEAKED_CASES), ids=lambda c: c.replace(" ", "_"))
def test_a_leaked_bound_step_token_is_refused_online_with_its_status(stub: Stub, case: str) -> None:
    present, status = LEAKED_CASES[case]
    key = DPoPKey.generate()
    token = _bound_step_token(stub, key).token
    shown = present(token, key)
    verdict = stub.VerifyToken(
        broker_pb2.VerifyTokenRequest(
            token=token,
            audience=AUDIENCE,
            dpop_proof=shown.proof,
            http_method=shown.method,
            http_url=shown.url,
        )
    )
    assert not verdict.active
    assert verdict.status == getattr(broker_pb2, f"TOKEN_STATUS_{status.name}"), verdict.reason


@pytest.mark.parametrize("case", list(LEAKED_CASES), ids=lambda c: c.replace(" ", "_"))
def test_a_leaked_bound_step_token_is_refused_offline_with_its_status(
    stub: Stub, verifier: TokenVerifier, case: str
) -> None:
    present, status = LEAKED_CASES[case]
    key = DPoPKey.generate()
    token = _bound_step_token(stub, key).token
    shown = present(token, key)
    result = verifier.check(token, proof=shown.proof, method=shown.method, url=shown.url)
    assert result.status is status, result.reason


def test_a_replayed_proof_is_refused_online_and_offline(
    stub: Stub, verifier: TokenVerifier
) -> None:
    key = DPoPKey.generate()
    token = _bound_step_token(stub, key).token
    proof = key.proof("POST", URL, token=token)
    request = broker_pb2.VerifyTokenRequest(
        token=token, dpop_proof=proof, http_method="POST", http_url=URL
    )
    assert stub.VerifyToken(request).active
    replayed = stub.VerifyToken(request)
    assert replayed.status == broker_pb2.TOKEN_STATUS_PROOF_REPLAYED
    assert verifier.check(token, proof=proof, method="POST", url=URL).active
    again = verifier.check(token, proof=proof, method="POST", url=URL)
    assert again.status is TokenStatus.PROOF_REPLAYED


def test_a_refused_bound_token_is_audited_as_a_failed_verification(
    server: BrokerServer, stub: Stub
) -> None:
    key = DPoPKey.generate()
    token = _bound_step_token(stub, key).token
    stub.VerifyToken(broker_pb2.VerifyTokenRequest(token=token))
    failed = [
        e
        for e in server.broker.store.read_events(0, 1000)
        if e.draft.action == "token.verify_failed"
    ]
    assert [e.draft.details["status"] for e in failed] == ["proof_missing"]


def test_an_api_that_requires_a_nonce_refuses_a_proof_without_it(
    stub: Stub, verifier: TokenVerifier
) -> None:
    key = DPoPKey.generate()
    token = _bound_step_token(stub, key).token
    without = verifier.check(
        token, proof=key.proof("POST", URL, token=token), method="POST", url=URL, nonce="n-1"
    )
    assert without.status is TokenStatus.PROOF_NONCE_REQUIRED
    with_nonce = key.proof("POST", URL, token=token, nonce="n-1")
    assert verifier.check(token, proof=with_nonce, method="POST", url=URL, nonce="n-1").active
    online = stub.VerifyToken(
        broker_pb2.VerifyTokenRequest(
            token=token,
            dpop_proof=key.proof("POST", URL, token=token, nonce="stale"),
            http_method="POST",
            http_url=URL,
            dpop_nonce="n-2",
        )
    )
    assert online.status == broker_pb2.TOKEN_STATUS_PROOF_NONCE_REQUIRED


def test_an_unusable_step_key_is_refused_with_the_field_named(stub: Stub) -> None:
    run = stub.StartRun(start_run_request()).run
    private = DPoPKey.generate().public_jwk | {"d": "AAAA"}
    for jwk, rule in (
        ('{"kty": "oct", "k": "c2VjcmV0"}', "public JWK"),
        (str(private).replace("'", '"'), "private"),
        ('{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}', "usable public key"),
        ("not json", "not JSON"),
    ):
        error = rpc_error(
            lambda jwk=jwk: stub.IssueToken(
                broker_pb2.IssueTokenRequest(run_id=run.run_id, audience=AUDIENCE, dpop_jwk=jwk)
            )
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "dpop_jwk" in details(error) and rule in details(error)


# -- a bound run credential at the broker ------------------------------------------------------


def _bound_run_credential(stub: Stub, key: DPoPKey) -> str:
    request = start_run_request(dpop_jwk=key.public_jwk_json)
    return stub.StartRun(request).run_credential


def _issue_with(server: BrokerServer, credential: str, proof: str) -> grpc.RpcError | None:
    metadata: tuple[tuple[str, str | bytes], ...] = (("authorization", f"DPoP {credential}"),)
    if proof:
        metadata += (("dpop", proof),)
    request = broker_pb2.IssueTokenRequest(audience=AUDIENCE, permissions=perms(pipelines="read"))
    with grpc.insecure_channel(server.target) as channel:
        try:
            Stub(channel).IssueToken(request, metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error
    return None


CREDENTIAL_CASES: dict[str, tuple[Callable[[str, DPoPKey], str], TokenStatus]] = {
    "without proof": (lambda cred, key: "", TokenStatus.PROOF_MISSING),
    "with a proof by another key": (
        lambda cred, key: DPoPKey.generate().proof("POST", ISSUE_TOKEN, token=cred),
        TokenStatus.PROOF_WRONG_KEY,
    ),
    "for another method": (
        lambda cred, key: key.proof("GET", ISSUE_TOKEN, token=cred),
        TokenStatus.PROOF_WRONG_METHOD,
    ),
    "for another rpc": (
        lambda cred, key: key.proof(
            "POST", "/tokenbroker.v1.TokenBrokerService/RevokeRun", token=cred
        ),
        TokenStatus.PROOF_WRONG_URL,
    ),
    "with a stale iat": (
        lambda cred, key: key.proof("POST", ISSUE_TOKEN, token=cred, now=time.time() - 300),
        TokenStatus.PROOF_STALE,
    ),
    "with a wrong ath": (
        lambda cred, key: key.proof("POST", ISSUE_TOKEN, token=cred[:-2]),
        TokenStatus.PROOF_WRONG_TOKEN_HASH,
    ),
}


def _proof_refusals(server: BrokerServer) -> list[str]:
    return [
        str(e.draft.details.get("proof_status"))
        for e in server.broker.store.read_events(0, 10_000)
        if e.draft.action == "authn.denied" and "proof_status" in e.draft.details
    ]


@pytest.mark.parametrize("case", list(CREDENTIAL_CASES), ids=lambda c: c.replace(" ", "_"))
def test_a_leaked_bound_run_credential_is_refused_and_audited_with_its_status(
    server: BrokerServer, stub: Stub, case: str
) -> None:
    make_proof, status = CREDENTIAL_CASES[case]
    key = DPoPKey.generate()
    credential = _bound_run_credential(stub, key)
    error = _issue_with(server, credential, make_proof(credential, key))
    assert error is not None and error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert status.name.lower() in _proof_refusals(server)


def test_a_bound_run_credential_works_with_a_fresh_proof_per_call_and_not_a_replayed_one(
    server: BrokerServer, stub: Stub
) -> None:
    key = DPoPKey.generate()
    credential = _bound_run_credential(stub, key)
    proof = key.proof("POST", ISSUE_TOKEN, token=credential)
    assert _issue_with(server, credential, proof) is None
    replayed = _issue_with(server, credential, proof)
    assert replayed is not None and replayed.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in details(replayed)
    assert _proof_refusals(server) == ["proof_replayed"]
    # The client library's call credentials sign a fresh proof for every call and method.
    with local_channel(server.target, dpop_credentials(credential, key)) as channel:
        runner = Stub(channel)
        for _ in range(3):
            runner.IssueToken(
                broker_pb2.IssueTokenRequest(audience=AUDIENCE, permissions=perms(pipelines="read"))
            )
        run_id = _run_id_of(credential)
        assert runner.GetRun(broker_pb2.GetRunRequest(run_id=run_id)).run.run_id == run_id


def _run_id_of(credential: str) -> str:
    claims = read_claims(credential)
    assert claims is not None
    return str(claims["run_id"])


def test_a_step_token_can_be_bound_to_the_key_of_the_calls_own_proof(
    server: BrokerServer, stub: Stub
) -> None:
    key = DPoPKey.generate()
    credential = _bound_run_credential(stub, key)
    with local_channel(server.target, dpop_credentials(credential, key)) as channel:
        issued = Stub(channel).IssueToken(
            broker_pb2.IssueTokenRequest(
                audience=AUDIENCE, permissions=perms(pipelines="read"), bind_proof_key=True
            )
        )
    assert issued.cnf_jkt == key.thumbprint
    error = rpc_error(
        lambda: stub.IssueToken(
            broker_pb2.IssueTokenRequest(
                run_id=_run_id_of(credential), audience=AUDIENCE, bind_proof_key=True
            )
        )
    )
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "DPoP proof" in details(error)


def test_a_delegated_run_credential_is_bound_to_the_runners_key(delegator_stub: Stub) -> None:
    key = DPoPKey.generate()
    executed = delegator_stub.ExecuteOnBehalfOf(
        broker_pb2.ExecuteOnBehalfOfRequest(
            pipeline=start_run_request().pipeline,
            permission_ceiling=perms(pipelines="read"),
            idempotency_key="bound-1",
            asserted=broker_pb2.AssertedPerson(subject="u-1", email="alice@example.com"),
            dpop_jwk=key.public_jwk_json,
        )
    )
    claims = read_claims(executed.run_credential)
    assert claims is not None and claims["cnf"] == {"jkt": key.thumbprint}


# -- policy ------------------------------------------------------------------------------------


BINDING_POLICY = """
[binding]
audiences = ["prod.example.com"]
levels = ["write"]
"""


@pytest.fixture
def strict_server(tmp_path: Path, clock: ShiftedClock) -> Iterator[BrokerServer]:
    """A broker whose policy requires bound tokens for prod.example.com and for write and
    above, and bound credentials for every run deploy-portal starts."""
    accounts = dict(standard_accounts())
    path = write_policy(tmp_path / "policy.toml", accounts.values())
    toml = path.read_text().replace(
        "[accounts.deploy-portal.delegation]",
        "require_binding = true\n\n[accounts.deploy-portal.delegation]",
    )
    path.write_text(toml + BINDING_POLICY)
    settings = make_settings(tmp_path / "data", policy=path)
    running = create_server(settings, broker=build_broker(settings, clock=clock))
    running.start()
    yield running
    running.stop(grace=0.5)


def _stub_as(server: BrokerServer, role: str) -> tuple[Stub, grpc.Channel]:
    from tokenbroker.credentials import assertion_credentials

    account = standard_accounts()[role]
    creds = assertion_credentials(
        account.name, account.private_pem, server.broker.authn.audience, key_id=account.kid
    )
    channel = local_channel(server.target, creds)
    return Stub(channel), channel


def test_the_policy_refuses_unbound_write_tokens_and_tokens_for_a_bound_audience(
    strict_server: BrokerServer,
) -> None:
    stub, channel = _stub_as(strict_server, "orchestrator")
    with channel:
        request = start_run_request()
        del request.permission_ceiling[:]
        request.permission_ceiling.extend(perms(artifacts="admin"))
        run = stub.StartRun(request).run

        def issue(audience: str, level: str, jwk: str = "") -> broker_pb2.IssueTokenResponse:
            return stub.IssueToken(
                broker_pb2.IssueTokenRequest(
                    run_id=run.run_id,
                    audience=audience,
                    permissions=perms(artifacts=level),
                    dpop_jwk=jwk,
                )
            )

        assert issue("api.example.com", "read").token  # neither rule applies
        for audience, level, why in (
            ("api.example.com", "write", "'write' permissions and above (artifacts:write)"),
            ("api.example.com", "admin", "'write' permissions and above (artifacts:admin)"),
            ("prod.example.com", "read", "audience 'prod.example.com'"),
        ):
            error = rpc_error(lambda a=audience, lv=level: issue(a, lv))
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED
            assert why in details(error) and "dpop_jwk" in details(error)
        assert issue("prod.example.com", "admin", DPoPKey.generate().public_jwk_json).cnf_jkt
    refused = [
        e.draft.details
        for e in strict_server.broker.store.read_events(0, 1000)
        if e.draft.action == "token.refused"
    ]
    assert [d["reason"] for d in refused] == ["binding required"] * 3


def test_the_policy_requires_bound_credentials_for_runs_a_delegator_starts(
    strict_server: BrokerServer,
) -> None:
    stub, channel = _stub_as(strict_server, "delegator")

    def execute(key: str, jwk: str = "") -> broker_pb2.ExecuteOnBehalfOfResponse:
        return stub.ExecuteOnBehalfOf(
            broker_pb2.ExecuteOnBehalfOfRequest(
                pipeline=start_run_request().pipeline,
                permission_ceiling=perms(pipelines="read"),
                idempotency_key=key,
                asserted=broker_pb2.AssertedPerson(subject="u-1", email="alice@example.com"),
                dpop_jwk=jwk,
            )
        )

    with channel:
        error = rpc_error(lambda: execute("unbound"))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "runs started by deploy-portal" in details(error)
        key = DPoPKey.generate()
        credential = execute("bound", key.public_jwk_json).run_credential
    # Its step tokens must be bound too, whatever their audience or level.
    with local_channel(strict_server.target, dpop_credentials(credential, key)) as runner:
        unbound = rpc_error(
            lambda: Stub(runner).IssueToken(
                broker_pb2.IssueTokenRequest(
                    audience="api.example.com", permissions=perms(pipelines="read")
                )
            )
        )
        assert unbound.code() is grpc.StatusCode.PERMISSION_DENIED
        bound = Stub(runner).IssueToken(
            broker_pb2.IssueTokenRequest(
                audience="api.example.com", permissions=perms(pipelines="read"), bind_proof_key=True
            )
        )
        assert bound.cnf_jkt == key.thumbprint
    refusals = [
        e.draft.details["reason"]
        for e in strict_server.broker.store.read_events(0, 1000)
        if e.draft.action == "run.refused"
    ]
    assert len(refusals) == 1 and "bound credentials" in refusals[0]


# -- the executor hand-off -----------------------------------------------------------------------


def test_a_run_handed_to_an_executor_with_a_key_gets_a_credential_bound_to_it(
    tmp_path: Path,
) -> None:
    from tokenbroker.samples.executor import SampleExecutor

    key = DPoPKey.generate()
    jwk_file = tmp_path / "executor.jwk.json"
    jwk_file.write_text(key.public_jwk_json)
    with SampleExecutor("http://127.0.0.1:9/unused", dpop_key=key) as executor:
        settings = make_settings(
            tmp_path / "data",
            policy=_standard_policy(tmp_path),
            executor_target=executor.target,
            executor_dpop_jwk=jwk_file,
        )
        running = create_server(settings)
        running.start()
        try:
            stub, channel = _stub_as(running, "delegator")
            with channel:
                run = stub.ExecuteOnBehalfOf(
                    broker_pb2.ExecuteOnBehalfOfRequest(
                        pipeline=start_run_request().pipeline,
                        permission_ceiling=perms(pipelines="read"),
                        idempotency_key="handed-1",
                        asserted=broker_pb2.AssertedPerson(subject="u-1", email="a@example.com"),
                    )
                ).run
            execution = executor.wait_for(run.run_id)
        finally:
            running.stop(grace=0.5)
    # Bound to the executor's key, and usable by it: it minted, called and ended the run.
    assert execution.credential_jkt == key.thumbprint
    assert execution.token and execution.run_ended, execution.error


def test_an_executor_key_that_is_not_a_public_jwk_stops_the_start(tmp_path: Path) -> None:
    from broker.settings import SettingsError

    bad = tmp_path / "executor.jwk.json"
    bad.write_text('{"kty": "oct", "k": "c2VjcmV0"}')
    for executor_target, message in (
        ("127.0.0.1:1", "public JWK"),
        ("", "needs --executor-target"),
    ):
        with pytest.raises(SettingsError, match=message):
            settings = make_settings(
                tmp_path / "data", executor_target=executor_target, executor_dpop_jwk=bad
            )
            create_server(settings)
