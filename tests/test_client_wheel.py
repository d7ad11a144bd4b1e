"""The client is a distribution of its own: its wheel installs into an empty virtualenv, without
the server or OpenTelemetry, and verifies a real broker's tokens offline there — with keys from
the HTTP JWKS, and with `TokenVerifier.for_broker` as a verifier account.

The virtualenv's dependencies (grpcio, protobuf, googleapis-common-protos, PyJWT, cryptography)
come from the package index through pip, pinned to the versions of the development virtualenv
so that pip's cache usually serves them: the test needs the same network access as
`make install`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from tests.accounts import Stub, callers_of, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.support import start_run_request
from tokenbroker.v1 import broker_pb2

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
# What tokenbroker-client requires, and what those require in turn.
PINNED = (
    "grpcio",
    "typing-extensions",
    "protobuf",
    "googleapis-common-protos",
    "pyjwt",
    "cryptography",
    "cffi",
    "pycparser",
)
AUDIENCE = "https://api.example.com"

# Runs inside the empty virtualenv: argv[1] is a JSON object of what to check.
VERIFY_SCRIPT = r"""
import importlib.util, json, sys
given = json.loads(sys.argv[1])
from tokenbroker.verifier import JwksCache, TokenRejected, TokenVerifier, jwks_from_url
verifier = TokenVerifier(
    issuer=given["issuer"],
    audience=given["audience"],
    keys=JwksCache(jwks_from_url(given["jwks_url"])),
)
claims = verifier.verify(given["token"])
forged = given["token"][:-4] + ("AAAA" if not given["token"].endswith("AAAA") else "BBBB")
try:
    verifier.verify(forged)
    forged_status = "accepted"
except TokenRejected as rejected:
    forged_status = rejected.status.name
from tokenbroker import TokenVerifier, assertion_credentials
account = given["account"]
credentials = assertion_credentials(
    account["name"], open(account["key_file"], "rb").read(), account["audience"],
    key_id=account["kid"],
)
with TokenVerifier.for_broker(
    given["target"], credentials, audience=given["audience"], org="acme"
) as in_one_call:
    same_run = in_one_call.verify(given["token"])["run_id"] == claims["run_id"]
    ended = in_one_call.check(given["ended_token"]).status.name
try:
    import tokenbroker.tracing
    tracing = "importable"
except ImportError as error:
    tracing = str(error)
print(json.dumps({
    "run_id": claims["run_id"],
    "forged": forged_status,
    "for_broker": {"same_run": same_run, "ended": ended},
    "broker_installed": importlib.util.find_spec("broker") is not None,
    "tracing": tracing,
    "tokenbroker_file": __import__("tokenbroker").__file__,
}))
"""


@pytest.fixture
def broker_with_http(tmp_path: Path) -> Iterator[BrokerServer]:
    """A broker whose HTTP port publishes the JWKS (the issuer is that port's URL)."""
    settings = make_settings(
        tmp_path / "data", policy=standard_policy(tmp_path), http_listen="127.0.0.1:0"
    )
    running = create_server(settings, broker=build_broker(settings))
    running.start()
    yield running
    running.stop(grace=0.5)


def _run(*args: str | Path, timeout: float = 240) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _client_wheel(tmp_path: Path) -> Path:
    """Build from a copy, so that no build directory lands in the checkout."""
    source = tmp_path / "src"
    shutil.copytree(
        CLIENTS,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    wheels = tmp_path / "wheels"
    pip = (sys.executable, "-m", "pip", "--quiet")
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source)
    (wheel,) = wheels.glob("tokenbroker_client-*.whl")
    return wheel


def _empty_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new virtualenv holding only the client wheel and what it requires. Not even pip:
    this process's pip installs into it (`--python`), which spares the slow ensurepip."""
    home = tmp_path / "venv"
    venv.create(home, with_pip=False, symlinks=True)
    python = home / "bin" / "python"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{n}=={metadata.version(n)}\n" for n in PINNED))
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile")
    _run(*pip, "-c", constraints, wheel)
    return python


def _issue(stub: Stub) -> tuple[str, str]:
    run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
    issued = stub.IssueToken(
        broker_pb2.IssueTokenRequest(run_id=run_id, audience=AUDIENCE), timeout=5
    )
    return run_id, issued.token


@pytest.mark.slow
def test_client_wheel_installs_alone_and_verifies_a_broker_token_offline(
    tmp_path: Path, broker_with_http: BrokerServer
) -> None:
    python = _empty_venv(tmp_path, _client_wheel(tmp_path))
    orchestrator, orders_api = standard_accounts()["orchestrator"], standard_accounts()["verifier"]
    with callers_of(broker_with_http) as callers:
        stub = callers.stub(orchestrator)
        ended_run, ended_token = _issue(stub)
        stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=ended_run), timeout=5)
        run_id, token = _issue(stub)
        assertion_audience = callers.audience
    key_file = tmp_path / "orders-api.pem"
    key_file.write_bytes(orders_api.private_pem)
    assert broker_with_http.http is not None
    given = {
        "issuer": broker_with_http.broker.tokens.issuer,
        "jwks_url": f"http://127.0.0.1:{broker_with_http.http.port}/.well-known/jwks.json",
        "audience": AUDIENCE,
        "token": token,
        "ended_token": ended_token,
        "target": broker_with_http.target,
        "account": {
            "name": orders_api.name,
            "kid": orders_api.kid,
            "key_file": str(key_file),
            "audience": assertion_audience,
        },
    }

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(python), "-c", VERIFY_SCRIPT, json.dumps(given)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the checkout: nothing importable from the working directory
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["run_id"] == run_id
    assert seen["forged"] == "BAD_SIGNATURE"
    assert seen["for_broker"] == {"same_run": True, "ended": "RUN_ENDED"}
    assert seen["broker_installed"] is False
    assert "pip install 'tokenbroker-client[tracing]'" in seen["tracing"]
    assert seen["tokenbroker_file"].startswith(str(tmp_path / "venv"))
