"""No token alive after its run (issue 14 §3): a run past its deadline or lease is expired
for every reader at once — GetRun, ListRuns, VerifyToken, the offline verifier — whether or
not the reaper has recorded it yet. The reaper never runs here (a one-hour interval); the
broker's clock is moved by hand."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from google.protobuf import duration_pb2

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.context import CallContext
from broker.identity import BROKER
from tests.accounts import Callers, callers_of, standard_accounts
from tests.audit_support import FakeClock
from tests.conftest import make_settings, standard_policy
from tests.support import details, rpc_error, start_run_request
from tokenbroker.credentials import assertion_credentials
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2
from tokenbroker.verification import DEFAULT_LEEWAY, TokenStatus
from tokenbroker.verifier import JwksCache, RevocationFollower, TokenVerifier, jwks_from_broker

Stub = broker_pb2_grpc.TokenBrokerServiceStub
AUDIENCE = "api.example.com"
LEASE = 5


@pytest.fixture
def lapsing(tmp_path: Path) -> Iterator[tuple[BrokerServer, FakeClock]]:
    """A broker whose clock the test moves and whose reaper never gets to run."""
    settings = make_settings(
        tmp_path / "data", policy=standard_policy(tmp_path), reap_interval=3600.0
    )
    # Starts at the wall clock: callers' assertions are signed with it.
    clock = FakeClock(time.time())
    running = create_server(settings, broker=build_broker(settings, clock=clock))
    running.start()
    yield running, clock
    running.stop(grace=0.5)


@pytest.fixture
def root(lapsing: tuple[BrokerServer, FakeClock]) -> Iterator[tuple[Stub, Callers]]:
    with callers_of(lapsing[0]) as callers:
        yield callers.stub(standard_accounts()["root"]), callers


def _offline_verifier(
    server: BrokerServer, callers: Callers, clock: FakeClock
) -> tuple[TokenVerifier, RevocationFollower]:
    siem = standard_accounts()["auditor"]
    channel = callers.channel(
        assertion_credentials(siem.name, siem.private_pem, callers.audience, key_id=siem.kid)
    )
    follower = RevocationFollower(channel, org="acme").start()
    verifier = TokenVerifier(
        issuer=server.broker.tokens.issuer,
        audience=AUDIENCE,
        keys=JwksCache(jwks_from_broker(channel)),
        revocations=follower,
        clock=clock,
    )
    return verifier, follower


def _issue(stub: Stub, run_id: str) -> str:
    request = broker_pb2.IssueTokenRequest(
        run_id=run_id, audience=AUDIENCE, ttl=duration_pb2.Duration(seconds=600)
    )
    return stub.IssueToken(request, timeout=5).token


def _states(stub: Stub, state: types_pb2.RunState.ValueType) -> list[str]:
    request = broker_pb2.ListRunsRequest(org="acme", state=state)
    return [run.run_id for run in stub.ListRuns(request, timeout=5).runs]


def _verify_online(stub: Stub, token: str) -> broker_pb2.TokenStatus.ValueType:
    request = broker_pb2.VerifyTokenRequest(token=token, audience=AUDIENCE)
    return stub.VerifyToken(request, timeout=5).status


def test_step_token_never_outlives_the_lease_it_was_issued_under(
    lapsing: tuple[BrokerServer, FakeClock], root: tuple[Stub, Callers]
) -> None:
    stub, _ = root
    run = stub.StartRun(
        start_run_request(lease=duration_pb2.Duration(seconds=LEASE)), timeout=5
    ).run
    claims = jwt.decode(_issue(stub, run.run_id), options={"verify_signature": False})
    assert claims["exp"] == int(run.lease_expire_time.ToSeconds())


def test_run_whose_lease_lapsed_is_expired_for_every_verifier_before_the_reaper_runs(
    lapsing: tuple[BrokerServer, FakeClock], root: tuple[Stub, Callers]
) -> None:
    server, clock = lapsing
    stub, callers = root
    run = stub.StartRun(
        start_run_request(lease=duration_pb2.Duration(seconds=LEASE)), timeout=5
    ).run
    token = _issue(stub, run.run_id)
    verifier, follower = _offline_verifier(server, callers, clock)
    try:
        assert verifier.check(token).active
        clock.now += LEASE + 0.5  # lapsed; the reaper has not noticed

        got = stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run
        assert got.state == types_pb2.RUN_STATE_EXPIRED
        assert got.end_reason == "lease lapsed"
        assert got.end_time == run.lease_expire_time
        assert run.run_id in _states(stub, types_pb2.RUN_STATE_EXPIRED)
        assert run.run_id not in _states(stub, types_pb2.RUN_STATE_ACTIVE)
        assert _verify_online(stub, token) == broker_pb2.TOKEN_STATUS_RUN_EXPIRED
        error = rpc_error(lambda: _issue(stub, run.run_id))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "lease lapsed" in details(error)
        renew = broker_pb2.RenewRunRequest(run_id=run.run_id)
        error = rpc_error(lambda: stub.RenewRun(renew, timeout=5))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        revoked = stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id), timeout=5)
        assert revoked.already_ended
        assert revoked.run.state == types_pb2.RUN_STATE_EXPIRED

        # Offline, the token's own exp (≤ the lease) ends it, beyond the clock skew allowed.
        assert verifier.check(token).status is TokenStatus.ACTIVE  # within the leeway
        clock.now = run.lease_expire_time.ToMicroseconds() / 1e6 + DEFAULT_LEEWAY + 1
        assert verifier.check(token).status is TokenStatus.EXPIRED
        assert _verify_online(stub, token) == broker_pb2.TOKEN_STATUS_EXPIRED
        assert not follower.status_of(run.run_id)  # no audit event was needed for that
    finally:
        follower.stop()


def test_reaper_records_the_expiry_every_reader_was_already_told(
    lapsing: tuple[BrokerServer, FakeClock], root: tuple[Stub, Callers]
) -> None:
    server, clock = lapsing
    stub, _ = root
    run = stub.StartRun(
        start_run_request(lease=duration_pb2.Duration(seconds=LEASE)), timeout=5
    ).run
    clock.now += LEASE + 0.5
    before = stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run
    clock.now += 10  # the reaper is late
    expired = server.broker.runs.expire_due(CallContext(principal=BROKER))
    assert [r.run_id for r in expired] == [run.run_id]
    after = stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run
    assert after == before
    assert server.broker.store.get_run(run.run_id).state.value == "expired"  # type: ignore[union-attr]


def test_run_past_its_deadline_is_expired_for_every_verifier_before_the_reaper_runs(
    lapsing: tuple[BrokerServer, FakeClock], root: tuple[Stub, Callers]
) -> None:
    server, clock = lapsing
    stub, callers = root
    run = stub.StartRun(
        start_run_request(deadline=duration_pb2.Duration(seconds=60)), timeout=5
    ).run
    token = _issue(stub, run.run_id)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] == int(run.deadline.ToSeconds())
    verifier, follower = _offline_verifier(server, callers, clock)
    try:
        clock.now += 60
        got = stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run
        assert (got.state, got.end_reason) == (types_pb2.RUN_STATE_EXPIRED, "deadline passed")
        assert _verify_online(stub, token) == broker_pb2.TOKEN_STATUS_RUN_EXPIRED
        clock.now += DEFAULT_LEEWAY + 1
        assert verifier.check(token).status is TokenStatus.EXPIRED
    finally:
        follower.stop()


def test_renewed_run_stays_active_and_its_new_tokens_reach_the_new_lease(
    lapsing: tuple[BrokerServer, FakeClock], root: tuple[Stub, Callers]
) -> None:
    server, clock = lapsing
    stub, callers = root
    run = stub.StartRun(
        start_run_request(lease=duration_pb2.Duration(seconds=LEASE)), timeout=5
    ).run
    first = _issue(stub, run.run_id)
    clock.now += LEASE - 1
    renewed = stub.RenewRun(broker_pb2.RenewRunRequest(run_id=run.run_id), timeout=5).run
    second = _issue(stub, run.run_id)
    claims = jwt.decode(second, options={"verify_signature": False})
    assert claims["exp"] == int(renewed.lease_expire_time.ToSeconds())
    verifier, follower = _offline_verifier(server, callers, clock)
    try:
        clock.now += 2  # past the first lease, inside the renewed one
        got = stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run
        assert got.state == types_pb2.RUN_STATE_ACTIVE
        assert _verify_online(stub, second) == broker_pb2.TOKEN_STATUS_ACTIVE
        assert verifier.check(second).active
        clock.now = run.lease_expire_time.ToMicroseconds() / 1e6 + DEFAULT_LEEWAY + 1
        # The first token was bound to the first lease; both verifiers say so alike.
        assert _verify_online(stub, first) == broker_pb2.TOKEN_STATUS_EXPIRED
        assert verifier.check(first).status is TokenStatus.EXPIRED
    finally:
        follower.stop()
