"""`token-broker token issue | verify` against a live broker started without a policy."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import jwt
import pytest

from broker.api.server import BrokerServer
from tests.cli_support import Result, run_cli
from tests.support import REPO


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    return run_cli(capsys, *args)


def start(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """A run's step environment, as `runs start --env` prints it."""
    result = cli(
        capsys,
        "runs",
        "start",
        "acme/web/deploy",
        "--ceiling",
        "pipelines=read",
        "--ceiling",
        "artifacts=write",
        "--env",
    )
    assert result.code == 0, result.err
    pairs = (line.removeprefix("export ").split("=", 1) for line in result.out.splitlines())
    return {name: value for name, value in pairs}


def in_step(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Be a pipeline step: only the run's variables, and no admin key anywhere."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKEN_BROKER_DATA_DIR", "/nonexistent")


def test_a_step_gets_its_token_from_the_environment_and_only_the_token_is_printed(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = start(capsys)
    in_step(monkeypatch, env)
    result = cli(
        capsys,
        "token",
        "issue",
        "--from-env",
        "--aud",
        "api.example.com",
        "--perm",
        "pipelines=read",
        "--step",
        "build",
    )
    assert result.code == 0 and result.err == ""
    token = result.out.removesuffix("\n")
    assert "\n" not in token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["run_id"] == env["TOKEN_BROKER_RUN_ID"]
    assert (claims["aud"], claims["step"]) == ("api.example.com", "build")
    assert claims["permissions"] == {"pipelines": "read"}


def test_token_issue_from_env_works_inside_shell_command_substitution(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    env = start(capsys)
    script = (
        'TOKEN="$(token-broker token issue --from-env --aud api --perm pipelines=read)" && '
        'test -n "$TOKEN" && echo "$TOKEN" | token-broker token verify - --aud api'
    )
    bin_dir = str(Path(sys.executable).parent)
    step_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        **env,
        "TOKEN_BROKER_DATA_DIR": str(broker.broker.settings.data_dir),
    }
    done = subprocess.run(
        ["sh", "-c", script], env=step_env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("active:")


def test_an_orchestrator_issues_for_a_named_run_and_json_has_the_details(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = start(capsys)["TOKEN_BROKER_RUN_ID"]
    result = cli(
        capsys,
        "token",
        "issue",
        "--run",
        run_id,
        "--aud",
        "artifacts.example.com",
        "--perm",
        "artifacts=write",
        "--ttl",
        "5m",
        "--json",
    )
    issued = result.json()
    assert set(issued) == {
        "token",
        "token_id",
        "run_id",
        "audience",
        "expire_time",
        "permissions",
        "key_id",
    }
    assert (issued["run_id"], issued["audience"]) == (run_id, "artifacts.example.com")
    assert issued["permissions"] == {"artifacts": "write"}
    expires = datetime.fromisoformat(issued["expire_time"]).timestamp()
    assert time.time() < expires <= time.time() + 300
    assert jwt.get_unverified_header(issued["token"])["kid"] == issued["key_id"]


def test_a_token_wider_than_the_ceiling_is_refused_naming_the_permission(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = start(capsys)["TOKEN_BROKER_RUN_ID"]
    result = cli(
        capsys, "token", "issue", "--run", run_id, "--aud", "api", "--perm", "secrets=read"
    )
    assert result.code == 1 and result.out == ""
    assert "PERMISSION_DENIED" in result.err and "secrets: read" in result.err
    too_long = cli(capsys, "token", "issue", "--run", run_id, "--aud", "api", "--ttl", "2h")
    assert too_long.code == 1
    assert "INVALID_ARGUMENT" in too_long.err and "ttl" in too_long.err


def test_token_issue_without_a_run_is_a_usage_error(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_run = cli(capsys, "token", "issue", "--aud", "api")
    assert no_run.code == 2 and "give --run RUN_ID" in no_run.err
    monkeypatch.delenv("TOKEN_BROKER_RUN_CREDENTIAL", raising=False)
    no_env = cli(capsys, "token", "issue", "--from-env", "--aud", "api")
    assert no_env.code == 2
    assert "TOKEN_BROKER_RUN_CREDENTIAL not set" in no_env.err


def test_token_verify_exits_0_for_an_active_token_and_1_with_the_reason_otherwise(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = start(capsys)["TOKEN_BROKER_RUN_ID"]
    token = cli(capsys, "token", "issue", "--run", run_id, "--aud", "api").out.strip()
    active = cli(capsys, "token", "verify", token, "--aud", "api")
    assert active.code == 0
    assert "active:        yes" in active.out.splitlines()
    assert f"run:           {run_id}" in active.out.splitlines()
    wrong_audience = cli(capsys, "token", "verify", token, "--aud", "billing", "--json")
    assert wrong_audience.code == 1
    verdict = wrong_audience.json()
    assert (verdict["active"], verdict["status"]) == (False, "wrong_audience")
    assert cli(capsys, "runs", "revoke", run_id).code == 0
    ended = cli(capsys, "token", "verify", token)
    assert ended.code == 1
    assert re.search(r"^reason: +run ended$", ended.out, re.MULTILINE)


def test_token_verify_reads_the_token_from_stdin_and_reports_claims_as_json(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = start(capsys)["TOKEN_BROKER_RUN_ID"]
    token = cli(capsys, "token", "issue", "--run", run_id, "--aud", "api").out
    monkeypatch.setattr(sys, "stdin", io.StringIO(token))
    verdict = cli(capsys, "token", "verify", "-", "--json").json()
    assert (verdict["active"], verdict["status"]) == (True, "active")
    assert verdict["run_id"] == run_id
    assert verdict["claims"]["aud"] == "api"
    assert isinstance(verdict["claims"]["exp"], int)
    garbage = cli(capsys, "token", "verify", "not-a-token", "--json")
    assert garbage.code == 1 and garbage.json()["status"] == "malformed"
