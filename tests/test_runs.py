"""Starting, reading, listing, renewing and ending runs over gRPC."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.api.server import BrokerServer
from broker.runs.model import ExpiryReason
from tests.support import (
    UNKNOWN_RUN_ID,
    ShiftedClock,
    details,
    eventually,
    perms,
    pipeline,
    reap,
    rpc_error,
    start_run_request,
)
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

Stub = broker_pb2_grpc.TokenBrokerServiceStub


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    found = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        found.update({v.field: v.description for v in bad.field_violations})
    return found


def test_started_run_is_active_with_its_ceiling_and_deadline(stub: Stub) -> None:
    before = time.time()
    run = stub.StartRun(start_run_request(), timeout=5).run
    assert run.run_id.startswith("r-")
    assert run.state == types_pb2.RUN_STATE_ACTIVE
    assert {(p.resource, p.level) for p in run.permission_ceiling} == {
        ("pipelines", "execute"),
        ("artifacts", "write"),
    }
    lifetime = run.deadline.ToSeconds() - before
    assert 6 * 3600 - 5 < lifetime <= 6 * 3600 + 1
    assert stub.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=5).run == run


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (
            broker_pb2.StartRunRequest(permission_ceiling=perms(artifacts="read")),
            {"pipeline.org", "pipeline.project", "pipeline.pipeline"},
        ),
        (
            broker_pb2.StartRunRequest(pipeline=pipeline()),
            {"permission_ceiling"},
        ),
        (
            broker_pb2.StartRunRequest(
                pipeline=pipeline(), permission_ceiling=perms(artifacts="execute")
            ),
            {"permission_ceiling[0].level"},
        ),
        (
            broker_pb2.StartRunRequest(
                pipeline=pipeline(name="../etc"), permission_ceiling=perms(artifacts="read")
            ),
            {"pipeline.pipeline"},
        ),
        (
            start_run_request(deadline=duration_pb2.Duration(seconds=25 * 3600)),
            {"deadline"},
        ),
        (
            start_run_request(lease=duration_pb2.Duration(seconds=-5)),
            {"lease"},
        ),
    ],
)
def test_malformed_start_run_names_each_bad_field(
    stub: Stub, request_: broker_pb2.StartRunRequest, fields: set[str]
) -> None:
    error = rpc_error(lambda: stub.StartRun(request_, timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert set(violations) == fields
    for name in fields:
        assert name in details(error)


def test_unknown_run_is_not_found(stub: Stub) -> None:
    error = rpc_error(
        lambda: stub.GetRun(broker_pb2.GetRunRequest(run_id=UNKNOWN_RUN_ID), timeout=5)
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert UNKNOWN_RUN_ID in details(error)


def test_revoke_ends_a_run_once_and_reports_repeat_calls(stub: Stub) -> None:
    run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    first = stub.RevokeRun(
        broker_pb2.RevokeRunRequest(run_id=run_id, reason="pipeline finished"), timeout=5
    )
    assert first.run.state == types_pb2.RUN_STATE_ENDED
    assert first.run.end_reason == "pipeline finished"
    assert not first.already_ended
    second = stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run_id, reason="again"), timeout=5)
    assert second.already_ended
    assert second.run.end_reason == "pipeline finished"
    assert second.run.end_time == first.run.end_time


def test_run_past_its_deadline_expires_without_anyone_ending_it(
    stub: Stub, auditor_stub: Stub, server: BrokerServer, clock: ShiftedClock
) -> None:
    run_id = stub.StartRun(
        start_run_request(deadline=duration_pb2.Duration(seconds=1)), timeout=5
    ).run.run_id
    clock.advance(1.5)
    reap(server)
    run = stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5).run
    assert run.state == types_pb2.RUN_STATE_EXPIRED
    assert run.end_reason == ExpiryReason.DEADLINE_PASSED.value
    events = _audit(auditor_stub, run_id)
    assert [e.action for e in events] == ["run.started", "run.expired"]


def test_the_reaper_thread_expires_due_runs_by_itself(stub: Stub, clock: ShiftedClock) -> None:
    second = duration_pb2.Duration(seconds=1)
    run_id = stub.StartRun(start_run_request(deadline=second), timeout=5).run.run_id
    clock.advance(1.5)  # nobody calls the expiry pass: the broker's reaper does, every 0.1 s

    def state() -> int:
        return stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5).run.state

    eventually(lambda: state() == types_pb2.RUN_STATE_EXPIRED, what="the reaper's pass")


def test_lease_lapses_unless_renewed(stub: Stub, server: BrokerServer, clock: ShiftedClock) -> None:
    lease = duration_pb2.Duration(seconds=10)
    renewed_id = stub.StartRun(start_run_request(lease=lease), timeout=5).run.run_id
    lapsing_id = stub.StartRun(start_run_request(lease=lease), timeout=5).run.run_id
    # Renewed every 6 s of broker time (the clock also runs with the wall clock: the margin
    # of 4 s is for a slow machine), over several lease periods.
    for _ in range(5):
        stub.RenewRun(broker_pb2.RenewRunRequest(run_id=renewed_id), timeout=5)
        clock.advance(6)
        reap(server)
    renewed = stub.GetRun(broker_pb2.GetRunRequest(run_id=renewed_id), timeout=5).run
    assert renewed.state == types_pb2.RUN_STATE_ACTIVE
    lapsed = stub.GetRun(broker_pb2.GetRunRequest(run_id=lapsing_id), timeout=5).run
    assert lapsed.state == types_pb2.RUN_STATE_EXPIRED
    assert lapsed.end_reason == ExpiryReason.LEASE_LAPSED.value
    error = rpc_error(lambda: stub.RenewRun(broker_pb2.RenewRunRequest(run_id=lapsing_id)))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_list_runs_pages_through_every_run_newest_first(stub: Stub) -> None:
    started = [stub.StartRun(start_run_request(), timeout=5).run.run_id for _ in range(7)]
    seen: list[str] = []
    token = ""
    while True:
        request = broker_pb2.ListRunsRequest(org="acme", page_size=3, page_token=token)
        page = stub.ListRuns(request, timeout=5)
        seen.extend(r.run_id for r in page.runs)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(started))


def test_list_runs_rejects_a_forged_page_token(stub: Stub) -> None:
    request = broker_pb2.ListRunsRequest(org="acme", page_token="%%%")
    error = rpc_error(lambda: stub.ListRuns(request))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in details(error)


def test_every_response_carries_a_request_id_and_echoes_a_valid_one(stub: Stub) -> None:
    # With the status (trailing metadata) when the call succeeds...
    _, call = stub.StartRun.with_call(
        start_run_request(), metadata=(("x-request-id", "ci-1234"),), timeout=5
    )
    assert ("x-request-id", "ci-1234") in call.trailing_metadata()
    _, call = stub.StartRun.with_call(start_run_request(), timeout=5)
    assert any(
        k == "x-request-id" and str(v).startswith("req-") for k, v in call.trailing_metadata()
    )
    # ...and first (initial metadata) when it fails, where clients have always read it.
    error = rpc_error(
        lambda: stub.GetRun(
            broker_pb2.GetRunRequest(run_id="r-missing"),
            metadata=(("x-request-id", "ci-5678"),),
            timeout=5,
        )
    )
    assert isinstance(error, grpc.Call)
    assert ("x-request-id", "ci-5678") in error.initial_metadata()


def _audit(stub: Stub, run_id: str) -> list[types_pb2.AuditEvent]:
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(run_id=run_id), stop_at_head=True
    )
    return [item.event for item in stub.StreamAudit(request, timeout=5)]
