"""How `token-broker` fails, walked in real processes against real brokers: every expected
failure is one clear line on stderr (an invalid policy: one line per problem) and a
documented exit code, never a Python traceback — and a closed pipe ends a command quietly.

Exit codes (README "Command line"): 1 failed or refused, 2 usage or configuration,
3 broker unreachable, 141 the output's reader went away.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from tests.cli_support import closed_port
from tests.conftest import make_settings
from tests.support import REPO, FakeClock
from tokenbroker import BrokerClient

pytestmark = pytest.mark.slow

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BROKEN_PIPE = 1, 2, 3, 141


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def token_broker(
    cwd: Path, *args: str, env: dict[str, str] | None = None, stdout: int | None = None
) -> Ran:
    """`token-broker ARGS` as a separate process, in `cwd` (so no ./var of the repository
    is found by accident). `stdout`: a file descriptor to write to instead of a pipe."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    done = subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )
    ran = Ran(done.returncode, done.stdout or "", done.stderr)
    assert "Traceback" not in ran.err, ran.err
    assert "Exception ignored" not in ran.err, ran.err
    return ran


def one_line(ran: Ran, command: str) -> str:
    """The single line a failed command printed, without its `token-broker COMMAND: `."""
    assert len(ran.err_lines) == 1, ran.err
    prefix = f"token-broker {command}: "
    assert ran.err.startswith(prefix), ran.err
    return ran.err_lines[0].removeprefix(prefix)


def closed_pipe() -> int:
    """The writing end of a pipe whose reader has already gone (`| head -1` that finished)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


README_JWK_ACCOUNT = """\
version = 1

[accounts.siem]
roles = ["auditor"]
scopes = ["acme/*/*"]
keys = [{ jwk = { kty = "EC", crv = "P-256", x = "…", y = "…", kid = "siem-1" } }]

[accounts.ops]
roles = ["admn"]
certificate_sans = ["ops-console.acme.example"]
"""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[BrokerServer, FakeClock]]:
    """A broker as `make run` starts one (development admin in its data dir), on a clock the
    test moves: real time at first, so that the CLI's real-time assertions are accepted."""
    settings = make_settings(tmp_path / "data")
    clock = FakeClock(time.time())
    server = create_server(settings, broker=build_broker(settings, clock=clock))
    server.start()
    yield server, clock
    server.stop(grace=0.5)


def test_an_invalid_policy_names_every_problem_by_file_and_key_and_serve_writes_nothing(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(README_JWK_ACCOUNT)
    problems = [
        f"{policy}: accounts.siem.keys[0].jwk: is not a usable JWK "
        "(Coords should be 32 bytes for curve P-256)",
        f"{policy}: accounts.ops.roles[0]: unknown role 'admn' "
        "(known: orchestrator, delegator, auditor, verifier, admin)",
    ]
    checked = token_broker(tmp_path, "policy", "check", str(policy))
    assert checked.code == EXIT_USAGE
    assert checked.out.splitlines() == [*problems, "2 problems: not a valid policy"]
    data = tmp_path / "data"
    served = token_broker(tmp_path, "serve", "--policy", str(policy), "--data-dir", str(data))
    assert served.code == EXIT_USAGE
    assert served.err_lines == [f"token-broker serve: {problem}" for problem in problems]
    assert not data.exists()


@pytest.mark.parametrize("flag", ["--listen", "--http-listen"])
def test_serve_on_a_taken_port_says_which_address_and_writes_nothing(
    tmp_path: Path, flag: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        addresses = {"--listen": "127.0.0.1:0", "--http-listen": "127.0.0.1:0", flag: address}
        data = tmp_path / "data"
        served = token_broker(
            tmp_path,
            "serve",
            "--data-dir",
            str(data),
            *(part for pair in addresses.items() for part in pair),
        )
    assert served.code == EXIT_FAILED
    assert (
        one_line(served, "serve") == f"cannot listen on {address} ({flag}): address already in use"
    )
    assert not data.exists(), "no development policy, keys or audit checkpoint"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--signing-key", "garbage.pem"],
            "--signing-key garbage.pem: not an unencrypted PEM private key (EC P-256 or RSA)",
        ),
        (["--tls-cert", "cert.pem", "--tls-key", "missing.pem"], "missing.pem: No such file"),
        (["--listen", "127.0.0.1"], "--listen must be HOST:PORT (e.g. 127.0.0.1:50051)"),
    ],
    ids=["signing key", "tls file", "address"],
)
def test_serve_with_an_unusable_setting_exits_2_naming_it_and_writes_nothing(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    (tmp_path / "garbage.pem").write_text("not a key")
    (tmp_path / "cert.pem").write_text("not read: its key is missing")
    data = tmp_path / "data"
    served = token_broker(tmp_path, "serve", "--data-dir", str(data), "--http-listen", "", *flags)
    assert served.code == EXIT_USAGE
    assert one_line(served, "serve").startswith(message)
    assert not data.exists()


@pytest.mark.parametrize(
    "command",
    [["audit", "tail"], ["audit", "tail", "--follow"], ["runs", "list"]],
    ids=" ".join,
)
def test_a_broker_that_is_down_is_exit_3_naming_the_address_from_token_broker_target(
    tmp_path: Path, broker: tuple[BrokerServer, FakeClock], command: list[str]
) -> None:
    target = f"127.0.0.1:{closed_port()}"
    data_dir = str(broker[0].broker.settings.data_dir)  # credentials of a real broker
    env = {"TOKEN_BROKER_TARGET": target, "TOKEN_BROKER_DATA_DIR": data_dir}
    ran = token_broker(tmp_path, *command, "--timeout", "3", env=env)
    assert ran.code == EXIT_UNREACHABLE
    assert one_line(ran, " ".join(command[:2])).startswith(f"cannot reach the broker at {target}: ")


def test_an_expired_run_credential_is_refused_in_one_line_with_exit_1(
    tmp_path: Path, broker: tuple[BrokerServer, FakeClock]
) -> None:
    server, clock = broker
    with BrokerClient.local(server.target, server.broker.settings.data_dir) as client:
        started = client.start_run("acme", "web", "deploy", ceiling={"api": "read"}, deadline=600)
    # Past the run's deadline; its credential (exp = the deadline) is within the 30 s
    # leeway still, so the refusal names the run. (Later it would be the credential's expiry.)
    clock.now += 610
    env = {
        "TOKEN_BROKER_TARGET": server.target,
        "TOKEN_BROKER_RUN_ID": started.run.run_id,
        "TOKEN_BROKER_RUN_CREDENTIAL": started.run_credential,
    }
    issued = token_broker(tmp_path, "token", "issue", "--from-env", "--aud", "api", env=env)
    assert issued.code == EXIT_FAILED
    assert issued.out == ""
    line = one_line(issued, "token issue")
    assert line.startswith("UNAUTHENTICATED: run credential rejected: run expired (request id ")


def test_a_corrupt_store_stops_serve_and_audit_verify_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broker.db").write_bytes(b"not a database, just garbage " * 200)
    served = token_broker(
        tmp_path, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0", "--http-listen", ""
    )
    assert served.code != 0
    # Log records are JSON; what the person reads is one line of its own.
    plain = [line for line in served.err_lines if not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("token-broker serve: "), served.err
    assert all(json.loads(line) for line in served.err_lines if line.startswith("{"))
    verified = token_broker(tmp_path, "audit", "verify", "--data-dir", str(data))
    assert verified.code == EXIT_USAGE
    assert one_line(verified, "audit verify")


@pytest.mark.parametrize(
    "command",
    [
        ["audit", "tail"],
        ["audit", "tail", "--follow"],
        ["audit", "tail", "--follow", "--after", "HEAD"],  # waits for an event that never comes
        ["keys", "list"],
        ["runs", "list"],
        ["--help"],
        ["audit", "export"],
    ],
    ids=" ".join,
)
def test_a_closed_pipe_ends_every_command_quietly_with_141(
    tmp_path: Path, broker: tuple[BrokerServer, FakeClock], command: Sequence[str]
) -> None:
    server = broker[0]
    data_dir = str(server.broker.settings.data_dir)
    with BrokerClient.local(server.target, data_dir) as client:  # something to list
        client.start_run("acme", "web", "deploy", ceiling={"api": "read"}, deadline=600)
    env = {"TOKEN_BROKER_TARGET": server.target, "TOKEN_BROKER_DATA_DIR": data_dir}
    head = str(server.broker.store.head_sequence())
    command = [head if word == "HEAD" else word for word in command]
    write_end = closed_pipe()
    try:
        ran = token_broker(tmp_path, *command, env=env, stdout=write_end)
    finally:
        os.close(write_end)
    assert (ran.code, ran.err) == (EXIT_BROKEN_PIPE, "")
