"""Fail closed: when the database refuses writes, nothing happens without its audit event."""

from __future__ import annotations

import grpc

from broker.api.server import BrokerServer
from broker.cli import main as cli
from tests.audit_support import auditor, orchestrator, writes_refused
from tests.support import details, rpc_error, start_run_request
from tokenbroker.v1 import broker_pb2


def test_start_run_fails_unavailable_and_changes_nothing_while_the_database_refuses_writes(
    server: BrokerServer,
) -> None:
    data_dir = server.broker.settings.data_dir
    with orchestrator(server) as stub:
        before = stub.StartRun(start_run_request(), timeout=5).run
        head = server.broker.store.head_sequence()
        with writes_refused(data_dir):
            error = rpc_error(lambda: stub.StartRun(start_run_request(), timeout=5))
            assert error.code() is grpc.StatusCode.UNAVAILABLE
            assert "nothing was changed" in details(error)
            issue = broker_pb2.IssueTokenRequest(run_id=before.run_id, audience="api")
            error = rpc_error(lambda: stub.IssueToken(issue, timeout=5))
            assert error.code() is grpc.StatusCode.UNAVAILABLE  # and so no token came back
            assert "nothing was issued" in details(error)
            runs = stub.ListRuns(broker_pb2.ListRunsRequest(org="acme"), timeout=5).runs
            assert [r.run_id for r in runs] == [before.run_id]
            assert server.broker.store.head_sequence() == head
        after = stub.StartRun(start_run_request(), timeout=5).run  # writes work again
        runs = stub.ListRuns(broker_pb2.ListRunsRequest(org="acme"), timeout=5).runs
        assert [r.run_id for r in runs] == [after.run_id, before.run_id]
    with auditor(server) as stub:
        request = broker_pb2.StreamAuditRequest(stop_at_head=True)
        events = [item.event for item in stub.StreamAudit(request, timeout=5)]
    started = [(e.sequence, e.run_id) for e in events if e.action == "run.started"]
    assert started == [(head, before.run_id), (head + 1, after.run_id)]
    assert cli.main(["audit", "verify", "--data-dir", str(data_dir)]) == 0
