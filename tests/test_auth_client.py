"""The client library signs and refreshes assertions so callers never craft metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from broker.api.server import create_server
from broker.cli import main as cli
from broker.policy import dev
from tests.accounts import Account, bearer, callers_of, policy_toml, private_pem
from tests.conftest import make_settings
from tests.support import FakeClock, start_run_request
from tokenbroker.credentials import AssertionSigner
from tokenbroker.v1 import broker_pb2_grpc


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def test_signer_reuses_an_assertion_and_replaces_it_a_minute_before_expiry() -> None:
    key = private_pem(ed25519.Ed25519PrivateKey.generate())
    clock = FakeClock(1_000_000.0)
    signer = AssertionSigner("ci", key, "https://broker.test", key_id="k7", clock=clock)
    first = signer.assertion()
    claims = _claims(first)
    assert claims["iss"] == claims["sub"] == "ci"
    assert claims["aud"] == "https://broker.test"
    assert claims["exp"] - claims["iat"] == 300
    assert jwt.get_unverified_header(first) == {"alg": "EdDSA", "typ": "JWT", "kid": "k7"}
    clock.advance(239)
    assert signer.assertion() == first
    clock.advance(1)
    second = signer.assertion()
    assert second != first
    assert _claims(second)["jti"] != claims["jti"]
    assert _claims(second)["iat"] == 1_000_240


def test_signer_refuses_lifetimes_the_broker_would_refuse() -> None:
    key = private_pem(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ValueError, match="lifetime"):
        AssertionSigner("ci", key, "https://broker.test", lifetime=600)


def test_ed25519_and_rsa_accounts_authenticate_as_well_as_ec(tmp_path: Path) -> None:
    accounts = [
        Account(
            "ed-orchestrator",
            ("orchestrator",),
            ("acme/*/*",),
            ed25519.Ed25519PrivateKey.generate(),
        ),
        Account(
            "rsa-orchestrator",
            ("orchestrator",),
            ("acme/*/*",),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ),
    ]
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(accounts))
    server = create_server(make_settings(tmp_path / "data", store="memory", policy=policy))
    server.start()
    try:
        with callers_of(server) as callers:
            for account in accounts:
                run = callers.stub(account).StartRun(start_run_request(), timeout=5).run
                assert run.triggered_via == account.name
    finally:
        server.stop(grace=0.5)


def test_cli_prints_a_dev_admin_assertion_a_local_broker_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    server = create_server(make_settings(data, store="memory"))
    server.start()
    try:
        assert cli.main(["assertion", "--data-dir", str(data)]) == 0
        token = capsys.readouterr().out.strip()
        assert jwt.get_unverified_header(token)["kid"] == dev.KEY_ID
        with grpc.insecure_channel(server.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            run = stub.StartRun(start_run_request(), metadata=bearer(token), timeout=5).run
        assert run.triggered_via == dev.ACCOUNT
    finally:
        server.stop(grace=0.5)


def test_cli_assertion_needs_account_and_key_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["assertion", "--account", "ci"]) == 2
    assert "--account needs --key" in capsys.readouterr().err
    key = tmp_path / "ci.pem"
    key.write_bytes(private_pem(ed25519.Ed25519PrivateKey.generate()))
    assert cli.main(["assertion", "--key", str(key)]) == 2
    assert "go with --account" in capsys.readouterr().err


def test_cli_assertion_of_a_service_account_is_for_the_issuer_of_the_broker_at_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = Account("ci", ("orchestrator",), ("acme/*/*",), ed25519.Ed25519PrivateKey.generate())
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml([account]))
    key = tmp_path / "ci.pem"
    key.write_bytes(private_pem(account.key))
    server = create_server(make_settings(tmp_path / "data", store="memory", policy=policy))
    server.start()
    try:
        argv = ["assertion", "--account", "ci", "--key", str(key), "--target", server.target]
        assert cli.main(argv) == 0
        token = capsys.readouterr().out.strip()
        assert _claims(token)["aud"] == server.broker.tokens.issuer
        with grpc.insecure_channel(server.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            run = stub.StartRun(start_run_request(), metadata=bearer(token), timeout=5).run
        assert run.triggered_via == "ci"
    finally:
        server.stop(grace=0.5)
