"""How the broker-calling commands fail: exit codes and one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker import errors as domain
from broker.cli.common import (
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    failure,
)
from broker.policy.file import PolicyError
from broker.settings import SettingsError
from tests.cli_support import closed_port, local_broker, run_cli
from tests.support import REPO
from tokenbroker.errors import (
    ConfigurationError,
    DeadlineExceeded,
    PermissionDenied,
    Unavailable,
)

# One invocation of every broker-calling command, needing nothing else to exist.
BROKER_COMMANDS = [
    ["runs", "start", "acme/web/deploy", "--ceiling", "artifacts=write"],
    ["runs", "show", "r-1"],
    ["runs", "list"],
    ["runs", "revoke", "r-1"],
    ["runs", "renew", "r-1"],
    ["token", "issue", "--run", "r-1", "--aud", "api"],
    ["token", "verify", "some-token"],
    ["keys", "list"],
    ["keys", "rotate"],
    ["audit", "tail"],
    ["execute", "--on-behalf-of", "--asserted-email", "a@example.com", "--asserted-subject",
     "u-1", "acme/web/deploy", "--ceiling", "pipelines=read"],
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The data dir of a local broker (its development credentials), which then stopped."""
    directory = tmp_path_factory.mktemp("stopped") / "data"
    with local_broker(directory):
        pass
    yield directory


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_an_unreachable_broker_exits_3_saying_which_address_failed(
    command: list[str],
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKEN_BROKER_DATA_DIR", str(data_dir))
    target = f"127.0.0.1:{closed_port()}"
    result = run_cli(capsys, *command, "--target", target)
    assert result.code == EXIT_UNREACHABLE
    assert result.out == ""
    assert f"cannot reach the broker at {target}: " in result.err


def test_a_token_issued_from_the_environment_reports_the_environments_broker(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("TOKEN_BROKER_TARGET", target)
    monkeypatch.setenv("TOKEN_BROKER_RUN_ID", "r-1")
    monkeypatch.setenv("TOKEN_BROKER_RUN_CREDENTIAL", "a.b.c")
    result = run_cli(capsys, "token", "issue", "--from-env", "--aud", "api", "--timeout", "2")
    assert result.code == EXIT_UNREACHABLE
    assert result.err.startswith(f"token-broker token issue: cannot reach the broker at {target}")


def test_without_credentials_the_command_explains_where_it_looked_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "runs", "list", "--data-dir", str(tmp_path / "none"))
    assert result.code == EXIT_USAGE
    assert "no development admin key in" in result.err and "--policy" in result.err


def test_tls_flags_that_do_not_fit_together_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not used")
    no_key = run_cli(capsys, "keys", "list", "--cert", str(cert))
    assert no_key.code == EXIT_USAGE and "--cert needs --key" in no_key.err
    missing_ca = run_cli(capsys, "keys", "list", "--ca-file", str(tmp_path / "ca.pem"))
    assert missing_ca.code == EXIT_USAGE and "ca.pem" in missing_ca.err
    stray_key = run_cli(capsys, "runs", "list", "--key", str(cert))
    assert stray_key.code == EXIT_USAGE and "--key goes with --account" in stray_key.err


def _unavailable(answered: bool) -> Unavailable:
    class _Failed(grpc.RpcError):
        def initial_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("x-request-id", "c-1"),) if answered else ()

    error = Unavailable("store down", code=grpc.StatusCode.UNAVAILABLE)
    error.__cause__ = _Failed()
    return error


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (CliError("bad flags"), EXIT_USAGE, "bad flags"),
        (ConfigurationError("TOKEN_BROKER_TARGET not set"), EXIT_USAGE, "not set"),
        (_unavailable(answered=False), EXIT_UNREACHABLE, "cannot reach the broker at b:1"),
        (_unavailable(answered=True), EXIT_UNREACHABLE, "the broker at b:1 is unavailable"),
        (DeadlineExceeded("slow"), EXIT_UNREACHABLE, "no answer from the broker at b:1"),
        (PermissionDenied("no", code=grpc.StatusCode.PERMISSION_DENIED), EXIT_FAILED, "no"),
        (FileNotFoundError(2, "No such file or directory", "k.pem"), EXIT_USAGE, "k.pem: No such"),
        (ValueError("Could not deserialize key data"), EXIT_USAGE, "deserialize"),
        (RuntimeError("boom"), EXIT_FAILED, "unexpected error (RuntimeError): boom"),
        (domain.Unavailable("the store refused"), EXIT_FAILED, "the store refused"),
        (SettingsError("--listen must be HOST:PORT"), EXIT_USAGE, "--listen must be HOST:PORT"),
        (
            PolicyError("p.toml", ["accounts.x.roles[0]: unknown role", "version: must be 1"]),
            EXIT_USAGE,
            "p.toml: accounts.x.roles[0]: unknown role\np.toml: version: must be 1",
        ),
    ],
)
def test_each_kind_of_failure_has_its_exit_code_and_message(
    error: Exception, code: int, text: str
) -> None:
    got_code, message = failure(error, "b:1")
    assert got_code == code
    assert text in message


def test_the_installed_command_fails_without_a_traceback_in_a_real_process() -> None:
    target = f"127.0.0.1:{closed_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "broker", "keys", "list", "--target", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_UNREACHABLE
    assert done.stderr.startswith(f"token-broker keys list: cannot reach the broker at {target}")
    assert len(done.stderr.splitlines()) == 1
