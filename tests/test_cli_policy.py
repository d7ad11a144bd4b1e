"""`token-broker policy check FILE`: the broker's own validation, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.accounts import DELEGATION_TOML, new_account, write_policy
from tests.cli_support import run_cli

BROKEN = """\
version = 2

[accounts.ci]
roles = ["orchestator"]
scopes = ["acme"]
keys = [{ file = "missing.pub.pem" }]
"""


def test_a_valid_policy_is_summarised_with_its_accounts_roles_and_scopes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(
        tmp_path / "policy.toml",
        [
            new_account("ci-orchestrator", ["orchestrator"], ["acme/web/*"]),
            new_account("deploy-portal", ["delegator"], extra_toml=DELEGATION_TOML),
        ],
    )
    readable = run_cli(capsys, "policy", "check", str(policy))
    assert readable.code == 0
    lines = readable.out.splitlines()
    assert lines[0] == f"{policy}: valid, 2 accounts"
    assert lines[1].split("\t") == [
        "ci-orchestrator",
        "orchestrator",
        "acme/web/*",
        "1 key(s)",
        "",
    ]
    assert lines[2].split("\t")[:3] == ["deploy-portal", "delegator", "acme/*/*"]
    assert lines[2].split("\t")[4] == "example.com via asserted"
    summary = run_cli(capsys, "policy", "check", str(policy), "--json").json()
    assert summary["valid"] is True and len(summary["sha256"]) == 64
    portal = summary["accounts"][1]
    assert (portal["name"], portal["roles"], portal["keys"]) == (
        "deploy-portal",
        ["delegator"],
        ["k1"],
    )
    assert portal["delegation"]["asserted_domains"] == ["example.com"]


def test_every_problem_is_printed_with_file_key_and_problem_and_the_exit_is_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(BROKEN)
    readable = run_cli(capsys, "policy", "check", str(policy))
    assert readable.code == 2
    lines = readable.out.splitlines()
    assert f"{policy}: version: must be 1 (the only policy format so far)" in lines
    assert any(
        line.startswith(f"{policy}: accounts.ci.roles[0]: unknown role 'orchestator'")
        for line in lines
    )
    assert lines[-1] == "4 problems: not a valid policy"
    report = run_cli(capsys, "policy", "check", str(policy), "--json").json()
    assert report["valid"] is False
    keys = [p["key"] for p in report["problems"]]
    assert keys == [
        "version",
        "accounts.ci.roles[0]",
        "accounts.ci.scopes[0]",
        "accounts.ci.keys[0].file",
    ]
    assert all(p["file"] == str(policy) for p in report["problems"])
    assert "cannot read" in report["problems"][3]["problem"]


def test_an_unreadable_or_non_toml_file_is_one_problem_without_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = run_cli(capsys, "policy", "check", str(tmp_path / "nope.toml"), "--json")
    assert missing.code == 2
    [problem] = missing.json()["problems"]
    assert problem["key"] == "" and problem["problem"].startswith("cannot read the file")
    garbage = tmp_path / "garbage.toml"
    garbage.write_text("accounts = [")
    result = run_cli(capsys, "policy", "check", str(garbage))
    assert result.code == 2
    assert result.out.startswith(f"{garbage}: not valid TOML: ")
