"""A delegate in another language: clients/node/delegate.mjs (Node.js, @grpc/grpc-js loading the
.proto files as they are, `jose` for JWKS verification) against a real broker process."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.accounts import bearer, sign_assertion, standard_accounts
from tests.conftest import standard_policy
from tests.support import BrokerProcess, start_broker_process
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"
NODE = shutil.which("node")
ISSUER = "https://broker.test"  # not the HTTP address: the delegate must not confuse the two
AUDIENCE = "https://api.example.com"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NODE is None, reason="node is not installed: no Node.js delegate to run"),
]


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[tuple[BrokerProcess, int]]:
    """A `token-broker serve` with the standard policy; yields it and its HTTP port."""
    policy = standard_policy(tmp_path / "policy")
    process = start_broker_process(tmp_path / "data", ["--policy", str(policy), "--issuer", ISSUER])
    try:
        yield process, _http_port(process)
    finally:
        process.terminate_and_wait()


def _http_port(process: BrokerProcess) -> int:
    for line in process.logs().splitlines():
        if '"token-broker serving"' in line:
            return int(json.loads(line)["http_port"])
    raise AssertionError(f"no serving line in the broker's log:\n{process.logs()}")


def _run_delegate(tmp_path: Path, target: str, http_port: int, *more: str) -> dict[str, object]:
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node/node_modules is missing: `make test` runs `npm ci` there first")
    portal = standard_accounts()["delegator"]  # deploy-portal may assert example.com people
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
    result: dict[str, object] = json.loads(done.stdout)
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
    assert isinstance(verified, dict)
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
