"""An API verifies step tokens itself, and still sees a run's end within a second."""

from __future__ import annotations

import time

import grpc
import pytest

from broker.api.server import BrokerServer
from tests.accounts import Callers, standard_accounts
from tests.cli_support import closed_port
from tests.support import eventually, start_run_request
from tokenbroker.credentials import assertion_credentials
from tokenbroker.errors import PermissionDenied, Unavailable
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc
from tokenbroker.verification import TokenStatus
from tokenbroker.verifier import (
    JwksCache,
    RevocationFollower,
    TokenRejected,
    TokenVerifier,
    jwks_from_broker,
)

Stub = broker_pb2_grpc.TokenBrokerServiceStub


@pytest.fixture
def auditor_channel(callers: Callers) -> grpc.Channel:
    """What an API following revocations uses: an auditor's channel (siem, org acme)."""
    siem = standard_accounts()["auditor"]
    return callers.channel(
        assertion_credentials(siem.name, siem.private_pem, callers.audience, key_id=siem.kid)
    )


def _issue(stub: Stub) -> tuple[str, str]:
    run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    token = stub.IssueToken(
        broker_pb2.IssueTokenRequest(run_id=run_id, audience="api.example.com"), timeout=5
    ).token
    return run_id, token


def test_offline_verifier_rejects_a_token_within_a_second_of_revoke_run(
    server: BrokerServer, stub: Stub, channel: grpc.Channel, auditor_channel: grpc.Channel
) -> None:
    run_id, token = _issue(stub)
    follower = RevocationFollower(auditor_channel, org="acme").start()
    try:
        verifier = TokenVerifier(
            issuer=server.broker.tokens.issuer,
            audience="api.example.com",
            keys=JwksCache(jwks_from_broker(channel)),
            revocations=follower,
        )
        assert verifier.verify(token)["run_id"] == run_id
        stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run_id), timeout=5)
        eventually(
            lambda: not verifier.check(token).active,
            within=1.0,
            interval=0.005,
            what="the revocation to reach the verifier",
        )
        with pytest.raises(TokenRejected) as rejected:
            verifier.verify(token)
        assert rejected.value.status is TokenStatus.RUN_ENDED
        assert rejected.value.reason == "run ended"
    finally:
        follower.stop()


def test_offline_verifier_knows_runs_that_ended_before_it_started(
    server: BrokerServer, stub: Stub, channel: grpc.Channel, auditor_channel: grpc.Channel
) -> None:
    run_id, token = _issue(stub)
    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run_id), timeout=5)
    follower = RevocationFollower(auditor_channel, org="acme").start()
    try:
        verifier = TokenVerifier(
            issuer=server.broker.tokens.issuer,
            audience="api.example.com",
            keys=JwksCache(jwks_from_broker(channel)),
            revocations=follower,
        )
        assert verifier.check(token).status is TokenStatus.RUN_ENDED
    finally:
        follower.stop()


def test_offline_verifier_fetches_an_emergency_rotated_key_on_first_sight(
    server: BrokerServer, stub: Stub, admin_stub: Stub, channel: grpc.Channel
) -> None:
    fetches = 0
    fetch_jwks = jwks_from_broker(channel)

    def counting_fetch() -> object:
        nonlocal fetches
        fetches += 1
        return fetch_jwks()

    verifier = TokenVerifier(
        issuer=server.broker.tokens.issuer,
        audience="api.example.com",
        keys=JwksCache(counting_fetch, min_refresh=0.0),  # type: ignore[arg-type]
    )
    _, before = _issue(stub)
    verifier.verify(before)
    # An emergency rotation signs with a key the cached JWKS lacks (a normal one would not:
    # the old key signs on while the new one is pre-published).
    admin_stub.RotateSigningKey(broker_pb2.RotateSigningKeyRequest(emergency=True), timeout=10)
    _, after = _issue(stub)
    verifier.verify(after)
    verifier.verify(before)
    assert fetches == 2


def test_offline_verifier_enforces_audience_and_issuer(
    server: BrokerServer, stub: Stub, channel: grpc.Channel
) -> None:
    _, token = _issue(stub)
    keys = JwksCache(jwks_from_broker(channel))
    other_api = TokenVerifier(issuer=server.broker.tokens.issuer, audience="other", keys=keys)
    assert other_api.check(token).status is TokenStatus.WRONG_AUDIENCE
    impostor = TokenVerifier(issuer="https://evil", audience="api.example.com", keys=keys)
    assert impostor.check(token).status is TokenStatus.WRONG_ISSUER


def test_a_follower_whose_credential_may_not_read_the_audit_fails_at_once(
    server: BrokerServer, callers: Callers
) -> None:
    orchestrator = standard_accounts()["orchestrator"]  # no auditor role
    channel = callers.channel(
        assertion_credentials(
            orchestrator.name, orchestrator.private_pem, callers.audience, key_id=orchestrator.kid
        )
    )
    follower = RevocationFollower(channel, org="acme")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        follower.start(wait=10)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert time.monotonic() - started < 5
    follower.stop()


def _verifier_credentials(callers: Callers) -> grpc.CallCredentials:
    orders_api = standard_accounts()["verifier"]  # role verifier, scope acme/*/*
    return assertion_credentials(
        orders_api.name, orders_api.private_pem, callers.audience, key_id=orders_api.kid
    )


def test_for_broker_sets_up_issuer_keys_and_revocations_in_one_call(
    server: BrokerServer, stub: Stub, callers: Callers
) -> None:
    ended_before, ended_token = _issue(stub)
    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=ended_before), timeout=5)
    run_id, token = _issue(stub)
    with TokenVerifier.for_broker(
        server.target, _verifier_credentials(callers), audience="api.example.com", org="acme"
    ) as verifier:
        assert verifier.issuer == server.broker.tokens.issuer
        assert verifier.verify(token)["run_id"] == run_id
        assert verifier.check(ended_token).status is TokenStatus.RUN_ENDED
        stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run_id), timeout=5)
        eventually(
            lambda: verifier.check(token).status is TokenStatus.RUN_ENDED,
            within=1.0,
            interval=0.005,
            what="the revocation to reach the verifier",
        )
        assert verifier.check(token[:-4] + "AAAA").status is TokenStatus.BAD_SIGNATURE


def test_for_broker_without_the_role_to_follow_endings_fails_at_once(
    server: BrokerServer, callers: Callers
) -> None:
    portal = standard_accounts()["delegator"]
    credentials = assertion_credentials(
        portal.name, portal.private_pem, callers.audience, key_id=portal.kid
    )
    started = time.monotonic()
    with pytest.raises(PermissionDenied) as denied:
        TokenVerifier.for_broker(server.target, credentials, audience="api.example.com", org="acme")
    assert "that needs role auditor or verifier" in denied.value.message
    assert time.monotonic() - started < 5  # not the 10 s wait for a follower that cannot start


def test_for_broker_outside_the_verifiers_scope_is_refused(
    server: BrokerServer, callers: Callers
) -> None:
    with pytest.raises(PermissionDenied) as denied:
        TokenVerifier.for_broker(
            server.target, _verifier_credentials(callers), audience="api.example.com"
        )
    assert "outside its scope (acme/*/*)" in denied.value.message


def test_for_broker_without_following_needs_no_credential(server: BrokerServer, stub: Stub) -> None:
    run_id, token = _issue(stub)
    with TokenVerifier.for_broker(
        server.target, None, audience="api.example.com", follow_revocations=False
    ) as verifier:
        assert verifier.verify(token)["run_id"] == run_id


def test_for_broker_names_an_unreachable_broker() -> None:
    with pytest.raises(Unavailable):
        TokenVerifier.for_broker(
            f"127.0.0.1:{closed_port()}", None, audience="api.example.com", timeout=5.0
        )
