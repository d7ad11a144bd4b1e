"""Every limit of issue 13 §4, hit and recovered from, over real gRPC on a fake clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker import limits
from broker.api import convert
from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.audit.events import Action
from broker.identity import Person, VerificationMethod
from broker.runs.model import PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from tests.accounts import Callers, callers_of, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.otel_support import in_memory_sdk
from tests.support import UNKNOWN_RUN_ID, FakeClock, eventually, rpc_error, start_run_request
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub


def retry_delay(error: grpc.RpcError) -> float:
    """The google.rpc.RetryInfo delay of a RESOURCE_EXHAUSTED answer, in seconds."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToMilliseconds()) / 1000
    raise AssertionError("no RetryInfo")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def serve(tmp_path: Path, clock: FakeClock, **overrides: object) -> BrokerServer:
    settings = make_settings(tmp_path / "data", policy=standard_policy(tmp_path), **overrides)
    server = create_server(settings, broker=build_broker(settings, clock=clock))
    server.start()
    return server


@pytest.fixture
def limited(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[BrokerServer, Callers]]:
    server = serve(
        tmp_path,
        clock,
        principal_rate=5.0,
        principal_burst=10,
        audit_streams_per_principal=2,
        metric_audiences=3,
    )
    with callers_of(server) as callers:
        yield server, callers
    server.stop(grace=0.5)


def events_of(server: BrokerServer) -> list[Any]:
    """Every audit event the server's store holds, oldest first."""
    return list(server.broker.store.read_events(0, 100_000))


def test_1000_anonymous_failed_calls_write_four_audit_events_not_1000(
    tmp_path: Path, clock: FakeClock
) -> None:
    server = serve(tmp_path, clock)
    try:
        before = len(events_of(server))
        codes: dict[grpc.StatusCode, int] = {}
        with grpc.insecure_channel(server.target) as channel:
            anonymous = Stub(channel)
            for _ in range(1000):
                error = rpc_error(
                    lambda: anonymous.GetRun(broker_pb2.GetRunRequest(run_id=UNKNOWN_RUN_ID))
                )
                codes[error.code()] = codes.get(error.code(), 0) + 1
            # The peer's burst (100) is refused as UNAUTHENTICATED, the rest is throttled.
            assert codes == {
                grpc.StatusCode.UNAUTHENTICATED: 100,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 900,
            }
            throttled = rpc_error(
                lambda: anonymous.GetSigningKeys(broker_pb2.GetSigningKeysRequest())
            )
            assert retry_delay(throttled) == pytest.approx(1 / 20, abs=0.01)
            written = events_of(server)[before:]
            assert [e.draft.action for e in written] == [Action.AUTHN_DENIED, Action.CALL_THROTTLED]
            # The interval closes: one more event per (source, reason), with the count.
            clock.now += server.broker.settings.refusal_audit_interval
            server.broker.refusals.flush()
            written = events_of(server)[before:]
            assert len(written) == 4
            counts: dict[str, int] = {}
            for event in written:
                counts[event.draft.action] = (
                    counts.get(event.draft.action, 0)
                    + int(event.draft.details.get("repeated", 0))
                    + (0 if "repeated" in event.draft.details else 1)
                )
            assert counts == {Action.AUTHN_DENIED: 100, Action.CALL_THROTTLED: 901}
            # Recovered: after a second the peer is heard again, and refused for what it sends.
            clock.now += 1.0
            again = rpc_error(
                lambda: anonymous.GetRun(broker_pb2.GetRunRequest(run_id=UNKNOWN_RUN_ID))
            )
            assert again.code() is grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.GetSigningKeys(broker_pb2.GetSigningKeysRequest(), timeout=5).keys
    finally:
        server.stop(grace=0.5)


def test_a_principal_over_its_rate_is_resource_exhausted_with_retry_info_then_recovers(
    limited: tuple[BrokerServer, Callers], clock: FakeClock
) -> None:
    _, callers = limited
    stub = callers.stub(standard_accounts()["orchestrator"])
    run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    for _ in range(9):  # the burst of 10, the StartRun included
        stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5)
    error = rpc_error(lambda: stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ci-orchestrator" in (error.details() or "")
    assert retry_delay(error) == pytest.approx(0.2, abs=0.01)  # 5 calls per second
    # Another principal is not held up by this one.
    other = callers.stub(standard_accounts()["root"])
    assert other.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5).run.run_id == run_id
    clock.now += 0.2
    assert stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5).run.run_id == run_id


def test_one_auditor_cannot_hold_every_audit_stream(
    limited: tuple[BrokerServer, Callers],
) -> None:
    server, callers = limited
    callers.stub(standard_accounts()["orchestrator"]).StartRun(start_run_request(), timeout=5)
    auditor = callers.stub(standard_accounts()["auditor"])
    follow = broker_pb2.StreamAuditRequest(filter=broker_pb2.AuditFilter(org="acme"))
    streams = [auditor.StreamAudit(follow, timeout=30) for _ in range(2)]
    eventually(lambda: server.broker.feed.subscribers == 2)
    error = rpc_error(lambda: next(auditor.StreamAudit(follow, timeout=5)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(error) > 0
    root = callers.stub(standard_accounts()["root"])  # another principal still gets a slot
    replay = broker_pb2.StreamAuditRequest(stop_at_head=True)
    assert list(root.StreamAudit(replay, timeout=5))
    streams[0].cancel()
    eventually(lambda: server.broker.feed.subscribers == 1)
    replay_acme = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(org="acme"), stop_at_head=True
    )
    assert list(auditor.StreamAudit(replay_acme, timeout=5))
    streams[1].cancel()


def test_token_audience_metric_labels_are_bounded(tmp_path: Path, clock: FakeClock) -> None:
    sdk = in_memory_sdk("broker")
    settings = make_settings(
        tmp_path / "data", policy=standard_policy(tmp_path), metric_audiences=3
    )
    broker = build_broker(settings, clock=clock, meter_provider=sdk.meter_provider)
    server = create_server(settings, broker=broker)
    server.start()
    try:
        with callers_of(server) as callers:
            stub = callers.stub(standard_accounts()["orchestrator"])
            run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
            for n in range(6):
                request = broker_pb2.IssueTokenRequest(run_id=run_id, audience=f"api-{n}.example")
                stub.IssueToken(request, timeout=5)
        labels = {
            dict(p.attributes)["tokenbroker.token.audience"]
            for p in sdk.points("tokenbroker.tokens.issued")
        }
        assert labels == {"api-0.example", "api-1.example", "api-2.example", "other"}
        assert (
            sdk.total("tokenbroker.tokens.issued", **{"tokenbroker.token.audience": "other"}) == 3
        )
    finally:
        server.stop(grace=0.5)
        sdk.shutdown()


def test_a_request_over_the_message_limit_is_refused_and_the_next_one_served(
    tmp_path: Path, clock: FakeClock
) -> None:
    server = serve(tmp_path, clock, max_request_bytes=64 * 1024)
    try:
        with callers_of(server) as callers:
            stub = callers.stub(standard_accounts()["orchestrator"])
            big = broker_pb2.VerifyTokenRequest(token="x" * 70_000)
            error = rpc_error(lambda: stub.VerifyToken(big, timeout=5))
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            small = broker_pb2.VerifyTokenRequest(token="x" * 1000)
            assert not stub.VerifyToken(small, timeout=5).active
    finally:
        server.stop(grace=0.5)


def worst_case_run(n: int) -> Run:
    """A run with every field at its limit, in characters that take the most bytes."""
    wide = "山"  # three bytes in UTF-8
    keys = [f"{i:02d}{wide * 20}" for i in range(limits.MAX_INPUTS)]  # most entries: most overhead
    room = limits.MAX_INPUTS_BYTES - sum(len(k.encode()) for k in keys)
    inputs = {key: "x" * (room // limits.MAX_INPUTS) for key in keys}
    person = Person(
        subject="s" * limits.SUBJECT.max_chars,
        issuer="https://" + "i" * 200,
        email="e" * 64 + "@" + ("d" * 60 + ".") * 3 + "example",
        display_name=wide * limits.DISPLAY_NAME.max_chars,
        method=VerificationMethod.ASSERTED_BY_CALLER,
        evidence_sha256="0" * 64,
    )
    return Run(
        run_id=f"r-{n:026d}",
        pipeline=PipelineRef("o" * 128, "p" * 128, "q" * 128),
        state=RunState.ENDED,
        create_time=1.0,
        deadline=2.0,
        triggered_via="a" * 128,
        permission_ceiling=PermissionSet.of(
            {f"{'r' * 60}{i:02d}": "admin" for i in range(limits.MAX_PERMISSIONS)}
        ),
        on_behalf_of=person,
        inputs=inputs,
        lease_seconds=60.0,
        lease_expire_time=2.0,
        parent_run_id="r-" + "0" * 26,
        actor_chain=tuple("a" * 128 for _ in range(8)),
        end_time=2.0,
        end_reason=wide * limits.REASON.max_chars,
        ended_by="a" * 128,
    )


def test_a_list_runs_reply_stays_under_4_mib_for_every_page_size_the_api_accepts() -> None:
    runs = [worst_case_run(n) for n in range(limits.MAX_PAGE_SIZE)]
    one = convert.run_pb(runs[0]).ByteSize()
    assert one * limits.MAX_PAGE_SIZE > limits.MAX_REPLY_BYTES  # so the cut is what saves it
    page = convert.runs_within(runs, limits.MAX_PAGE_BYTES)
    reply = broker_pb2.ListRunsResponse(runs=page, next_page_token="x" * 200)
    assert reply.ByteSize() <= limits.MAX_PAGE_BYTES + 1024 < limits.MAX_REPLY_BYTES
    assert len(page) == limits.MAX_PAGE_BYTES // (one + 8)  # as many as fit, no more


def test_list_runs_cuts_a_page_of_large_runs_and_the_next_page_carries_on(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A smaller cut, so that a few runs make a full page: the same code path as 2 MiB.
    monkeypatch.setattr(limits, "MAX_PAGE_BYTES", 64 * 1024)
    server = serve(tmp_path, clock)
    try:
        with callers_of(server) as callers:
            stub = callers.stub(standard_accounts()["orchestrator"])
            started = set()
            for _ in range(30):
                start = start_run_request()
                start.inputs.update({f"k{i}": "x" * 1000 for i in range(7)})
                started.add(stub.StartRun(start, timeout=5).run.run_id)
            seen: list[str] = []
            token = ""
            pages = 0
            while True:
                request = broker_pb2.ListRunsRequest(org="acme", page_size=500, page_token=token)
                reply = stub.ListRuns(request, timeout=5)
                assert reply.ByteSize() <= 64 * 1024 + 1024
                seen += [r.run_id for r in reply.runs]
                pages += 1
                token = reply.next_page_token
                if not token:
                    break
            assert pages > 1
            assert sorted(seen) == sorted(started)
    finally:
        server.stop(grace=0.5)


def test_idempotency_keys_of_long_ended_runs_are_forgotten_by_retention(
    limited: tuple[BrokerServer, Callers], clock: FakeClock
) -> None:
    server, callers = limited
    stub = callers.stub(standard_accounts()["orchestrator"])
    first = stub.StartRun(start_run_request(idempotency_key="deploy-42"), timeout=5).run.run_id
    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=first), timeout=5)
    changed = start_run_request(idempotency_key="deploy-42")
    changed.inputs["other"] = "parameters"
    taken = rpc_error(lambda: stub.StartRun(changed, timeout=5))
    assert taken.code() is grpc.StatusCode.ALREADY_EXISTS
    started = clock.now
    clock.now += server.broker.settings.idempotency_retention_days * 86400 + 3600
    eventually(
        lambda: server.broker.store.find_idempotent_run("ci-orchestrator", "deploy-42") is None
    )
    assert [e.draft.action for e in events_of(server)][-1] == Action.IDEMPOTENCY_FORGOTTEN
    clock.now = started + 1  # back to the time of the callers' assertions (signed in real time)
    assert stub.StartRun(changed, timeout=5).run.run_id != first


def test_repeated_denials_of_one_principal_for_one_reason_are_counted_not_each_written(
    limited: tuple[BrokerServer, Callers], clock: FakeClock
) -> None:
    server, callers = limited
    auditor = callers.stub(standard_accounts()["auditor"])  # may not start runs
    before = len(events_of(server))
    for _ in range(8):
        denied = rpc_error(lambda: auditor.StartRun(start_run_request(), timeout=5))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    assert [e.draft.action for e in events_of(server)[before:]] == [Action.AUTHZ_DENIED]
    clock.now += server.broker.settings.refusal_audit_interval
    server.broker.refusals.flush()
    summary = events_of(server)[-1].draft
    assert summary.action == Action.AUTHZ_DENIED and summary.principal == "siem"
    assert summary.details["repeated"] == 7
