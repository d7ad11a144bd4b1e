"""`token-broker audit tail`: one readable line per event."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from broker.api.server import BrokerServer, create_server
from broker.cli import main as cli
from broker.cli.audit import render
from tests.audit_support import orchestrator
from tests.conftest import make_settings
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


@pytest.fixture
def local_broker(tmp_path: Path) -> Iterator[BrokerServer]:
    """A broker started without --policy, as `make run` starts one."""
    running = create_server(make_settings(tmp_path / "data"))
    running.start()
    yield running
    running.stop(grace=0.5)


def tail(server: BrokerServer, *args: str) -> int:
    data_dir = str(server.broker.settings.data_dir)
    return cli.main(["audit", "tail", "--target", server.target, "--data-dir", data_dir, *args])


def test_tail_prints_the_events_of_one_run_and_stops_at_the_head(
    local_broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with orchestrator(local_broker) as stub:
        stub.StartRun(start_run_request(), timeout=5)
        run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    assert tail(local_broker, "--run", run_id) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert f" run.started run {run_id} " in lines[0]
    assert "ceiling=artifacts:write,pipelines:execute" in lines[0]
    assert " by dev-admin " in lines[0]
    assert lines[0].endswith(" seq=4")  # after policy.loaded, key.created, the first run


def test_tail_reports_a_refused_stream_and_a_remote_target_plainly(
    local_broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tail(local_broker, "--after", "50") == 1
    assert "OUT_OF_RANGE: after_sequence 50 is beyond the newest event" in capsys.readouterr().err
    assert cli.main(["audit", "tail", "--target", "10.1.2.3:50051"]) == 2
    assert "only a loopback broker" in capsys.readouterr().err
