"""`token-broker keys list | rotate` against a live broker started without a policy."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest

from broker.api.server import BrokerServer
from broker.store.sqlite import DB_FILENAME
from tests.cli_support import run_cli


def test_keys_list_needs_no_credential_and_shows_the_active_key_and_issuer(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKEN_BROKER_DATA_DIR", "/nonexistent")
    listed = run_cli(capsys, "keys", "list", "--json").json()
    assert listed["issuer"] == broker.broker.authn.audience
    [key] = listed["keys"]
    assert (key["alg"], key["kty"], key["crv"], key["active"]) == ("ES256", "EC", "P-256", True)
    assert (key["state"], key["stops_signing"], key["unpublish_at"]) == ("signing", None, None)
    assert listed["jwks"]["keys"][0]["kid"] == key["kid"]
    readable = run_cli(capsys, "keys", "list")
    assert readable.out == f"{key['kid']}\tES256\tsigning\t{key['signs_from']}\t\n"


def test_keys_rotate_prepublishes_a_new_key_and_keeps_the_old_one_signing_until_it_signs(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    old = run_cli(capsys, "keys", "list", "--json").json()["keys"][0]["kid"]
    rotated = run_cli(capsys, "keys", "rotate")
    assert rotated.code == 0
    lines = rotated.out.splitlines()
    new = lines[0].split()[-1]
    assert lines[0] == f"new signing keys published: {new}"
    assert lines[1].startswith("they sign from ") and lines[1].endswith("(in 59m)")
    assert lines[2] == f"signing until then, published until their tokens expire: {old}"
    listed = run_cli(capsys, "keys", "list", "--json").json()["keys"]
    assert [(k["kid"], k["state"]) for k in listed] == [(old, "signing"), (new, "prepublished")]
    assert listed[0]["stops_signing"] == listed[1]["signs_from"]


def test_keys_rotate_emergency_signs_with_the_new_key_now(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    old = run_cli(capsys, "keys", "list", "--json").json()["keys"][0]["kid"]
    again = run_cli(capsys, "keys", "rotate", "--emergency", "--json").json()
    assert set(again) == {"key_id", "new_key_ids", "retiring_key_ids", "signs_from", "emergency"}
    assert (again["emergency"], again["retiring_key_ids"]) == (True, [old])
    listed = run_cli(capsys, "keys", "list", "--json").json()["keys"]
    assert [(k["kid"], k["state"]) for k in listed] == [
        (again["key_id"], "signing"),
        (old, "retiring"),
    ]


def test_keys_export_jwks_writes_every_published_key_offline_pre_published_ones_included(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rotated = run_cli(capsys, "keys", "rotate", "--json").json()
    data_dir = broker.broker.settings.data_dir
    database = data_dir / DB_FILENAME
    before = database.read_bytes()
    out = tmp_path / "jwks.json"
    exported = run_cli(
        capsys, "keys", "export-jwks", "--data-dir", str(data_dir), "--out", str(out)
    )
    assert exported.code == 0
    assert exported.err == f"token-broker keys export-jwks: wrote 2 keys to {out}\n"
    jwks = json.loads(out.read_text())
    assert jwks == broker.broker.keys.jwks()  # what the broker serves, signing key first
    assert [k["kid"] for k in jwks["keys"]] == [*rotated["retiring_key_ids"], rotated["key_id"]]
    assert database.read_bytes() == before  # read-only
    # Standard output too, and a verifier loads it as it is.
    printed = run_cli(capsys, "keys", "export-jwks", "--data-dir", str(data_dir)).json()
    assert {k.key_id for k in jwt.PyJWKSet.from_dict(printed).keys} == {
        k["kid"] for k in jwks["keys"]
    }


def test_keys_export_jwks_without_a_store_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = run_cli(capsys, "keys", "export-jwks", "--data-dir", str(tmp_path / "none"))
    assert missing.code == 2
    assert missing.err.startswith("token-broker keys export-jwks: ")
