"""Witness cosignatures reach the broker (`token-broker witness --submit`), and K of them make
a tree head final: GetTreeHead and /audit/checkpoint then carry the cosignature lines. A
cosignature by an unknown key, a forged one, or one for a checkpoint the broker never signed
is a 400 and counts as refused."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.api.server import BrokerServer
from broker.app import build_broker
from broker.audit.lognote import LOG_KEY_FILE, LogKey
from broker.audit.quorum import WitnessVerifier
from broker.audit.witness import WitnessKey, verify_cosignature
from broker.settings import SettingsError, parse
from broker.store import all_stored_events
from tests.audit_support import auditor
from tests.cli_support import local_broker, point_at, run_cli
from tests.conftest import make_settings
from tests.support import eventually
from tokenbroker.merkle import checkpoint_text
from tokenbroker.v1 import broker_pb2


def _witness_key(directory: Path, name: str) -> tuple[WitnessKey, Path]:
    """A witness's key in its state dir (where `token-broker witness` looks for it) and the
    vkey file the broker's operator configures."""
    directory.mkdir(parents=True)
    private = Ed25519PrivateKey.generate()
    (directory / "witness-key.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key = WitnessKey(name, private)
    vkey = directory / "witness.vkey"
    vkey.write_text(key.verifier_text() + "\n")
    return key, vkey


@contextmanager
def _broker(tmp_path: Path, *vkeys: Path, quorum: int) -> Iterator[BrokerServer]:
    with local_broker(
        tmp_path / "data", http_listen="127.0.0.1:0", witness_key=vkeys, witness_quorum=quorum
    ) as server:
        yield server


def _http(
    server: BrokerServer, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    assert server.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _tree_head(server: BrokerServer) -> broker_pb2.GetTreeHeadResponse:
    with auditor(server) as stub:
        answer: broker_pb2.GetTreeHeadResponse = stub.GetTreeHead(broker_pb2.GetTreeHeadRequest())
        return answer


def _run_witness(
    capsys: pytest.CaptureFixture[str], server: BrokerServer, state: Path, name: str
) -> str:
    assert server.http is not None
    vkey = str(server.broker.settings.data_dir / (LOG_KEY_FILE + ".vkey"))
    ran = run_cli(
        capsys,
        *("witness", "--log-key", vkey, "--state", str(state), "--name", name, "--once"),
        *("--submit", f"http://127.0.0.1:{server.http.port}"),
    )
    assert ran.code == 0, ran.out + ran.err
    return ran.out + ran.err


def test_a_witness_submitting_its_cosignature_makes_the_head_final_with_quorum_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key, vkey = _witness_key(tmp_path / "witness", "witness-a")
    with _broker(tmp_path, vkey, quorum=1) as server:
        point_at(monkeypatch, server)
        assert (
            run_cli(capsys, "runs", "start", "acme/web/deploy", "--ceiling", "api=read").code == 0
        )
        before = _tree_head(server)
        assert not before.final and before.cosignatures == 0
        out = _run_witness(capsys, server, tmp_path / "witness", "witness-a")
        assert "submitted the cosignature" in out

        def head_if_final() -> broker_pb2.GetTreeHeadResponse | None:
            head = _tree_head(server)
            return head if head.final else None

        final = eventually(head_if_final, what="GetTreeHead final after the witness submitted")
        assert final.cosignatures == 1
        # The cosignature line travels with the checkpoint: clients check the quorum themselves.
        assert verify_cosignature(final.tree_head.checkpoint, "witness-a", key.public_key) > 0
        status, headers, body = _http(server, "GET", "/audit/checkpoint")
        assert status == 200 and "; final" in headers["Tokenbroker-Witness-Quorum"]
        assert verify_cosignature(body.decode(), "witness-a", key.public_key) > 0


def test_one_cosignature_of_two_needed_does_not_make_the_head_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, vkey_a = _witness_key(tmp_path / "a", "witness-a")
    _, vkey_b = _witness_key(tmp_path / "b", "witness-b")
    with _broker(tmp_path, vkey_a, vkey_b, quorum=2) as server:
        point_at(monkeypatch, server)
        _run_witness(capsys, server, tmp_path / "a", "witness-a")
        head = _tree_head(server)
        assert head.cosignatures == 1 and not head.final
        _run_witness(capsys, server, tmp_path / "b", "witness-b")
        head = _tree_head(server)
        assert head.cosignatures == 2 and head.final


def _cosigned(server: BrokerServer, key: WitnessKey) -> str:
    note = server.broker.tree_heads.latest().note
    return note + key.cosign(note.partition("\n\n")[0] + "\n", 1_700_000_000) + "\n"


def _refused(server: BrokerServer, body: bytes) -> str:
    status, _, answer = _http(server, "POST", "/audit/cosignature", body)
    assert status == 400, answer
    message = json.loads(answer)["message"]
    assert isinstance(message, str) and len(message) < 200
    return message


def test_forged_unknown_and_foreign_cosignatures_are_refused(tmp_path: Path) -> None:
    key, vkey = _witness_key(tmp_path / "witness", "witness-a")
    stranger, _ = _witness_key(tmp_path / "stranger", "witness-a")
    with _broker(tmp_path, vkey, quorum=1) as server:
        assert "no cosignature by a witness" in _refused(
            server, _cosigned(server, stranger).encode()
        )
        good = _cosigned(server, key)
        forged = good.replace(good.splitlines()[1], good.splitlines()[1] + "0", 1)
        assert "not a checkpoint signed by this log" in _refused(server, forged.encode())
        tampered_line = good.rstrip("\n")[:-8] + "AAAAAA==\n"
        assert "does not verify" in _refused(server, tampered_line.encode())
        # Signed with another log key: a checkpoint this broker never signed.
        other = LogKey.generate(server.broker.tree_heads.latest().origin)
        head = server.broker.tree_heads.latest()
        foreign = other.sign(checkpoint_text(head.origin, head.size, b"\x00" * 32))
        foreign += key.cosign(foreign.partition("\n\n")[0] + "\n", 1_700_000_000) + "\n"
        _refused(server, foreign.encode())
        for hostile in (b"", b"\xff\xfe", b"x" * 9000, good.encode() + b"not a signature\n"):
            _refused(server, hostile)
        assert not _tree_head(server).final
        # Each refusal is audited (once per peer and reason per interval): the log grew.
        refused = [
            e.record["details"]["reason"]
            for e in all_stored_events(server.broker.store)
            if e.record["action"] == "audit.cosignature_refused"
        ]
        assert "not a checkpoint signed by this log" in refused
        assert any("does not verify" in reason for reason in refused)
        # The genuine one for the head as it now stands is accepted, and only then is it final.
        good = _cosigned(server, key)
        status, _, answer = _http(server, "POST", "/audit/cosignature", good.encode())
        assert status == 200 and json.loads(answer) == {"accepted": ["witness-a"]}
        assert _tree_head(server).final


def test_witness_settings_are_checked_at_startup(tmp_path: Path) -> None:
    _, vkey = _witness_key(tmp_path / "witness", "witness-a")
    _, other = _witness_key(tmp_path / "other", "witness-b")
    settings = parse(
        ["--witness-key", str(vkey), "--witness-key", str(other), "--witness-quorum", "2"]
    )
    assert settings.witness_key == (vkey, other) and settings.witness_quorum == 2
    with pytest.raises(SettingsError, match="--witness-quorum"):
        parse(["--witness-key", str(vkey), "--witness-quorum", "2"])
    with pytest.raises(SettingsError, match="--witness-quorum"):
        parse(["--witness-quorum", "1"])
    assert WitnessVerifier.parse(vkey.read_text()).name == "witness-a"
    from_env = parse([], {"TOKEN_BROKER_WITNESS_KEY": f"{vkey},{other}"})
    assert from_env.witness_key == (vkey, other)
    (tmp_path / "bad.vkey").write_text("witness-a+00000000+AQ==\n")
    for keys in ((vkey, vkey), (tmp_path / "bad.vkey", other), (tmp_path / "absent", other)):
        with pytest.raises(SettingsError, match="--witness-"):
            build_broker(make_settings(tmp_path / "data", witness_key=keys, witness_quorum=2))


@pytest.mark.slow
def test_a_real_witness_process_makes_a_real_brokers_head_final_and_metrics_count_it(
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.support import start_broker_process
    from tests.test_http_metrics import only, scrape
    from tokenbroker.credentials import dev_admin_credentials, local_channel
    from tokenbroker.v1 import broker_pb2_grpc

    key, vkey = _witness_key(tmp_path / "witness", "witness-a")
    data = tmp_path / "data"
    process = start_broker_process(data, ["--witness-key", str(vkey), "--witness-quorum", "1"])
    try:
        env = {
            **os.environ,
            "TOKEN_BROKER_TARGET": process.target,
            "TOKEN_BROKER_DATA_DIR": str(data),
        }
        # A refusal first: it is audited, so it grows the log (a head is final for its size).
        refused = urllib.request.Request(
            process.http_url + "/audit/cosignature", data=b"not a checkpoint", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(refused, timeout=10)
        assert answer.value.code == 400
        answer.value.close()
        witness = subprocess.run(
            [
                *(sys.executable, "-m", "broker", "witness"),
                *("--log-key", str(data / (LOG_KEY_FILE + ".vkey"))),
                *("--state", str(tmp_path / "witness"), "--name", "witness-a", "--once"),
                *("--submit", process.http_url),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert witness.returncode == 0, witness.stderr
        assert "submitted the cosignature" in witness.stdout

        with local_channel(process.target, dev_admin_credentials(data)) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)

            def head_if_final() -> broker_pb2.GetTreeHeadResponse | None:
                head: broker_pb2.GetTreeHeadResponse = stub.GetTreeHead(
                    broker_pb2.GetTreeHeadRequest(), timeout=10
                )
                return head if head.final else None

            final = eventually(head_if_final, within=30, what="a final head")
        assert verify_cosignature(final.tree_head.checkpoint, "witness-a", key.public_key) > 0
        _, families = scrape(process.http_url)
    finally:
        assert process.terminate_and_wait() == 0
    counted = families["tokenbroker_audit_cosignatures"]
    name = "tokenbroker_audit_cosignatures_total"
    assert only(counted, name, tokenbroker_cosignature_result="accepted") == 1
    assert only(counted, name, tokenbroker_cosignature_result="refused") == 1


def test_a_witness_whose_key_the_broker_does_not_know_is_told_so_and_is_not_alarmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _witness_key(tmp_path / "witness", "witness-a")
    with _broker(tmp_path, quorum=0) as server:
        point_at(monkeypatch, server)
        out = _run_witness(capsys, server, tmp_path / "witness", "witness-a")
        assert "cosignature not submitted" in out
        assert "no cosignature by a witness this broker is configured with" in out
        head = _tree_head(server)
        assert head.cosignatures == 0 and not head.final
