"""`token-broker serve --check` (like `nginx -t`): a valid configuration prints what would be
served and exits 0 — beside a broker serving the same data dir, changing nothing — and a bad
policy, a bad key or an unreachable store exits 2 or 1 with the reason."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from broker.api.server import BrokerServer
from tests.accounts import standard_accounts, write_policy
from tests.cli_support import closed_port, local_broker, run_cli
from tests.support import REPO

CHECK = ("serve", "--check", "--listen", "127.0.0.1:50051", "--http-listen", "127.0.0.1:50052")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_valid_configuration_prints_what_would_be_served_and_exits_0(
    server: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = server.broker.settings
    assert settings.policy is not None
    database = settings.data_dir / "broker.db"
    before = digest(database)
    result = run_cli(
        capsys,
        *CHECK,
        "--data-dir",
        str(settings.data_dir),
        "--policy",
        str(settings.policy),
        "--issuer",
        "https://broker.example.com",
    )
    assert result.code == 0, result.err
    lines = dict(line.split(":", 1) for line in result.out.splitlines()[:-1])
    assert lines["grpc"].strip() == "127.0.0.1:50051 (plaintext)"
    assert lines["http"].strip().startswith("127.0.0.1:50052 (")
    assert lines["issuer"].strip() == "https://broker.example.com"
    accounts = len(standard_accounts())
    assert f"{accounts} accounts: ci-orchestrator [orchestrator]" in lines["policy"]
    assert "schema" in lines["store"] and "reachable" in lines["store"]
    (active_kid,) = {key["kid"] for key in server.broker.keys.jwks()["keys"]}
    assert active_kid in lines["signing keys"]
    assert result.out.splitlines()[-1].endswith("the configuration is valid; serve would start")
    assert digest(database) == before  # opened read-only, beside the serving broker


def test_a_new_data_dir_is_valid_and_nothing_is_written_into_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    result = run_cli(capsys, *CHECK, "--data-dir", str(data_dir))
    assert result.code == 0, result.err
    assert "development policy, written to" in result.out
    assert "an empty one is created at start" in result.out
    assert "a first ES256 key is made at start" in result.out
    assert not data_dir.exists()


def test_an_empty_postgresql_database_is_valid_as_a_first_deployment_and_stays_empty(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An init container runs --check before the first broker ever starts: the database is
    still empty then, and serve would create the store in it."""
    result = run_cli(capsys, *CHECK, "--data-dir", str(tmp_path / "data"), "--store", pg_dsn)
    assert result.code == 0, result.err
    assert "holds no token-broker store" in result.out
    assert "an empty one is created at start" in result.out
    # Still empty: a read-only look applies no migration.
    rerun = run_cli(capsys, *CHECK, "--data-dir", str(tmp_path / "data"), "--store", pg_dsn)
    assert rerun.code == 0 and "an empty one is created at start" in rerun.out


def test_a_bad_policy_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = 1\n[accounts.ci]\nroles = ["orchestator"]\ncertificate_sans = ["ci.example"]\n'
    )
    result = run_cli(capsys, *CHECK, "--data-dir", str(tmp_path / "d"), "--policy", str(policy))
    assert result.code == 2
    assert "unknown role 'orchestator'" in result.err


def test_an_unreachable_store_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"postgresql://broker@127.0.0.1:{closed_port()}/tokenbroker"
    result = run_cli(capsys, *CHECK, "--data-dir", str(tmp_path / "d"), "--store", store)
    assert result.code == 1
    assert result.err.startswith(f"token-broker serve: store {store}: ")
    assert "Connection refused" in result.err or "connection failed" in result.err


def test_a_password_in_the_store_url_is_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"postgresql://broker:s3cret@127.0.0.1:{closed_port()}/tokenbroker"
    result = run_cli(capsys, *CHECK, "--data-dir", str(tmp_path / "d"), "--store", store)
    assert result.code == 1
    assert "s3cret" not in result.err + result.out
    assert "postgresql://broker:***@127.0.0.1" in result.err


def test_a_lost_database_in_a_used_data_dir_exits_1_as_serve_would_refuse_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    with local_broker(data_dir):
        pass
    (data_dir / "broker.db").unlink()
    result = run_cli(capsys, *CHECK, "--data-dir", str(data_dir))
    assert result.code == 1
    assert "--init-store" in result.err


@pytest.mark.parametrize("where", ["data dir", "--signing-key"])
def test_a_bad_key_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    data_dir = tmp_path / "data"
    bad = data_dir / "keys" / "broken.pem"
    bad.parent.mkdir(parents=True)
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    extra = ["--signing-key", str(bad)] if where == "--signing-key" else []
    result = run_cli(capsys, *CHECK, "--data-dir", str(data_dir), "--init-store", *extra)
    assert result.code == 2
    assert f"signing key {bad}: not an unencrypted PEM private key" in result.err


def test_a_missing_tls_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(
        capsys,
        *CHECK,
        "--data-dir",
        str(tmp_path / "d"),
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
    )
    assert result.code == 2
    assert "cert.pem" in result.err


def test_the_real_command_exits_with_the_code_a_manifest_sees(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy.toml", standard_accounts().values())
    command = [sys.executable, "-m", "broker", *CHECK, "--data-dir", str(tmp_path / "d")]
    good = subprocess.run(
        [*command, "--policy", str(policy)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert good.returncode == 0, good.stderr
    assert "serve would start" in good.stdout
    policy.write_text("version = 1\n[accounts.x\n")
    bad = subprocess.run(
        [*command, "--policy", str(policy)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("token-broker serve: ")
