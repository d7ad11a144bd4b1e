"""Keys per relying party and pre-published rotation, as a relying party sees them: the JWKS
fetched over the broker's real HTTP port, tokens checked with PyJWT, the broker's clock moved
by the test (no sleeping through the window)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import duration_pb2

from broker.api.server import BrokerServer, create_server
from broker.audit.events import Action
from broker.keyfile import write_private_key
from broker.policy.file import PolicyError, load_policy
from broker.runs.keys import generate_private_key
from tests.accounts import Callers, callers_of, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.support import ShiftedClock, start_run_request
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub

RS256_ONLY = '\n[audiences."sts.amazonaws.com"]\nalgorithm = "RS256"\n'
HOUR = 3600.0


@pytest.fixture
def federated(tmp_path: Path, clock: ShiftedClock) -> Iterator[BrokerServer]:
    """A broker with its HTTP port, the default pre-publication window (1 h) and a policy
    that wants RS256 for AWS STS; on `clock`."""
    policy = standard_policy(tmp_path)
    policy.write_text(policy.read_text() + RS256_ONLY)
    settings = make_settings(tmp_path / "data", policy=policy, http_listen="127.0.0.1:0")
    running = create_server(settings, clock=clock)
    running.start()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def callers(federated: BrokerServer) -> Iterator[Callers]:
    with callers_of(federated) as made:
        yield made


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def fetch_jwks(server: BrokerServer) -> jwt.PyJWKSet:
    """What a relying party caches: the JWKS from the discovery document's jwks_uri."""
    discovery = get_json(server.broker.tokens.issuer + "/.well-known/openid-configuration")
    return jwt.PyJWKSet.from_dict(get_json(discovery["jwks_uri"]))


def verify_with(cached: jwt.PyJWKSet, token: str, server: BrokerServer, **options: Any) -> Any:
    """A relying party's check, with nothing but its cached JWKS (no refetch)."""
    header = jwt.get_unverified_header(token)
    key = cached[header["kid"]]  # KeyError: the cache does not hold the signing key
    return jwt.decode(
        token,
        key.key,
        algorithms=[key.algorithm_name],
        audience=jwt.decode(token, options={"verify_signature": False})["aud"],
        issuer=server.broker.tokens.issuer,
        **options,
    )


def start_long_run(callers: Callers) -> broker_pb2.StartRunResponse:
    stub = callers.stub(standard_accounts()["orchestrator"])
    return stub.StartRun(start_run_request(deadline=duration_pb2.Duration(seconds=3 * 3600)))


def issue(stub: Stub, run_id: str, audience: str = "api.example.com") -> str:
    request = broker_pb2.IssueTokenRequest(run_id=run_id, audience=audience)
    return str(stub.IssueToken(request, timeout=10).token)


def rotate(callers: Callers, emergency: bool = False) -> broker_pb2.RotateSigningKeyResponse:
    admin = callers.stub(standard_accounts()["admin"])
    return admin.RotateSigningKey(broker_pb2.RotateSigningKeyRequest(emergency=emergency))


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def test_a_jwks_fetched_before_keys_rotate_verifies_a_token_issued_right_after_it(
    federated: BrokerServer, callers: Callers
) -> None:
    cached = fetch_jwks(federated)
    started = start_long_run(callers)
    rotated = rotate(callers)
    step = callers.bearer_stub(started.run_credential)
    for audience in ("api.example.com", "sts.amazonaws.com"):  # ES256 and RS256 alike
        token = issue(step, started.run.run_id, audience)
        assert verify_with(cached, token, federated)["run_id"] == started.run.run_id
        assert kid_of(token) in rotated.retiring_key_ids  # the old key signs on
    assert len(rotated.new_key_ids) == 2  # one per algorithm
    assert set(rotated.new_key_ids).isdisjoint(k.key_id for k in cached.keys)


def test_after_the_prepublish_window_tokens_carry_the_new_kid_a_jwks_fetched_in_it_holds(
    federated: BrokerServer, callers: Callers, clock: ShiftedClock
) -> None:
    started = start_long_run(callers)
    rotated = rotate(callers)
    in_window = fetch_jwks(federated)  # any refetch after the rotation holds the new keys
    assert set(rotated.new_key_ids) <= {k.key_id for k in in_window.keys}

    # The broker's clock runs on in real time: move it to 30 s before the switch, then past.
    signs_from = rotated.signs_from.ToMicroseconds() / 1e6
    assert signs_from == pytest.approx(clock() + HOUR, abs=30)  # the default window
    clock.advance(signs_from - 30 - clock())
    step = callers.bearer_stub(started.run_credential)
    assert kid_of(issue(step, started.run.run_id)) in rotated.retiring_key_ids
    clock.advance(signs_from - clock())
    for audience in ("api.example.com", "sts.amazonaws.com"):
        token = issue(step, started.run.run_id, audience)
        assert kid_of(token) in rotated.new_key_ids
        # The broker's clock runs an hour ahead of this verifier's: leeway for iat/nbf only.
        claims = verify_with(in_window, token, federated, leeway=HOUR + 60)
        assert claims["run_id"] == started.run.run_id
    assert kid_of(issue(step, started.run.run_id)) == rotated.key_id  # the default, ES256


def test_an_emergency_rotation_signs_with_the_new_key_at_once_and_its_event_says_emergency(
    federated: BrokerServer, callers: Callers
) -> None:
    started = start_long_run(callers)
    step = callers.bearer_stub(started.run_credential)
    old_kid = kid_of(issue(step, started.run.run_id))
    rotated = rotate(callers, emergency=True)
    assert rotated.emergency
    token = issue(step, started.run.run_id)
    assert kid_of(token) == rotated.key_id != old_kid
    assert verify_with(fetch_jwks(federated), token, federated)  # after a refetch
    store = federated.broker.store
    events = store.read_events(0, 1000)
    emergency = [e.draft for e in events if e.draft.action == Action.KEY_ROTATED_EMERGENCY]
    assert {e.details["kid"] for e in emergency} == set(rotated.new_key_ids)
    assert all(e.details["emergency"] is True for e in emergency)
    assert all(e.principal == standard_accounts()["admin"].name for e in emergency)
    retired = [e.draft for e in events if e.draft.action == Action.KEY_RETIRED]
    assert old_kid in {e.details["kid"] for e in retired}
    assert all(e.details["emergency"] is True for e in retired)


def test_a_normal_rotation_is_audited_with_when_the_new_key_signs(
    federated: BrokerServer, callers: Callers
) -> None:
    rotated = rotate(callers)
    events = [e.draft for e in federated.broker.store.read_events(0, 1000)]
    assert not [e for e in events if e.action == Action.KEY_ROTATED_EMERGENCY]
    new = [e for e in events if e.action == Action.KEY_ROTATED]
    signs_from_us = rotated.signs_from.ToMicroseconds()
    assert {e.details["kid"] for e in new} == set(rotated.new_key_ids)
    assert all(e.details["signs_from_us"] == signs_from_us for e in new)
    retired = [e for e in events if e.action == Action.KEY_RETIRED]
    assert all(e.details["stops_signing_us"] == signs_from_us for e in retired)


def test_the_policy_chooses_rs256_for_an_audience_and_the_default_es256_for_the_rest(
    federated: BrokerServer, callers: Callers
) -> None:
    started = start_long_run(callers)
    step = callers.bearer_stub(started.run_credential)
    cached = fetch_jwks(federated)
    aws = issue(step, started.run.run_id, "sts.amazonaws.com")
    api = issue(step, started.run.run_id, "api.example.com")
    assert jwt.get_unverified_header(aws)["alg"] == "RS256"
    assert jwt.get_unverified_header(api)["alg"] == "ES256"
    assert verify_with(cached, aws, federated)["aud"] == "sts.amazonaws.com"
    assert {k.key_type for k in cached.keys} == {"EC", "RSA"}
    discovery = get_json(federated.broker.tokens.issuer + "/.well-known/openid-configuration")
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    # Run credentials (for the broker itself) keep the default algorithm.
    assert jwt.get_unverified_header(started.run_credential)["alg"] == "ES256"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('[audiences."sts.amazonaws.com"]\nalgorithm = "HS256"', "must be one of ES256, RS256"),
        ('[audiences."sts.*.com"]\nalgorithm = "RS256"', "'*' only at the end"),
        ('[audiences."a b"]\nalgorithm = "RS256"', "without spaces"),
        ('[audiences."x"]\nalgoritm = "RS256"', "did you mean 'algorithm'"),
    ],
)
def test_policy_check_refuses_an_audience_rule_it_cannot_apply(
    tmp_path: Path, table: str, problem: str
) -> None:
    policy = standard_policy(tmp_path)
    policy.write_text(policy.read_text() + "\n" + table + "\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert any(problem in p and p.startswith("audiences.") for p in refused.value.problems)


def test_an_exact_audience_wins_over_a_prefix_and_a_longer_prefix_over_a_shorter(
    tmp_path: Path,
) -> None:
    policy = standard_policy(tmp_path)
    policy.write_text(
        policy.read_text()
        + '\n[audiences."https://iam.googleapis.com/*"]\nalgorithm = "RS256"\n'
        + '[audiences."https://*"]\nalgorithm = "ES256"\n'
        + '[audiences."https://iam.googleapis.com/pool-a"]\nalgorithm = "ES256"\n'
    )
    loaded = load_policy(policy)

    def algorithm(audience: str) -> str | None:
        rule = loaded.audience_rule(audience)
        return None if rule is None else rule.algorithm

    assert algorithm("https://iam.googleapis.com/pool-b") == "RS256"
    assert algorithm("https://iam.googleapis.com/pool-a") == "ES256"
    assert algorithm("https://vault.example.com") == "ES256"
    assert algorithm("api.example.com") is None  # the broker's default
    assert loaded.token_algorithms() == {"ES256", "RS256"}


def test_a_policy_reload_that_names_rs256_adds_an_rs256_key_that_signs_at_once(
    server: BrokerServer,
) -> None:
    """The `server` fixture's policy names no algorithm: ES256 only, until the reload."""
    assert {k["alg"] for k in server.broker.keys.jwks()["keys"]} == {"ES256"}
    with callers_of(server) as on_server:
        stub = on_server.stub(standard_accounts()["orchestrator"])
        reload_adds_an_rs256_key(server, stub)


def reload_adds_an_rs256_key(server: BrokerServer, stub: Stub) -> None:
    run = stub.StartRun(start_run_request()).run
    assert jwt.get_unverified_header(issue(stub, run.run_id, "sts.amazonaws.com"))["alg"] == (
        "ES256"
    )
    policy = server.broker.policy.path
    policy.write_text(policy.read_text() + RS256_ONLY)
    assert server.broker.policy.reload()
    token = issue(stub, run.run_id, "sts.amazonaws.com")
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert kid_of(token) in {k["kid"] for k in server.broker.keys.jwks()["keys"]}


def test_a_broker_restarted_in_the_window_keeps_the_schedule_it_read_from_the_store(
    tmp_path: Path, clock: ShiftedClock
) -> None:
    settings = make_settings(tmp_path / "data", policy=standard_policy(tmp_path))
    first = create_server(settings, clock=clock)
    first.start()
    try:
        with callers_of(first) as on_first:
            old = first.broker.keys.active.kid
            rotated = rotate(on_first)
    finally:
        first.stop(grace=0.5)
    second = create_server(settings, clock=clock)
    second.start()
    try:
        assert second.broker.keys.active.kid == old  # still pre-publishing
        assert [s.state for s in second.broker.keys.schedule()] == ["signing", "prepublished"]
        clock.advance(rotated.signs_from.ToMicroseconds() / 1e6 - clock())
        assert second.broker.keys.active.kid == rotated.key_id
    finally:
        second.stop(grace=0.5)


def test_an_external_signing_key_cannot_sign_for_an_audience_that_wants_another_algorithm(
    tmp_path: Path,
) -> None:
    pem = tmp_path / "signing.pem"
    write_private_key(pem, generate_private_key("ES256"))
    policy = standard_policy(tmp_path)
    policy.write_text(policy.read_text() + RS256_ONLY)
    settings = make_settings(tmp_path / "data", policy=policy, signing_key=pem)
    running = create_server(settings)
    running.start()
    try:
        with callers_of(running) as on_it:
            stub = on_it.stub(standard_accounts()["orchestrator"])
            run = stub.StartRun(start_run_request()).run
            assert jwt.get_unverified_header(issue(stub, run.run_id))["alg"] == "ES256"
            with pytest.raises(grpc.RpcError) as refused:
                issue(stub, run.run_id, "sts.amazonaws.com")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no RS256 signing key" in str(refused.value.details())
    finally:
        running.stop(grace=0.5)
