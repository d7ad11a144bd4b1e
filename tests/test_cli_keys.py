"""`token-broker keys list | rotate` against a live broker started without a policy."""

from __future__ import annotations

import pytest

from broker.api.server import BrokerServer
from tests.cli_support import run_cli


def test_keys_list_needs_no_credential_and_shows_the_active_key_and_issuer(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKEN_BROKER_DATA_DIR", "/nonexistent")
    listed = run_cli(capsys, "keys", "list", "--json").json()
    assert listed["issuer"] == broker.broker.authn.audience
    [key] = listed["keys"]
    assert (key["alg"], key["kty"], key["crv"], key["active"]) == ("ES256", "EC", "P-256", True)
    assert listed["jwks"]["keys"][0]["kid"] == key["kid"]
    readable = run_cli(capsys, "keys", "list")
    assert readable.out == f"{key['kid']}\tES256\tactive\n"


def test_keys_rotate_makes_a_new_key_active_and_keeps_the_old_one_published(
    broker: BrokerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    old = run_cli(capsys, "keys", "list", "--json").json()["keys"][0]["kid"]
    rotated = run_cli(capsys, "keys", "rotate")
    assert rotated.code == 0
    new = rotated.out.split()[3]
    assert rotated.out.splitlines() == [
        f"new signing key {new} is active",
        f"still published until their tokens expire: {old}",
    ]
    again = run_cli(capsys, "keys", "rotate", "--json").json()
    assert set(again) == {"key_id", "retiring_key_ids"}
    assert again["key_id"] not in (old, new)
    listed = run_cli(capsys, "keys", "list", "--json").json()["keys"]
    assert listed[0] == {**listed[0], "kid": again["key_id"], "active": True}
    assert {k["kid"] for k in listed[1:]} == {old, new}
