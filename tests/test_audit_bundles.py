"""`token-broker audit prove` writes a bundle; `audit check` verifies it offline with the
log's public key alone, and fails on any change to it, or on a history that was rewritten."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from broker.api.server import BrokerServer
from broker.audit.lognote import LOG_KEY_FILE, LogKey
from tests.cli_support import run_cli
from tokenbroker.merkle import checkpoint_text


def _vkey(server: BrokerServer) -> Path:
    return server.broker.settings.data_dir / (LOG_KEY_FILE + ".vkey")


def _start_runs(capsys: pytest.CaptureFixture[str], count: int) -> None:
    for _ in range(count):
        started = run_cli(
            capsys, "runs", "start", "acme/web/deploy", "--ceiling", "artifacts=read", "--json"
        )
        assert started.code == 0, started.err


def _flip(text: str, position: int) -> str:
    return text[:position] + chr(ord(text[position]) ^ 1) + text[position + 1 :]


def test_an_event_bundle_checks_offline_and_any_change_to_it_fails(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _start_runs(capsys, 5)
    bundle_file = tmp_path / "event.json"
    proved = run_cli(capsys, "audit", "prove", "--sequence", "4", "--out", str(bundle_file))
    assert proved.code == 0, proved.err
    bundle = json.loads(bundle_file.read_text())
    assert bundle["type"] == "tokenbroker-audit-inclusion/v1"
    assert json.loads(bundle["record"])["sequence"] == 4 and bundle["leaf_index"] == 3
    key = str(_vkey(broker))
    checked = run_cli(capsys, "audit", "check", str(bundle_file), "--key", key)
    assert checked.code == 0, checked.out
    assert checked.out.startswith("OK: event 4 is leaf 3 of the log")
    tampered = {
        "record": _flip(bundle["record"], 20),
        "checkpoint": _flip(bundle["checkpoint"], 3),
        "leaf_index": 2,
        "tree_size": bundle["tree_size"] + 1,
        "proof": [base64.b64encode(b"\x00" * 32).decode(), *bundle["proof"][1:]],
    }
    for field, value in tampered.items():
        bundle_file.write_text(json.dumps({**bundle, field: value}))
        failed = run_cli(capsys, "audit", "check", str(bundle_file), "--key", key)
        assert failed.code == 1 and failed.out.startswith("FAILED"), (field, failed.out)
    # A key that is not the log's: nothing verifies.
    bundle_file.write_text(json.dumps(bundle))
    other = LogKey.generate("another/audit").verifier.text()
    assert run_cli(capsys, "audit", "check", str(bundle_file), "--key", other).code == 1


def test_a_consistency_bundle_proves_the_log_grew_from_a_kept_checkpoint(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _start_runs(capsys, 3)
    kept = tmp_path / "yesterday.checkpoint"
    kept.write_text(broker.broker.tree_heads.latest().note)
    _start_runs(capsys, 4)
    grew = tmp_path / "grew.json"
    proved = run_cli(capsys, "audit", "prove", "--consistency-from", str(kept), "-o", str(grew))
    assert proved.code == 0, proved.err
    key = str(_vkey(broker))
    args = ("audit", "check", "--consistency", str(grew), "--key", key)
    checked = run_cli(capsys, *args, "--old", str(kept))
    assert checked.code == 0, checked.out
    assert "extends its tree of" in checked.out


def test_a_rewritten_history_signed_with_the_real_key_fails_the_consistency_check(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Whoever holds the key can sign any head; what it cannot do is make a rewritten log
    consistent with a head an auditor kept from before the rewrite."""
    _start_runs(capsys, 3)
    honest = broker.broker.tree_heads.latest()
    key = LogKey.load(broker.broker.settings.data_dir / LOG_KEY_FILE)
    forged_root = bytes(31) + b"\x01"
    forked = tmp_path / "forked.checkpoint"
    forked.write_text(key.sign(checkpoint_text(honest.origin, honest.size, forged_root)))
    _start_runs(capsys, 2)
    grew = tmp_path / "grew.json"
    proved = run_cli(capsys, "audit", "prove", "--consistency-from", str(forked), "-o", str(grew))
    assert proved.code == 0, proved.err
    failed = run_cli(
        capsys, "audit", "check", "--consistency", str(grew), "--key", str(_vkey(broker))
    )
    assert failed.code == 1
    assert "does not reproduce the root of the tree of size" in failed.out


def test_check_usage_errors_exit_with_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "none.json"
    key = LogKey.generate("log/audit").verifier.text()
    assert run_cli(capsys, "audit", "check", str(missing), "--key", key).code == 2
    (tmp_path / "b.json").write_text("[]")
    assert run_cli(capsys, "audit", "check", str(tmp_path / "b.json"), "--key", key).code == 2
    assert run_cli(capsys, "audit", "check", str(tmp_path / "b.json"), "--key", "nope").code == 2
