"""Step tokens: minted within the ceiling, verified online, dead when their run ends."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.request
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import duration_pb2

from broker.api.server import BrokerServer, create_server
from tests.accounts import Callers, callers_of, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.support import (
    ShiftedClock,
    as_dict,
    details,
    eventually,
    perms,
    reap,
    rpc_error,
    start_run_request,
)
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

Stub = broker_pb2_grpc.TokenBrokerServiceStub


def issue(stub: Stub, run_id: str, **kwargs: object) -> broker_pb2.IssueTokenResponse:
    request = broker_pb2.IssueTokenRequest(run_id=run_id, audience="api.example.com", step="build")
    for key, value in kwargs.items():
        if isinstance(value, duration_pb2.Duration):
            request.ttl.CopyFrom(value)
        elif key == "permissions":
            request.permissions.extend(value)  # type: ignore[arg-type]
        else:
            setattr(request, key, value)
    return stub.IssueToken(request, timeout=5)


def verify(
    stub: Stub, token: str, audience: str = "api.example.com"
) -> broker_pb2.VerifyTokenResponse:
    return stub.VerifyToken(
        broker_pb2.VerifyTokenRequest(token=token, audience=audience), timeout=5
    )


def start(stub: Stub, **overrides: object) -> broker_pb2.StartRunResponse:
    return stub.StartRun(start_run_request(**overrides), timeout=5)


def test_token_carries_the_run_identity_and_verifies(stub: Stub) -> None:
    run = start(stub).run
    minted = issue(stub, run.run_id, permissions=perms(pipelines="read"))
    result = verify(stub, minted.token)
    assert result.active and result.status == broker_pb2.TOKEN_STATUS_ACTIVE
    claims = as_dict(result.claims)
    assert claims["sub"] == f"run:acme/payments/deploy:{run.run_id}"
    assert claims["aud"] == "api.example.com"
    assert claims["run_id"] == run.run_id
    assert (claims["org"], claims["project"], claims["pipeline"]) == ("acme", "payments", "deploy")
    assert claims["step"] == "build"
    assert claims["permissions"] == {"pipelines": "read"}
    assert claims["jti"] == minted.token_id
    for required in ("iss", "exp", "iat", "nbf"):
        assert required in claims
    header = jwt.get_unverified_header(minted.token)
    assert header == {"alg": "ES256", "kid": minted.key_id, "typ": "at+jwt"}


def test_token_of_revoked_run_is_rejected_with_run_ended(stub: Stub) -> None:
    run = start(stub).run
    token = issue(stub, run.run_id).token
    assert verify(stub, token).active
    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id, reason="done"), timeout=5)
    result = verify(stub, token)
    assert not result.active
    assert result.status == broker_pb2.TOKEN_STATUS_RUN_ENDED
    assert result.reason == "run ended"
    assert result.run_id == run.run_id


def test_ended_run_mints_no_more_tokens(stub: Stub) -> None:
    run = start(stub).run
    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id), timeout=5)
    error = rpc_error(lambda: issue(stub, run.run_id))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no longer active" in details(error)


def test_token_of_run_past_its_deadline_is_rejected_with_run_expired(
    stub: Stub, server: BrokerServer, clock: ShiftedClock
) -> None:
    run = start(stub, deadline=duration_pb2.Duration(seconds=10)).run
    token = issue(stub, run.run_id, ttl=duration_pb2.Duration(seconds=60)).token
    assert verify(stub, token).active
    clock.advance(15)
    reap(server)
    result = verify(stub, token)
    assert result.status == broker_pb2.TOKEN_STATUS_RUN_EXPIRED
    assert result.reason == "run expired"
    state = stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run.state
    assert state == types_pb2.RUN_STATE_EXPIRED


def test_token_of_run_whose_lease_lapsed_is_rejected(
    stub: Stub, server: BrokerServer, clock: ShiftedClock
) -> None:
    run = start(stub, lease=duration_pb2.Duration(seconds=10)).run
    token = issue(stub, run.run_id).token
    assert verify(stub, token).active
    clock.advance(15)
    reap(server)
    assert verify(stub, token).status == broker_pb2.TOKEN_STATUS_RUN_EXPIRED


def test_token_asking_more_than_the_ceiling_is_refused_naming_each_excess(
    stub: Stub, auditor_stub: Stub
) -> None:
    run = start(stub).run  # ceiling: pipelines execute, artifacts write
    error = rpc_error(
        lambda: issue(stub, run.run_id, permissions=perms(pipelines="admin", secrets="read"))
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "pipelines: admin (ceiling: execute)" in details(error)
    assert "secrets: read (ceiling: none)" in details(error)
    events = auditor_stub.StreamAudit(
        broker_pb2.StreamAuditRequest(
            filter=broker_pb2.AuditFilter(run_id=run.run_id, actions=["token.refused"]),
            stop_at_head=True,
        ),
        timeout=5,
    )
    refused = [e.event for e in events]
    assert len(refused) == 1
    assert "pipelines: admin (ceiling: execute)" in as_dict(refused[0].details)["excess"]


@pytest.mark.parametrize("seconds", [29, 3601])
def test_ttl_outside_the_allowed_range_is_invalid(stub: Stub, seconds: int) -> None:
    run = start(stub).run
    error = rpc_error(lambda: issue(stub, run.run_id, ttl=duration_pb2.Duration(seconds=seconds)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl: must be between 30s and 3600s" in details(error)


def test_ttl_past_the_run_deadline_is_cut_to_the_deadline(stub: Stub) -> None:
    run = start(stub, deadline=duration_pb2.Duration(seconds=120)).run
    minted = issue(stub, run.run_id, ttl=duration_pb2.Duration(seconds=3600))
    assert minted.expire_time.seconds <= run.deadline.seconds
    assert jwt.decode(minted.token, options={"verify_signature": False})["exp"] <= (
        run.deadline.seconds
    )


def test_issued_token_is_audited_without_the_token(stub: Stub, auditor_stub: Stub) -> None:
    run = start(stub).run
    minted = issue(stub, run.run_id, permissions=perms(artifacts="read"))
    events = [
        e.event
        for e in auditor_stub.StreamAudit(
            broker_pb2.StreamAuditRequest(
                filter=broker_pb2.AuditFilter(actions=["token.issued"], org="acme"),
                stop_at_head=True,
            ),
            timeout=5,
        )
    ]
    assert len(events) == 1
    event = events[0]
    assert event.run_id == run.run_id
    assert event.details["jti"] == minted.token_id
    assert event.details["aud"] == "api.example.com"
    assert as_dict(event.details)["permissions"] == {"artifacts": "read"}
    assert minted.token not in str(event)


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_forged_and_confused_tokens_are_rejected_with_a_precise_status(stub: Stub) -> None:
    started = start(stub)
    token = issue(stub, started.run.run_id).token
    header_b64, payload_b64, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    header = jwt.get_unverified_header(token)
    jwks = json.loads(stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest()).jwks_json)
    public_key = jwt.PyJWK.from_dict(jwks["keys"][0]).key
    public_pem = public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    cases = {
        "alg none": (
            f"{_b64({'alg': 'none', 'typ': 'at+jwt', 'kid': header['kid']})}.{payload_b64}.",
            broker_pb2.TOKEN_STATUS_DISALLOWED_ALGORITHM,
        ),
        "HS256 keyed with the public key": (
            _hs256_with(public_pem, payload, header["kid"]),
            broker_pb2.TOKEN_STATUS_DISALLOWED_ALGORITHM,
        ),
        "tampered payload": (
            f"{header_b64}.{_b64({**payload, 'permissions': {'secrets': 'admin'}})}.{signature}",
            broker_pb2.TOKEN_STATUS_BAD_SIGNATURE,
        ),
        "unknown key id": (
            f"{_b64({**header, 'kid': 'nope'})}.{payload_b64}.{signature}",
            broker_pb2.TOKEN_STATUS_UNKNOWN_KEY,
        ),
        "run credential presented as a step token": (
            started.run_credential,
            broker_pb2.TOKEN_STATUS_WRONG_TYPE,
        ),
        "garbage": ("not-a-jwt", broker_pb2.TOKEN_STATUS_MALFORMED),
    }
    for name, (forged, expected) in cases.items():
        result = verify(stub, forged)
        assert not result.active, name
        assert result.status == expected, f"{name}: {result.reason}"
    assert verify(stub, token, audience="other-api").status == (
        broker_pb2.TOKEN_STATUS_WRONG_AUDIENCE
    )


def _hs256_with(secret: str, payload: dict[str, object], kid: str) -> str:
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{_b64(payload)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def test_rotation_publishes_the_new_key_at_once_and_signs_with_it_after_the_prepublish_window(
    stub: Stub, admin_stub: Stub, callers: Callers, clock: ShiftedClock
) -> None:
    started = start(stub, deadline=duration_pb2.Duration(seconds=3 * 3600))
    run = started.run
    old = issue(stub, run.run_id)
    rotated = admin_stub.RotateSigningKey(broker_pb2.RotateSigningKeyRequest(), timeout=10)
    assert rotated.key_id != old.key_id
    assert old.key_id in rotated.retiring_key_ids
    assert not rotated.emergency
    assert rotated.signs_from.seconds == pytest.approx(clock() + 3600, abs=5)  # the default
    published = [k.kid for k in stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest()).keys]
    assert published == [old.key_id, rotated.key_id]  # the signing key first
    assert issue(stub, run.run_id).key_id == old.key_id  # still in the window

    clock.advance(3601)
    # An hour on, callers' assertions made by the wall clock are stale: the run's credential
    # (checked by the broker's clock) asks instead.
    step = callers.bearer_stub(started.run_credential)
    new = issue(step, run.run_id)
    assert new.key_id == rotated.key_id
    assert verify(step, old.token).status == broker_pb2.TOKEN_STATUS_EXPIRED  # 10 min ttl
    assert verify(step, new.token).active

    def published_now() -> list[str]:
        return [k.kid for k in step.GetSigningKeys(broker_pb2.GetSigningKeysRequest()).keys]

    # The JWKS is re-read on every reaper pass (here every 0.1 s): the new key moves first.
    eventually(lambda: published_now() == [rotated.key_id, old.key_id], what="the new order")


def test_pyjwt_jwks_client_verifies_a_broker_token_over_http(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data", http_listen="127.0.0.1:0", policy=standard_policy(tmp_path)
    )
    server = create_server(settings)
    server.start()
    try:
        assert server.http is not None
        with callers_of(server) as callers:
            stub = callers.stub(standard_accounts()["orchestrator"])
            run = start(stub).run
            token = issue(stub, run.run_id).token
        issuer = server.broker.tokens.issuer
        assert issuer == f"http://127.0.0.1:{server.http.port}"
        # Nothing from this project below: what any OIDC verifier does.
        with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration") as response:
            discovery = json.load(response)
        assert discovery["issuer"] == issuer
        signing_key = jwt.PyJWKClient(discovery["jwks_uri"]).get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token, signing_key.key, algorithms=["ES256"], audience="api.example.com", issuer=issuer
        )
        assert claims["run_id"] == run.run_id
    finally:
        server.stop(grace=0.5)


def test_tokens_of_runs_ended_before_a_restart_stay_rejected_after_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    policy = standard_policy(tmp_path)
    first: BrokerServer = create_server(make_settings(data, policy=policy))
    first.start()
    with callers_of(first) as callers:
        stub = callers.stub(standard_accounts()["orchestrator"])
        ended = start(stub).run
        living = start(stub).run
        ended_token = issue(stub, ended.run_id).token
        living_token = issue(stub, living.run_id).token
        stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=ended.run_id), timeout=5)
    first.stop(grace=0.5)

    second = create_server(make_settings(data, policy=policy))
    second.start()
    try:
        with callers_of(second) as callers:
            stub = callers.stub(standard_accounts()["orchestrator"])
            assert verify(stub, ended_token).status == broker_pb2.TOKEN_STATUS_RUN_ENDED
            assert verify(stub, living_token).active
    finally:
        second.stop(grace=0.5)
