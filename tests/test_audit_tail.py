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
from tests.accounts import callers_of, new_account, write_policy
from tests.audit_support import orchestrator
from tests.cli_support import closed_port, point_at, run_cli
from tests.cli_support import local_broker as broker_in_process
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


def test_tail_reports_a_refused_stream_as_one_line_and_exit_1(
    local_broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tail(local_broker, "--after", "50") == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "token-broker audit tail: OUT_OF_RANGE: after_sequence 50 is beyond the newest event"
    )
    assert len(err.splitlines()) == 1


def test_tail_finds_the_broker_through_token_broker_target(
    local_broker: BrokerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(monkeypatch, local_broker)
    result = run_cli(capsys, "audit", "tail")
    assert result.code == 0
    assert [line.split()[1] for line in result.out.splitlines()] == ["policy.loaded", "key.created"]


def test_tail_of_a_broker_that_is_down_exits_3_naming_the_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with broker_in_process(tmp_path / "data") as stopped:
        pass
    monkeypatch.setenv("TOKEN_BROKER_DATA_DIR", str(stopped.broker.settings.data_dir))
    target = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("TOKEN_BROKER_TARGET", target)
    for follow in ([], ["--follow"]):
        result = run_cli(capsys, "audit", "tail", *follow)
        assert result.code == 3
        assert result.err.startswith(
            f"token-broker audit tail: cannot reach the broker at {target}: "
        )


def test_an_auditor_service_account_tails_its_scope_with_account_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    siem = new_account("siem", ["auditor"], ["acme/*/*"])
    ci = new_account("ci", ["orchestrator"], ["acme/*/*", "other/*/*"])
    policy = write_policy(tmp_path / "policy.toml", [siem, ci])
    key = tmp_path / "siem.pem"
    key.write_bytes(siem.private_pem)
    with (
        broker_in_process(tmp_path / "data", policy=policy) as server,
        callers_of(server) as callers,
    ):
        run_id = callers.stub(ci).StartRun(start_run_request(), timeout=5).run.run_id
        sign_in = ["--target", server.target, "--account", "siem", "--key", str(key)]
        mine = run_cli(capsys, "audit", "tail", "--org", "acme", *sign_in)
        assert mine.code == 0, mine.err
        assert [line.split()[1:3] for line in mine.out.splitlines()] == [["run.started", "run"]]
        assert run_id in mine.out
        theirs = run_cli(capsys, "audit", "tail", "--org", "other", *sign_in)
        assert theirs.code == 1
        assert theirs.err.startswith("token-broker audit tail: PERMISSION_DENIED: ")
