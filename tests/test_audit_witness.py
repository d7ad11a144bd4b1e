"""`token-broker witness` accepts and cosigns heads that extend what it saw, and raises the
alarm when history is rewritten behind the broker's back or an older database is restored —
even though every head it is shown is signed with the log's real key."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from broker.audit import events as audit
from broker.audit.lognote import LOG_KEY_FILE
from broker.audit.merkle import Frontier
from broker.audit.witness import LATEST, verify_cosignature
from tests.audit_support import attacker_connection
from tests.cli_support import local_broker, point_at, run_cli


def _start_runs(capsys: pytest.CaptureFixture[str], count: int) -> None:
    for _ in range(count):
        started = run_cli(capsys, "runs", "start", "acme/web/deploy", "--ceiling", "api=read")
        assert started.code == 0, started.err


def _witness(capsys: pytest.CaptureFixture[str], data: Path, state: Path) -> tuple[int, str]:
    vkey = str(data / (LOG_KEY_FILE + ".vkey"))
    ran = run_cli(capsys, "witness", "--log-key", vkey, "--state", str(state), "--once")
    return ran.code, ran.out + ran.err


def _rewrite_history(db: Path, sequence: int) -> None:
    """What someone with the database (but no private key) can do: change one event, re-hash
    the chain after it, and rebuild the Merkle tree so every node matches the new events."""
    conn = attacker_connection(db)
    try:
        rows = conn.execute(
            "SELECT sequence, record, prev_hash FROM audit_events ORDER BY sequence"
        ).fetchall()
        prev, frontier, nodes = audit.GENESIS_HASH, Frontier(0, []), []
        for number, text, _ in rows:
            record = json.loads(text)
            if number == sequence:
                record["principal"] = "someone-else"
            body = audit.canonical_bytes(record)
            new_hash = audit.chain_hash(prev, record)
            conn.execute(
                "UPDATE audit_events SET record=?, prev_hash=?, hash=? WHERE sequence=?",
                (body.decode(), prev, new_hash, number),
            )
            nodes.extend(frontier.append(body))
            prev = new_hash
        conn.execute("DELETE FROM audit_tree")
        conn.executemany("INSERT INTO audit_tree (level, idx, hash) VALUES (?, ?, ?)", nodes)
    finally:
        conn.close()


def test_a_witness_cosigns_heads_that_extend_the_one_it_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, state = tmp_path / "data", tmp_path / "witness"
    with local_broker(data) as server:
        point_at(monkeypatch, server)
        _start_runs(capsys, 2)
        code, out = _witness(capsys, data, state)
        assert code == 0 and "accepted" in out, out
        _start_runs(capsys, 3)
        code, out = _witness(capsys, data, state)
        assert code == 0, out
        size = server.broker.store.head_sequence()
    assert f"size {size}" in out
    cosigned = (state / LATEST).read_text()
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(
        (state / "witness-key.pem").read_bytes(), password=None
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert verify_cosignature(cosigned, "witness", public) > 0
    name, _, encoded = (state / "witness.vkey").read_text().strip().split("+", 2)
    assert name == "witness" and base64.b64decode(encoded) == b"\x04" + public
    assert len((state / "accepted.jsonl").read_text().splitlines()) == 2


def test_a_history_rewritten_and_re_signed_with_the_real_key_raises_the_alarm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, state = tmp_path / "data", tmp_path / "witness"
    with local_broker(data) as server:
        point_at(monkeypatch, server)
        _start_runs(capsys, 3)
        assert _witness(capsys, data, state)[0] == 0
        _rewrite_history(data / "broker.db", 3)
        _start_runs(capsys, 2)  # the broker signs heads of the rewritten log, with its key
        code, out = _witness(capsys, data, state)
    assert code == 1
    assert "ALARM: rewrite: the log of" in out and "does not extend" in out


def test_a_restored_older_database_raises_the_alarm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, state, backup = tmp_path / "data", tmp_path / "witness", tmp_path / "backup"
    with local_broker(data) as server:
        point_at(monkeypatch, server)
        _start_runs(capsys, 1)
    shutil.copytree(data, backup)  # an older copy, taken while the broker was stopped
    with local_broker(data) as server:
        point_at(monkeypatch, server)
        _start_runs(capsys, 8)
        assert _witness(capsys, data, state)[0] == 0
    shutil.rmtree(data)
    shutil.copytree(backup, data)
    with local_broker(data) as server:
        point_at(monkeypatch, server)
        code, out = _witness(capsys, data, state)
    assert code == 1
    assert "ALARM: rollback: the log shrank from" in out


def test_a_head_for_the_same_size_with_another_root_is_a_fork(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from broker.audit.lognote import LogKey
    from broker.audit.witness import Alarm, Witness, WitnessKey
    from tokenbroker.merkle import checkpoint_text

    log = LogKey.generate("log.example/audit")
    witness = Witness(
        log.verifier, WitnessKey("w", Ed25519PrivateKey.generate()), tmp_path, lambda: 1000.0
    )
    witness.observe(log.sign(checkpoint_text(log.name, 5, bytes(32))), lambda a, b: [])
    with pytest.raises(Alarm, match="fork: two different heads for the log of 5 events"):
        witness.observe(log.sign(checkpoint_text(log.name, 5, b"\x01" * 32)), lambda a, b: [])
    other = LogKey.generate("log.example/audit")
    with pytest.raises(Alarm, match="does not verify with the log's key"):
        witness.observe(other.sign(checkpoint_text(log.name, 6, bytes(32))), lambda a, b: [])


def test_a_witness_counts_accepted_heads_and_alarms_for_the_operators_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.otel_support import otlp_attributes, start_otlp_receiver

    receiver = start_otlp_receiver()
    data, state = tmp_path / "data", tmp_path / "witness"
    try:
        with local_broker(data) as server:
            point_at(monkeypatch, server)
            _start_runs(capsys, 3)
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.endpoint)
            assert _witness(capsys, data, state)[0] == 0
            assert "tokenbroker.witness.heads" in receiver.metric_names()
            _rewrite_history(data / "broker.db", 2)
            _start_runs(capsys, 1)
            assert _witness(capsys, data, state)[0] == 1
        [alarm] = [
            point
            for request in receiver.metrics
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "tokenbroker.witness.alarms"
            for point in metric.sum.data_points
        ]
        assert alarm.as_int == 1
        assert otlp_attributes(alarm.attributes) == {"tokenbroker.witness.alarm": "rewrite"}
    finally:
        receiver.stop()
