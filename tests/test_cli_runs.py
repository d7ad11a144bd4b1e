"""`token-broker runs …` against a live broker started without a policy (as `make run`)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from broker.api.server import BrokerServer
from tests.cli_support import Result, run_cli
from tests.support import UNKNOWN_RUN_ID


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], broker: BrokerServer) -> CliRunner:
    return CliRunner(capsys)


class CliRunner:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *args: str) -> Result:
        return run_cli(self.capsys, *args)

    def start(self, *more: str) -> str:
        result = self(
            "runs", "start", "acme/web/deploy", "--ceiling", "artifacts=write", "--json", *more
        )
        assert result.code == 0, result.err
        return str(result.json()["run"]["run_id"])


def test_runs_start_prints_the_run_and_its_credential_readably(cli: CliRunner) -> None:
    result = cli(
        "runs",
        "start",
        "acme/web/deploy",
        "--ceiling",
        "artifacts=write",
        "--ceiling",
        "pipelines=read",
        "--deadline",
        "1h",
        "--lease",
        "5m",
        "--input",
        "ref=main",
    )
    assert result.code == 0
    lines = result.out.splitlines()
    assert re.fullmatch(r"Run r-\w+", lines[0])
    assert lines[1] == "Executed by: dev-admin"
    assert "state:       active" in lines
    assert "pipeline:    acme/web/deploy" in lines
    assert "ceiling:     artifacts:write, pipelines:read" in lines
    assert any(re.fullmatch(r"deadline: +\S+ \S+Z \(in (59m|1h)\)", line) for line in lines)
    assert any(line.startswith("lease:       5m, lapses ") for line in lines)
    assert "inputs:      ref=main" in lines
    assert re.search(r"^run credential: +eyJ[\w-]+\.[\w-]+\.[\w-]+$", result.out, re.MULTILINE)


def test_runs_start_as_json_carries_the_run_and_credential_under_stable_keys(
    cli: CliRunner,
) -> None:
    result = cli(
        "runs",
        "start",
        "acme/web/deploy",
        "--ceiling",
        "artifacts=write",
        "--idempotency-key",
        "build-7",
        "--json",
    )
    started = result.json()
    assert set(started) == {"run", "run_credential", "run_credential_expire_time"}
    run = started["run"]
    assert run["state"] == "active"
    assert run["pipeline"] == "acme/web/deploy"
    assert run["permission_ceiling"] == {"artifacts": "write"}
    assert run["triggered_via"] == "dev-admin"
    assert run["on_behalf_of"] is None and run["end_time"] is None
    again = cli(
        "runs",
        "start",
        "acme/web/deploy",
        "--ceiling",
        "artifacts=write",
        "--idempotency-key",
        "build-7",
        "--json",
    )
    assert again.json()["run"]["run_id"] == run["run_id"]


def test_runs_start_sends_immutable_ids_and_environment_which_show_prints(
    cli: CliRunner,
) -> None:
    run_id = cli.start("--org-id", "91824", "--pipeline-id", "77", "--environment", "production")
    shown = cli("runs", "show", run_id, "--json").json()
    assert shown["pipeline_ids"] == {"org_id": "91824", "pipeline_id": "77"}
    assert shown["environment"] == "production"
    readable = cli("runs", "show", run_id).out.splitlines()
    assert "ids:         org_id=91824, pipeline_id=77" in readable
    assert "environment: production" in readable
    refused = cli(
        "runs", "start", "acme/web/deploy", "--ceiling", "artifacts=read", "--org-id", "a b"
    )
    assert refused.code != 0 and "pipeline_ids.org_id" in refused.err


def test_runs_start_with_env_prints_export_lines_for_a_step(
    cli: CliRunner, broker: BrokerServer
) -> None:
    result = cli("runs", "start", "acme/web/deploy", "--ceiling", "artifacts=write", "--env")
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.out.splitlines())
    assert exports["TOKEN_BROKER_TARGET"] == broker.target
    assert exports["TOKEN_BROKER_RUN_ID"].startswith("r-")
    assert exports["TOKEN_BROKER_RUN_CREDENTIAL"].startswith("eyJ")


def test_runs_show_prints_attribution_state_pipeline_ceiling_deadline_and_actor_chain(
    cli: CliRunner,
) -> None:
    run_id = cli.start("--deadline", "2h")
    result = cli("runs", "show", run_id)
    assert result.code == 0
    assert result.out.splitlines()[:2] == [f"Run {run_id}", "Executed by: dev-admin"]
    for label in ("state", "pipeline", "ceiling", "created", "deadline", "actor chain"):
        assert re.search(rf"^{label}: ", result.out, re.MULTILINE), label
    shown = cli("runs", "show", run_id, "--json").json()
    assert shown["run_id"] == run_id
    assert shown["attribution"] == "Executed by: dev-admin"
    assert shown["actor_chain"] == [] and shown["deadline"].endswith("Z")


def test_runs_list_is_tab_separated_when_piped_and_json_on_request(cli: CliRunner) -> None:
    first, second = cli.start(), cli.start()
    cli("runs", "revoke", first)
    rows = [line.split("\t") for line in cli("runs", "list").out.splitlines()]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (second, "active", "acme/web/deploy"),
        (first, "ended", "acme/web/deploy"),
    ]
    active = cli("runs", "list", "--state", "active", "--json").json()
    assert [run["run_id"] for run in active["runs"]] == [second]
    assert len(cli("runs", "list", "--limit", "1", "--json").json()["runs"]) == 1
    assert cli("runs", "list", "--org", "other", "--json").json() == {"runs": []}


def test_runs_list_on_a_terminal_is_an_aligned_table_coloured_unless_no_color(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.start()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = cli("runs", "list").out
    assert coloured.startswith("\x1b[1mRUN ")
    assert "\x1b[32mactive\x1b[0m" in coloured
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("NO_COLOR", "1")
    plain = cli("runs", "list").out
    assert "\x1b[" not in plain
    header, row = plain.splitlines()
    assert header.split() == [
        "RUN",
        "STATE",
        "PIPELINE",
        "EXECUTED",
        "BY",
        "TRIGGERED",
        "VIA",
        "CREATED",
    ]
    assert row.index("active") == header.index("STATE")


def test_runs_revoke_ends_the_run_and_a_second_revoke_says_it_already_ended(
    cli: CliRunner,
) -> None:
    run_id = cli.start()
    first = cli("runs", "revoke", run_id, "--reason", "pipeline finished")
    assert (first.code, first.out) == (0, f"run {run_id} ended: its tokens no longer verify\n")
    second = cli("runs", "revoke", run_id, "--json").json()
    assert second["already_ended"] is True
    assert second["run"]["state"] == "ended"
    assert second["run"]["end_reason"] == "pipeline finished"
    assert second["run"]["ended_by"] == "dev-admin"
    shown = cli("runs", "show", run_id).out
    assert re.search(r"^ended: .* by dev-admin: pipeline finished$", shown, re.MULTILINE)


def test_runs_renew_extends_a_lease_and_refuses_a_run_without_one(cli: CliRunner) -> None:
    leased = cli.start("--lease", "2m")
    renewed = cli("runs", "renew", leased)
    assert renewed.code == 0
    assert renewed.out.startswith(f"run {leased} renewed: lease lapses ")
    as_json = cli("runs", "renew", leased, "--json").json()
    assert as_json["run"]["lease_seconds"] == 120
    unleased = cli("runs", "renew", cli.start())
    assert unleased.code == 1
    assert "FAILED_PRECONDITION" in unleased.err and "without a lease" in unleased.err


def test_runs_show_of_an_unknown_run_fails_with_exit_1_and_one_line(cli: CliRunner) -> None:
    result = cli("runs", "show", UNKNOWN_RUN_ID)
    assert result.code == 1
    assert result.err.startswith("token-broker runs show: NOT_FOUND: ")
    assert result.out == ""


def test_a_run_command_needs_a_run_id_or_from_env(cli: CliRunner) -> None:
    result = cli("runs", "revoke")
    assert result.code == 2
    assert "give a RUN_ID, or --from-env" in result.err


def test_audit_tail_prints_json_lines_on_request(cli: CliRunner, broker: BrokerServer) -> None:
    run_id = cli.start()
    data_dir = str(broker.broker.settings.data_dir)
    result = cli(
        "audit",
        "tail",
        "--run",
        run_id,
        "--json",
        "--target",
        broker.target,
        "--data-dir",
        data_dir,
    )
    assert result.code == 0
    [event] = [json.loads(line) for line in result.out.splitlines()]
    assert (event["action"], event["run_id"], event["principal"]) == (
        "run.started",
        run_id,
        "dev-admin",
    )
