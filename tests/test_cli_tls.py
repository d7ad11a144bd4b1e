"""The CLI over TLS: a private CA (--ca-file) and client certificates (--cert/--key)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.api.server import BrokerServer
from tests.accounts import new_account, write_policy
from tests.certs import dns, issue, new_ca, server_cert
from tests.cli_support import local_broker, run_cli

ORCHESTRATOR_SAN = "ci.acme.example"


@dataclass(frozen=True)
class Tls:
    server: BrokerServer
    directory: Path

    def flags(self, client: str) -> list[str]:
        return [
            "--target",
            self.server.target,
            "--ca-file",
            str(self.directory / "ca.pem"),
            "--cert",
            str(self.directory / f"{client}.crt"),
            "--key",
            str(self.directory / f"{client}.key"),
        ]


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[Tls]:
    ca = new_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = server_cert(ca).write(tmp_path, "server")
    issue("ci", [dns(ORCHESTRATOR_SAN)], ca).write(tmp_path, "ci")
    issue("stranger", [dns("stranger.example")], ca).write(tmp_path, "stranger")
    orchestrator = new_account(
        "ci-orchestrator", ["orchestrator"], certificate_sans=(ORCHESTRATOR_SAN,)
    )
    policy = write_policy(tmp_path / "policy.toml", [orchestrator])
    settings = {
        "policy": policy,
        "tls_cert": cert,
        "tls_key": key,
        "client_ca": tmp_path / "ca.pem",
    }
    with local_broker(tmp_path / "data", **settings) as running:
        yield Tls(running, tmp_path)


def test_a_client_certificate_signs_the_cli_in_as_the_account_it_names(
    tls: Tls, capsys: pytest.CaptureFixture[str]
) -> None:
    started = run_cli(
        capsys, "runs", "start", "acme/web/deploy", "--ceiling", "artifacts=read", "--json",
        *tls.flags("ci"),
    )  # fmt: skip
    assert started.code == 0, started.err
    assert started.json()["run"]["triggered_via"] == "ci-orchestrator"
    listed = run_cli(capsys, "runs", "list", "--org", "acme", "--json", *tls.flags("ci"))
    assert [r["run_id"] for r in listed.json()["runs"]] == [started.json()["run"]["run_id"]]
    keys = run_cli(capsys, "keys", "list", *tls.flags("ci"))
    assert keys.code == 0 and "\tES256\tsigning\t" in keys.out


def test_a_certificate_no_account_maps_to_is_refused_with_exit_1(
    tls: Tls, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = run_cli(capsys, "runs", "list", "--org", "acme", *tls.flags("stranger"))
    assert refused.code == 1
    assert refused.err.startswith("token-broker runs list: UNAUTHENTICATED: ")


def test_tls_to_a_plaintext_broker_is_reported_as_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = new_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    with local_broker(tmp_path / "data") as plaintext:
        result = run_cli(
            capsys, "keys", "list", "--target", plaintext.target, "--ca-file",
            str(tmp_path / "ca.pem"), "--timeout", "2",
        )  # fmt: skip
    assert result.code == 3
    assert f"cannot reach the broker at {plaintext.target}" in result.err
