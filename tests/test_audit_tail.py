"""`token-broker audit tail`: one readable line per event."""

from __future__ import annotations

import time

import pytest
from google.protobuf import struct_pb2

from broker import cli
from broker.api.server import BrokerServer
from broker.cli_audit import render
from tests.audit_support import orchestrator
from tests.support import start_run_request
from tokenbroker.v1 import types_pb2


def test_an_event_renders_as_time_action_run_caller_person_and_details() -> None:
    details = struct_pb2.Struct()
    details.update(
        {"audience": "api", "permissions": {"artifacts": "read", "pipelines": "execute"}}
    )
    event = types_pb2.AuditEvent(
        sequence=42,
        action="token.issued",
        outcome=types_pb2.AUDIT_OUTCOME_SUCCESS,
        principal="deploy-portal",
        run_id="r-123",
        on_behalf_of=types_pb2.Person(subject="u-1", email="alice@example.com"),
        details=details,
    )
    event.time.FromSeconds(1_700_000_000)
    clock = time.strftime("%H:%M:%S", time.localtime(1_700_000_000))
    assert render(event) == (
        f"{clock} token.issued run r-123 by deploy-portal for alice@example.com aud=api "
        "perms=artifacts:read,pipelines:execute seq=42"
    )
    event.outcome = types_pb2.AUDIT_OUTCOME_DENIED
    event.action = "authz.denied"
    assert render(event).startswith(f"{clock} authz.denied DENIED run r-123 by deploy-portal")


def test_tail_prints_the_events_of_one_run_and_stops_at_the_head(
    server: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with orchestrator(server.target) as stub:
        stub.StartRun(start_run_request(), timeout=5)
        run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    assert cli.main(["audit", "tail", "--target", server.target, "--run", run_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert f" run.started run {run_id} " in lines[0]
    assert "ceiling=artifacts:write,pipelines:execute" in lines[0]
    assert lines[0].endswith(" seq=2")


def test_tail_reports_a_refused_stream_and_a_remote_target_plainly(
    server: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["audit", "tail", "--target", server.target, "--after", "5"]) == 1
    assert "OUT_OF_RANGE: after_sequence 5 is beyond the newest event" in capsys.readouterr().err
    assert cli.main(["audit", "tail", "--target", "10.1.2.3:50051"]) == 2
    assert "only a loopback broker" in capsys.readouterr().err
