"""A delegate in another language: clients/node/delegate.mjs (Node.js, @grpc/grpc-js loading the
.proto files as they are, `jose` for JWKS verification) against a real broker process."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.accounts import (
    Account,
    bearer,
    new_account,
    sign_assertion,
    standard_accounts,
    write_policy,
)
from tests.conftest import standard_policy
from tests.support import BrokerProcess, start_broker_process
from tokenbroker.samples.idp import TestIdentityProvider
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"
NODE = shutil.which("node")
ISSUER = "https://broker.test"  # not the HTTP address: the delegate must not confuse the two
AUDIENCE = "https://api.example.com"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NODE is None, reason="node is not installed: no Node.js delegate to run"),
]


@contextmanager
def _serving(tmp_path: Path, policy: Path) -> Iterator[tuple[BrokerProcess, int]]:
    """A `token-broker serve` process with `policy`; yields it and its HTTP port."""
    process = start_broker_process(tmp_path / "data", ["--policy", str(policy), "--issuer", ISSUER])
    try:
        yield process, _http_port(process)
    finally:
        process.terminate_and_wait()


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[tuple[BrokerProcess, int]]:
    """With the standard policy: deploy-portal may assert example.com people itself."""
    with _serving(tmp_path, standard_policy(tmp_path / "policy")) as serving:
        yield serving


def _http_port(process: BrokerProcess) -> int:
    for line in process.logs().splitlines():
        if '"token-broker serving"' in line:
            return int(json.loads(line)["http_port"])
    raise AssertionError(f"no serving line in the broker's log:\n{process.logs()}")


def _run_delegate(
    tmp_path: Path, target: str, http_port: int, *more: str, portal: Account | None = None
) -> dict[str, Any]:
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node/node_modules is missing: `make test` runs `npm ci` there first")
    portal = portal or standard_accounts()["delegator"]
    key = tmp_path / "deploy-portal.pem"
    key.write_bytes(portal.private_pem)
    assert NODE is not None
    done = subprocess.run(
        [
            NODE,
            str(NODE_CLIENT / "delegate.mjs"),
            *("--target", target, "--http", f"http://127.0.0.1:{http_port}"),
            *("--account", portal.name, "--key", str(key), "--kid", portal.kid),
            *("--pipeline", "acme/payments/deploy", "--audience", AUDIENCE),
            *more,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, f"delegate failed:\n{done.stderr}\n{done.stdout}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_node_delegate_starts_a_run_mints_a_step_token_and_verifies_it_with_the_http_jwks(
    tmp_path: Path, broker_process: tuple[BrokerProcess, int]
) -> None:
    process, http_port = broker_process
    out = _run_delegate(
        tmp_path,
        process.target,
        http_port,
        *("--subject", "alice", "--email", "alice@example.com"),
    )

    verified = out["verified"]
    assert verified["iss"] == ISSUER
    assert verified["aud"] == AUDIENCE
    assert verified["run_id"] == out["run_id"]
    assert verified["on_behalf_of"]["email"] == "alice@example.com"
    assert verified["act"] == {"sub": "deploy-portal"}
    assert verified["permissions"] == {"artifacts": "read"}
    assert out["attribution"] == (
        "Executed by: alice@example.com (asserted by deploy-portal, not verified) · "
        "Triggered via: deploy-portal"
    )
    assert out["ended"] is True

    # The broker agrees: the run was the delegate's, for alice, and has ended.
    siem = standard_accounts()["auditor"]
    with grpc.insecure_channel(process.target) as channel:
        stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
        run = stub.GetRun(
            broker_pb2.GetRunRequest(run_id=str(out["run_id"])),
            metadata=bearer(sign_assertion(siem, ISSUER)),
            timeout=5,
        ).run
    assert run.triggered_via == "deploy-portal"
    assert run.on_behalf_of.email == "alice@example.com"
    assert run.state == types_pb2.RUN_STATE_ENDED


def test_node_delegate_reports_a_refusal_and_exits_non_zero(
    tmp_path: Path, broker_process: tuple[BrokerProcess, int]
) -> None:
    process, http_port = broker_process
    with pytest.raises(AssertionError) as failed:
        # deploy-portal's scope is acme/*/*: globex is refused, and the delegate says so.
        _run_delegate(
            tmp_path,
            process.target,
            http_port,
            *("--subject", "alice", "--email", "alice@example.com"),
            *("--pipeline", "globex/web/deploy"),
        )
    assert "delegate: ExecuteOnBehalfOf: PERMISSION_DENIED" in str(failed.value)


def test_node_delegate_acts_for_a_person_its_identity_provider_verified(tmp_path: Path) -> None:
    idp = TestIdentityProvider("https://idp.example.com")
    jwks = idp.write_jwks(tmp_path / "idp-jwks.json")
    delegation = f"""\
[accounts.deploy-portal.delegation]
user_domains = ["example.com"]

[[accounts.deploy-portal.delegation.identity_providers]]
issuer = "{idp.issuer}"
audience = "deploy-portal"
jwks_file = "{jwks}"
"""
    portal = new_account("deploy-portal", ["delegator"], extra_toml=delegation)
    policy = write_policy(tmp_path / "policy.toml", [portal])
    id_token = idp.id_token(subject="u-bob", email="bob@example.com", audience="deploy-portal")
    with _serving(tmp_path, policy) as (process, http_port):
        out = _run_delegate(
            tmp_path, process.target, http_port, "--id-token", id_token, portal=portal
        )
    assert out["attribution"] == (
        "Executed by: bob@example.com (verified by https://idp.example.com) · "
        "Triggered via: deploy-portal"
    )
    assert out["verified"]["on_behalf_of"]["email"] == "bob@example.com"
    assert out["verified"]["run_id"] == out["run_id"]
