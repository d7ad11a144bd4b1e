"""Proving who calls: service-account assertions, run credentials, anonymous calls, and the
audit trail every refusal leaves."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.auth.authn import VerificationCache
from broker.errors import Unauthenticated
from broker.identity import RUN_CREDENTIAL_TYP, STEP_TOKEN_TYP, Principal, PrincipalKind
from broker.policy.model import Policy
from tests.accounts import (
    Account,
    Callers,
    Stub,
    bearer,
    callers_of,
    new_account,
    public_pem,
    sign_assertion,
    standard_accounts,
    write_policy,
)
from tests.conftest import make_settings, standard_policy
from tests.support import details, pipeline, rpc_error, start_run_request
from tokenbroker.v1 import broker_pb2, types_pb2

ORCHESTRATOR = standard_accounts()["orchestrator"]
ROOT = standard_accounts()["root"]


def audit(stub: Stub, *actions: str) -> list[types_pb2.AuditEvent]:
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(actions=list(actions)), stop_at_head=True
    )
    return [item.event for item in stub.StreamAudit(request, timeout=5) if item.HasField("event")]


def event_details(event: types_pb2.AuditEvent) -> dict[str, Any]:
    return json_format.MessageToDict(event.details)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(account: Account, audience: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": account.name,
        "sub": account.name,
        "aud": audience,
        "iat": now,
        "exp": now + 300,
        "jti": "j-1",
    }


def hs256_signed_with_the_public_key(audience: str) -> str:
    """The classic confusion attack: HMAC keyed with the account's public key PEM."""
    header = {"alg": "HS256", "typ": "JWT", "kid": ORCHESTRATOR.kid}
    body = _claims(ORCHESTRATOR, audience)
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    secret = public_pem(ORCHESTRATOR.key).encode()
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def tampered(audience: str) -> str:
    """A valid orchestrator assertion whose payload now claims to be root."""
    header, _, signature = sign_assertion(ORCHESTRATOR, audience).split(".")
    forged = _b64(json.dumps(_claims(ROOT, audience)).encode())
    return f"{header}.{forged}.{signature}"


def unsigned(audience: str) -> str:
    return jwt.encode(_claims(ORCHESTRATOR, audience), "", algorithm="none")


REJECTED: dict[str, tuple[Callable[[str], str], str]] = {
    "expired": (
        lambda aud: sign_assertion(ORCHESTRATOR, aud, now=time.time() - 400),
        "assertion expired",
    ),
    "another audience": (
        lambda aud: sign_assertion(ORCHESTRATOR, "https://other-broker.example"),
        "assertion is for another audience",
    ),
    "alg none": (unsigned, "algorithm 'none' is not allowed"),
    "HS256 with the public key": (
        hs256_signed_with_the_public_key,
        "algorithm 'HS256' is not allowed",
    ),
    "unknown kid": (
        lambda aud: sign_assertion(ORCHESTRATOR, aud, headers={"kid": "retired-2019"}),
        "unknown key id 'retired-2019' for service account ci-orchestrator",
    ),
    "unknown account": (
        lambda aud: sign_assertion(new_account("mallory", ["orchestrator"]), aud),
        "unknown service account 'mallory'",
    ),
    "tampered payload": (tampered, "bad signature"),
    "wrong key": (
        lambda aud: sign_assertion(ORCHESTRATOR, aud, key=ec.generate_private_key(ec.SECP256R1())),
        "bad signature",
    ),
    "lifetime over five minutes": (
        lambda aud: sign_assertion(ORCHESTRATOR, aud, lifetime=3600),
        "exceeds 5 minutes",
    ),
    "issued in the future": (
        lambda aud: sign_assertion(ORCHESTRATOR, aud, now=time.time() + 600),
        "not valid yet",
    ),
    "no jti": (lambda aud: sign_assertion(ORCHESTRATOR, aud, jti=None), "lacks the jti claim"),
    "sub differs from iss": (
        lambda aud: sign_assertion(ORCHESTRATOR, aud, sub="root"),
        "sub must equal iss",
    ),
    "a step token": (
        lambda aud: sign_assertion(ORCHESTRATOR, aud, headers={"typ": STEP_TOKEN_TYP}),
        "a step token cannot authenticate a caller",
    ),
    "not a JWT": (lambda aud: "opaque-api-key-123", "malformed credential"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_bad_assertion_is_unauthenticated_with_its_reason_and_audited(
    server: BrokerServer, anonymous_stub: Stub, root_stub: Stub, case: str
) -> None:
    make, reason = REJECTED[case]
    token = make(server.broker.authn.audience)
    error = rpc_error(
        lambda: anonymous_stub.GetRun(
            broker_pb2.GetRunRequest(run_id="r-x"), metadata=bearer(token), timeout=5
        )
    )
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert reason in details(error)
    denied = audit(root_stub, "authn.denied")
    assert len(denied) == 1
    recorded = event_details(denied[0])
    assert recorded["reason"] == details(error)
    assert recorded["method"] == "GetRun"
    assert recorded["mechanism"] == ("bearer" if case == "not a JWT" else "assertion")
    assert denied[0].outcome == types_pb2.AUDIT_OUTCOME_DENIED
    assert token not in json.dumps(recorded)


def test_claimed_account_of_a_refused_assertion_is_recorded(
    server: BrokerServer, anonymous_stub: Stub, root_stub: Stub
) -> None:
    expired = sign_assertion(ORCHESTRATOR, server.broker.authn.audience, now=time.time() - 900)
    rpc_error(lambda: anonymous_stub.GetRun(broker_pb2.GetRunRequest(), metadata=bearer(expired)))
    (event,) = audit(root_stub, "authn.denied")
    assert event_details(event)["claimed_principal"] == "ci-orchestrator"
    assert event.principal == "", "an unproven claim is not the event's principal"
    assert event_details(event)["peer"].startswith("ipv")


def test_assertion_within_clock_skew_is_accepted(
    server: BrokerServer, anonymous_stub: Stub
) -> None:
    slightly_stale = sign_assertion(
        ORCHESTRATOR, server.broker.authn.audience, now=time.time() - 310
    )
    metadata = bearer(slightly_stale)
    reply = anonymous_stub.StartRun(start_run_request(), metadata=metadata, timeout=5)
    assert reply.run.triggered_via == "ci-orchestrator"


def test_anonymous_call_is_unauthenticated_before_the_request_is_validated(
    anonymous_stub: Stub, root_stub: Stub
) -> None:
    error = rpc_error(lambda: anonymous_stub.StartRun(broker_pb2.StartRunRequest(), timeout=5))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "no credential" in details(error)
    (event,) = audit(root_stub, "authn.denied")
    assert event_details(event)["mechanism"] == "none"
    assert event_details(event)["method"] == "StartRun"


def test_get_signing_keys_needs_no_credential(anonymous_stub: Stub) -> None:
    keys = anonymous_stub.GetSigningKeys(broker_pb2.GetSigningKeysRequest(), timeout=5)
    assert keys.keys and keys.keys[0].alg == "ES256"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("Basic Y2k6c2VjcmV0", "must be 'Bearer <credential>'"),
        ("Bearer", "must be 'Bearer <credential>'"),
        ("Bearer " + "a" * 5000, "longer than 4096"),
    ],
)
def test_malformed_authorization_metadata_is_unauthenticated(
    anonymous_stub: Stub, value: str, reason: str
) -> None:
    error = rpc_error(
        lambda: anonymous_stub.GetRun(
            broker_pb2.GetRunRequest(), metadata=(("authorization", value),), timeout=5
        )
    )
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert reason in details(error)


def test_two_authorization_headers_are_refused(server: BrokerServer, anonymous_stub: Stub) -> None:
    token = sign_assertion(ORCHESTRATOR, server.broker.authn.audience)
    metadata = bearer(token) + bearer(token)
    error = rpc_error(lambda: anonymous_stub.GetRun(broker_pb2.GetRunRequest(), metadata=metadata))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "more than one authorization header" in details(error)


def test_denied_call_is_audited_with_caller_reason_and_pipeline(
    stub: Stub, root_stub: Stub
) -> None:
    request = start_run_request(pipeline=pipeline(org="globex", project="web"))
    error = rpc_error(lambda: stub.StartRun(request, timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert details(error) == (
        "ci-orchestrator may not start runs: globex/web/deploy is outside its scope (acme/*/*)"
    )
    (event,) = audit(root_stub, "authz.denied")
    assert event.principal == "ci-orchestrator"
    assert event.outcome == types_pb2.AUDIT_OUTCOME_DENIED
    assert event.pipeline.org == "globex"
    assert event_details(event)["reason"] == details(error)
    assert event_details(event)["op"] == "start_run"
    assert event_details(event)["auth_method"] == "assertion"


def test_missing_role_is_named_in_the_denial(delegator_stub: Stub) -> None:
    error = rpc_error(lambda: delegator_stub.StartRun(start_run_request(), timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert details(error) == "deploy-portal may not start runs: that needs role orchestrator"


def test_allowed_call_names_its_caller_in_the_audit(stub: Stub, root_stub: Stub) -> None:
    run = stub.StartRun(start_run_request(), timeout=5).run
    (event,) = audit(root_stub, "run.started")
    assert event.principal == "ci-orchestrator"
    assert event.run_id == run.run_id
    assert run.triggered_via == "ci-orchestrator"


def test_listing_every_org_needs_a_scope_that_covers_every_org(stub: Stub) -> None:
    error = rpc_error(lambda: stub.ListRuns(broker_pb2.ListRunsRequest(), timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "across all pipelines: outside its scope (acme/*/*)" in details(error)
    assert stub.ListRuns(broker_pb2.ListRunsRequest(org="acme"), timeout=5) is not None


def test_delegator_reads_a_run_it_started_but_not_others(
    server: BrokerServer, delegator_stub: Stub, stub: Stub
) -> None:
    from broker.auth.authz import Op
    from broker.context import CallContext
    from broker.runs.lifecycle import RunSpec
    from broker.runs.model import PipelineRef
    from broker.runs.permissions import PermissionSet

    portal = Principal(PrincipalKind.SERVICE_ACCOUNT, "deploy-portal", auth_method="assertion")
    spec = RunSpec(PipelineRef("acme", "web", "deploy"), PermissionSet.of({"artifacts": "read"}))
    mine = server.broker.runs.start(CallContext(principal=portal), spec, op=Op.EXECUTE_ON_BEHALF)
    others = stub.StartRun(start_run_request(), timeout=5).run
    got = delegator_stub.GetRun(broker_pb2.GetRunRequest(run_id=mine.run.run_id), timeout=5)
    assert got.run.triggered_via == "deploy-portal"
    error = rpc_error(
        lambda: delegator_stub.GetRun(broker_pb2.GetRunRequest(run_id=others.run_id), timeout=5)
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert f"run {others.run_id} was not started by deploy-portal" in details(error)


# --- run credentials are routed by their JOSE `typ` -----------------------------------


@pytest.fixture
def run_credential_server(tmp_path: Path) -> Iterator[tuple[BrokerServer, list[str]]]:
    seen: list[str] = []

    def verify(token: str) -> Principal:
        seen.append(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        if claims.get("run_id") == "r-ended":
            raise Unauthenticated("run credential of an ended run")
        run_id = claims["run_id"]
        return Principal(PrincipalKind.RUN, f"run:{run_id}", run_id=run_id, auth_method="run")

    settings = make_settings(tmp_path / "data", policy=standard_policy(tmp_path))
    server = create_server(settings, broker=build_broker(settings, run_credentials=verify))
    server.start()
    yield server, seen
    server.stop(grace=0.5)


def _run_credential(run_id: str) -> str:
    return jwt.encode({"run_id": run_id}, "", algorithm="none", headers={"typ": RUN_CREDENTIAL_TYP})


def test_run_credential_goes_to_the_run_credential_verifier(
    run_credential_server: tuple[BrokerServer, list[str]],
) -> None:
    server, seen = run_credential_server
    with callers_of(server) as callers:
        run_id = callers.stub(ROOT).StartRun(start_run_request(), timeout=5).run.run_id
        as_run = callers.bearer_stub(_run_credential(run_id))
        got = as_run.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5)
        assert got.run.run_id == run_id
        assert seen == [_run_credential(run_id)]


def test_refused_run_credential_is_unauthenticated_and_audited(
    run_credential_server: tuple[BrokerServer, list[str]],
) -> None:
    server, _ = run_credential_server
    with callers_of(server) as callers:
        ended = callers.bearer_stub(_run_credential("r-ended"))
        error = rpc_error(lambda: ended.GetRun(broker_pb2.GetRunRequest(run_id="r-ended")))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert details(error) == "run credential of an ended run"
        (event,) = audit(callers.stub(ROOT), "authn.denied")
        assert event_details(event)["mechanism"] == "run_credential"


def test_forged_run_credential_is_unauthenticated_with_the_reason(
    server: BrokerServer, callers: Callers
) -> None:
    as_run = callers.bearer_stub(_run_credential("r-1"))
    error = rpc_error(lambda: as_run.GetRun(broker_pb2.GetRunRequest(run_id="r-1")))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "run credential rejected: algorithm 'none' is not accepted" in details(error)


# --- the verification cache ---------------------------------------------------------


def test_verified_assertion_is_cached_under_its_hash_until_it_expires() -> None:
    cache = VerificationCache(max_entries=8)
    policy = Policy({})
    principal = Principal(PrincipalKind.SERVICE_ACCOUNT, "a")
    key = hashlib.sha256(b"credential").digest()
    cache.put(key, principal, valid_until=100.0, policy=policy, now=0.0)
    assert cache.get(key, policy, now=99.0) is principal
    assert cache.get(key, Policy({}), now=99.0) is None, "another policy object: re-verify"
    cache.put(key, principal, valid_until=100.0, policy=policy, now=0.0)
    assert cache.get(key, policy, now=101.0) is None
    assert len(cache) == 0


def test_cache_stays_within_its_bound_dropping_expired_then_oldest() -> None:
    cache = VerificationCache(max_entries=2)
    policy = Policy({})
    principal = Principal(PrincipalKind.SERVICE_ACCOUNT, "a")
    cache.put(b"expired", principal, valid_until=5.0, policy=policy, now=0.0)
    cache.put(b"old", principal, valid_until=50.0, policy=policy, now=0.0)
    cache.put(b"new", principal, valid_until=60.0, policy=policy, now=10.0)
    assert len(cache) == 2
    assert cache.get(b"old", policy, now=10.0) is principal
    cache.put(b"newest", principal, valid_until=60.0, policy=policy, now=10.0)
    assert len(cache) == 2
    assert cache.get(b"old", policy, now=10.0) is None, "the oldest entry went first"
    assert cache.get(b"newest", policy, now=10.0) is principal


def test_cached_assertion_stops_working_when_a_reload_removes_its_account(
    tmp_path: Path,
) -> None:
    accounts = standard_accounts()
    policy_path = write_policy(tmp_path / "policy.toml", accounts.values())
    settings = make_settings(tmp_path / "data", store="memory", policy=policy_path)
    server = create_server(settings)
    server.start()
    try:
        token = sign_assertion(ORCHESTRATOR, server.broker.authn.audience)
        with grpc.insecure_channel(server.target) as channel:
            plain = Stub(channel)
            plain.StartRun(start_run_request(), metadata=bearer(token), timeout=5)
            plain.StartRun(start_run_request(), metadata=bearer(token), timeout=5)
            assert len(server.broker.authn.cache) == 1
            write_policy(policy_path, [a for a in accounts.values() if a is not ORCHESTRATOR])
            assert server.broker.policy.reload()
            error = rpc_error(lambda: plain.StartRun(start_run_request(), metadata=bearer(token)))
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "unknown service account 'ci-orchestrator'" in details(error)
    finally:
        server.stop(grace=0.5)
