"""Credentials seen before are accepted without being parsed again, and only while the full
check would accept them too: a refusal always comes from the full check, with its audit."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from broker.api.server import BrokerServer
from broker.auth import assertions
from broker.identity import RUN_CREDENTIAL_TYP
from tests.accounts import Callers, Stub, callers_of
from tests.support import details, rpc_error, start_run_request
from tests.test_auth_authn import _run_credential, run_credential_server
from tokenbroker.v1 import broker_pb2

__all__ = ["run_credential_server"]  # the fixture, shared with test_auth_authn


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every credential the authenticator reads in full."""
    seen: list[str] = []
    real = assertions.unverified_header

    def counting(token: str) -> dict[str, Any]:
        seen.append(token)
        return real(token)

    monkeypatch.setattr(assertions, "unverified_header", counting)
    return seen


def test_an_accepted_assertion_is_not_parsed_again_while_it_is_valid(
    stub: Stub, parsed: list[str]
) -> None:
    run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    first = len(parsed)
    for _ in range(3):
        stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5)

    assert first >= 1
    assert len(parsed) == first


def test_a_run_credential_is_not_parsed_again_while_its_run_is_active(
    stub: Stub, callers: Callers, parsed: list[str]
) -> None:
    started = stub.StartRun(start_run_request(), timeout=5)
    as_run = callers.bearer_stub(started.run_credential)
    request = broker_pb2.IssueTokenRequest(audience="api.example.com")
    before = len(parsed)

    for _ in range(3):
        assert as_run.IssueToken(request, timeout=5).token

    assert len(parsed) == before


def test_a_run_credential_accepted_before_its_run_ended_is_refused_and_audited_after(
    server: BrokerServer, stub: Stub, callers: Callers, root_stub: Stub
) -> None:
    started = stub.StartRun(start_run_request(), timeout=5)
    as_run = callers.bearer_stub(started.run_credential)
    request = broker_pb2.IssueTokenRequest(audience="api.example.com")
    assert as_run.IssueToken(request, timeout=5).token

    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=started.run.run_id), timeout=5)
    error = rpc_error(lambda: as_run.IssueToken(request, timeout=5))

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert details(error) == "run credential rejected: run ended"
    denials = [
        item.event
        for item in root_stub.StreamAudit(
            broker_pb2.StreamAuditRequest(
                filter=broker_pb2.AuditFilter(actions=["authn.denied"]), stop_at_head=True
            ),
            timeout=5,
        )
        if item.HasField("event")
    ]
    assert [json_format.MessageToDict(e.details)["mechanism"] for e in denials] == [
        "run_credential"
    ]


def test_a_refused_run_credential_is_checked_once_per_call(
    run_credential_server: tuple[BrokerServer, list[str]],
) -> None:
    server, seen = run_credential_server
    with callers_of(server) as callers:
        ended = callers.bearer_stub(_run_credential("r-ended"))
        rpc_error(lambda: ended.GetRun(broker_pb2.GetRunRequest(run_id="r-ended"), timeout=5))
    assert seen == [_run_credential("r-ended")]


def test_a_run_credential_header_on_a_token_that_is_no_jwt_is_refused_as_malformed(
    server: BrokerServer, callers: Callers, root_stub: Stub
) -> None:
    header = json.dumps({"alg": "ES256", "typ": RUN_CREDENTIAL_TYP}).encode()
    not_a_jwt = base64.urlsafe_b64encode(header).rstrip(b"=").decode() + ".!!!.sig"
    as_run = callers.bearer_stub(not_a_jwt)

    error = rpc_error(lambda: as_run.GetRun(broker_pb2.GetRunRequest(run_id="r-1"), timeout=5))

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert details(error) == "malformed credential: not a JWT"
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(actions=["authn.denied"]), stop_at_head=True
    )
    (denied,) = [i.event for i in root_stub.StreamAudit(request, timeout=5) if i.HasField("event")]
    assert json_format.MessageToDict(denied.details)["mechanism"] == "bearer"
