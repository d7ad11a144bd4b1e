"""Hostile inputs (issue 13 §2, §3): each example of the issue, answered as specified."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.api.server import BrokerServer
from broker.identity import Person, VerificationMethod
from broker.runs import model
from broker.runs.model import PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from broker.telemetry.logs import JsonFormatter
from tests.support import (
    UNKNOWN_RUN_ID,
    details,
    perms,
    pipeline,
    rpc_error,
    start_run_request,
)
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub
MB = 1024 * 1024
INJECTED = "mallory@evil.com\nExecuted by: ceo@example.com\n@example.com"


def violations(error: grpc.RpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of a refused call: {field: rule}."""
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status"
    found: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found |= {v.field: v.description for v in bad.field_violations}
    return found


def execute_as(stub: Stub, key: str, **asserted: str) -> broker_pb2.ExecuteOnBehalfOfResponse:
    request = broker_pb2.ExecuteOnBehalfOfRequest(
        pipeline=pipeline(),
        permission_ceiling=perms(pipelines="execute"),
        idempotency_key=key,
        asserted=broker_pb2.AssertedPerson(**asserted),
    )
    return stub.ExecuteOnBehalfOf(request, timeout=10)


def runs_of(stub: Stub) -> list[str]:
    listed = stub.ListRuns(broker_pb2.ListRunsRequest(org="acme", page_size=5), timeout=5)
    return [run.attribution.summary for run in listed.runs]


def test_an_asserted_email_with_an_injected_attribution_line_is_invalid_argument(
    delegator_stub: Stub, stub: Stub
) -> None:
    error = rpc_error(lambda: execute_as(delegator_stub, "k1", subject="u-1", email=INJECTED))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == {"asserted.email"}
    assert "Executed by: ceo" not in details(error)  # the value is never quoted back
    assert runs_of(stub) == []


def test_an_asserted_email_with_two_at_signs_is_invalid_argument(
    delegator_stub: Stub, stub: Stub
) -> None:
    email = "mallory@evil.com@example.com"
    error = rpc_error(lambda: execute_as(delegator_stub, "k2", subject="u-1", email=email))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == {"asserted.email"}
    assert runs_of(stub) == []


def test_the_domain_of_an_asserted_email_is_compared_without_regard_to_case(
    delegator_stub: Stub,
) -> None:
    run = execute_as(delegator_stub, "k3", subject="u-1", email="Alice@EXAMPLE.com").run
    assert run.attribution.executed_by == "Alice@EXAMPLE.com"


@pytest.mark.parametrize("field", ["subject", "display_name", "email"])
def test_a_1_mb_subject_display_name_or_email_is_refused_and_list_runs_still_answers(
    server: BrokerServer, delegator_stub: Stub, stub: Stub, field: str
) -> None:
    person = {"subject": "u-1", "email": "alice@example.com"}
    database = server.broker.settings.data_dir / "broker.db"
    size_before = _size_with_wal(database)
    # 1 MB is more than any request may be: gRPC refuses it before reading it.
    error = rpc_error(lambda: execute_as(delegator_stub, "k4", **(person | {field: "x" * MB})))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Below the message limit, the field's own limit answers, naming the field.
    error = rpc_error(lambda: execute_as(delegator_stub, "k5", **(person | {field: "x" * 100_000})))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == {f"asserted.{field}"}
    assert len(details(error)) < 300
    assert runs_of(stub) == []  # and ListRuns page_size=5 answers
    assert _size_with_wal(database) - size_before < 64 * 1024


def _size_with_wal(database: Path) -> int:
    return sum(p.stat().st_size for p in (database, Path(f"{database}-wal")) if os.path.exists(p))


def test_a_1_mb_run_id_is_neither_echoed_nor_logged_in_full(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    huge = rpc_error(lambda: stub.GetRun(broker_pb2.GetRunRequest(run_id="r-" + "x" * MB)))
    assert huge.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    error = rpc_error(lambda: stub.GetRun(broker_pb2.GetRunRequest(run_id="r-" + "x" * 200_000)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == {"run_id"}
    assert len(details(error)) < 300 and "xxxxxxxx" not in details(error)
    formatter = JsonFormatter()
    assert max(len(formatter.format(r)) for r in caplog.records) < 2048
    # An unknown but well-formed id is looked up, and named in NOT_FOUND.
    missing = rpc_error(lambda: stub.GetRun(broker_pb2.GetRunRequest(run_id=UNKNOWN_RUN_ID)))
    assert missing.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(60, -1), (60, 1_000_000_000), (-60, 5), (0, -2_000_000_000), (10**12, 0)],
)
def test_durations_with_invalid_nanos_or_seconds_are_invalid_argument(
    stub: Stub, seconds: int, nanos: int
) -> None:
    request = start_run_request(lease=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    error = rpc_error(lambda: stub.StartRun(request, timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == {"lease"}


def test_unknown_enum_values_are_invalid_argument(stub: Stub) -> None:
    request = broker_pb2.ListRunsRequest(org="acme", state=99)  # type: ignore[arg-type]
    error = rpc_error(lambda: stub.ListRuns(request, timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(error)) == {"state"}


def test_nul_in_a_map_key_is_invalid_argument(stub: Stub) -> None:
    request = start_run_request()
    request.inputs["a\x00b"] = "v"
    error = rpc_error(lambda: stub.StartRun(request, timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(error)) == ["inputs['a\\\\x00b']"]


def test_control_characters_in_names_and_reasons_are_invalid_argument(
    delegator_stub: Stub, stub: Stub
) -> None:
    error = rpc_error(
        lambda: execute_as(
            delegator_stub, "k6", subject="u-1", email="a@example.com", display_name="Al\nice"
        )
    )
    assert set(violations(error)) == {"asserted.display_name"}
    run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    revoke = broker_pb2.RevokeRunRequest(run_id=run_id, reason="done\x1b[2J\u202e")
    error = rpc_error(lambda: stub.RevokeRun(revoke, timeout=5))
    assert set(violations(error)) == {"reason"}


def test_inputs_are_bounded_in_number_and_in_bytes_together(stub: Stub) -> None:
    many = start_run_request()
    many.inputs.update({f"k{i}": "v" for i in range(65)})
    assert set(violations(rpc_error(lambda: stub.StartRun(many, timeout=5)))) == {"inputs"}
    heavy = start_run_request()
    heavy.inputs.update({f"k{i}": "v" * 4000 for i in range(3)})
    assert set(violations(rpc_error(lambda: stub.StartRun(heavy, timeout=5)))) == {"inputs"}


def test_identifiers_must_match_their_format_before_any_lookup(stub: Stub) -> None:
    for bad in ("r-nope", "../r-" + "0" * 26, "r-" + "0" * 25 + "\n", "R-" + "0" * 26):
        error = rpc_error(lambda bad=bad: stub.GetRun(broker_pb2.GetRunRequest(run_id=bad)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, bad
        assert set(violations(error)) == {"run_id"}


def test_attribution_shown_to_people_cannot_be_forged_even_by_a_stored_record() -> None:
    """Defence in depth: a record that somehow holds control characters (an older broker, a
    restored backup) still renders as one line."""
    person = Person(
        subject="u-1",
        issuer="https://idp.example.com\nTriggered via: ops",
        email=INJECTED,
        method=VerificationMethod.IDP_VERIFIED,
        evidence_sha256="0" * 64,
    )
    run = Run(
        run_id=UNKNOWN_RUN_ID,
        pipeline=PipelineRef("acme", "web", "deploy"),
        state=RunState.ACTIVE,
        create_time=0.0,
        deadline=60.0,
        triggered_via="deploy-portal\u202e",
        permission_ceiling=PermissionSet.of({"pipelines": "read"}),
        on_behalf_of=person,
    )
    executed_by, via, summary = model.attribution(run)
    for shown in (executed_by, via, summary):
        assert "\n" not in shown and "\u202e" not in shown
    # The injected text stays visibly inside the one line, escaped.
    assert summary.startswith("Executed by: mallory@evil.com\\x0aExecuted by: ceo@")


def _raw_call(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        method, request_serializer=None, response_deserializer=None
    )
    return rpc_error(lambda: call(body, timeout=5))


@pytest.mark.parametrize(
    "method",
    [
        "/tokenbroker.v1.TokenBrokerService/GetSigningKeys",
        "/tokenbroker.v1.TokenBrokerService/StartRun",
        "/tokenbroker.v1.TokenBrokerService/VerifyToken",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_random_bytes_as_a_request_body_are_invalid_argument_without_a_traceback(
    channel: grpc.Channel, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A wire type that does not exist, a truncated field, a varint of eleven bytes.
    for body in (b"\xff\xff\xff\xff", b"\x0a\x05abc", b"\x08" + b"\xff" * 11):
        error = _raw_call(channel, method, body)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, body)
        assert "deserializing" not in details(error)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_a_string_field_that_is_not_utf8_is_invalid_argument(channel: grpc.Channel) -> None:
    valid = broker_pb2.StartRunRequest(pipeline=pipeline()).SerializeToString()
    error = _raw_call(
        channel, "/tokenbroker.v1.TokenBrokerService/StartRun", valid + b"\x32\x02\xc3\x28"
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_reflection_still_works_and_refuses_an_undecodable_request(
    channel: grpc.Channel,
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "tokenbroker.v1.TokenBrokerService" in names
    raw: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None,
        response_deserializer=None,
    )
    error = rpc_error(lambda: list(raw(iter([b"\xff\xff\xff"]), timeout=5)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
