"""`token-broker execute --on-behalf-of` and `runs show` attribution, signing in as service
accounts of a real policy (--account/--key), with a test identity provider."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.api.server import BrokerServer
from tests.accounts import Account, new_account, write_policy
from tests.cli_support import Result, local_broker, run_cli
from tokenbroker.samples.idp import TestIdentityProvider

IDP_ISSUER = "https://idp.example.com"
PORTAL_DELEGATION = """\
[accounts.deploy-portal.delegation]
user_domains = ["example.com"]
asserted_identities = true
asserted_domains = ["example.com"]

[[accounts.deploy-portal.delegation.identity_providers]]
issuer = "https://idp.example.com"
audience = "deploy-portal"
jwks_file = "idp-jwks.json"
"""


class Portal:
    """The CLI as the deploy-portal service account, and the IdP its users log in with."""

    def __init__(
        self, capsys: pytest.CaptureFixture[str], server: BrokerServer, directory: Path
    ) -> None:
        self.capsys = capsys
        self.server = server
        self.directory = directory
        self.idp: TestIdentityProvider | None = None

    def key_file(self, account: Account) -> str:
        path = self.directory / f"{account.name}.pem"
        path.write_bytes(account.private_pem)
        return str(path)

    def as_account(self, account: Account, *args: str) -> Result:
        sign_in = ["--target", self.server.target, "--account", account.name]
        return run_cli(self.capsys, *args, *sign_in, "--key", self.key_file(account))

    def id_token_file(self, email: str, issuer_idp: TestIdentityProvider | None = None) -> str:
        idp = issuer_idp or self.idp
        assert idp is not None
        path = self.directory / "id-token.jwt"
        path.write_text(idp.id_token(subject="u-" + email, email=email, audience="deploy-portal"))
        return str(path)


PORTAL = new_account("deploy-portal", ["delegator"], extra_toml=PORTAL_DELEGATION)
ORCHESTRATOR = new_account(
    "ci-orchestrator", ["orchestrator"], extra_toml='permissions = { artifacts = "read" }'
)

AUDITOR = new_account("siem", ["auditor"])


@pytest.fixture
def portal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], idp: TestIdentityProvider
) -> Iterator[Portal]:
    idp.write_jwks(tmp_path / "idp-jwks.json")
    policy = write_policy(tmp_path / "policy.toml", [PORTAL, ORCHESTRATOR, AUDITOR])
    with local_broker(tmp_path / "data", policy=policy) as running:
        made = Portal(capsys, running, tmp_path)
        made.idp = idp
        yield made


def execute(portal: Portal, *person: str, json_output: bool = True) -> Result:
    args = ["execute", "--on-behalf-of", *person, "acme/web/deploy", "--ceiling", "pipelines=read"]
    return portal.as_account(PORTAL, *args, *(["--json"] if json_output else []))


VERIFIED_LINE = (
    "Executed by: alice@example.com (verified by https://idp.example.com) · "
    "Triggered via: deploy-portal"
)


def test_runs_show_prints_the_attribution_of_a_run_started_for_a_verified_person(
    portal: Portal,
) -> None:
    started = execute(portal, "--id-token", portal.id_token_file("alice@example.com"))
    assert started.code == 0, started.err
    run = started.json()["run"]
    assert run["attribution"] == VERIFIED_LINE
    assert run["on_behalf_of"]["verification_method"] == "idp_verified"
    assert run["on_behalf_of"]["issuer"] == IDP_ISSUER
    shown = portal.as_account(PORTAL, "runs", "show", run["run_id"])
    assert shown.code == 0
    lines = shown.out.splitlines()
    assert lines[1] == VERIFIED_LINE
    assert "actor chain: deploy-portal" in lines
    assert "state:       active" in lines
    assert "pipeline:    acme/web/deploy" in lines
    assert "ceiling:     pipelines:read" in lines
    assert any(line.startswith("deadline:    ") for line in lines)


def test_an_asserted_person_is_shown_as_asserted_by_the_portal_not_verified(
    portal: Portal,
) -> None:
    started = execute(
        portal,
        "--asserted-email",
        "bob@example.com",
        "--asserted-subject",
        "u-42",
        json_output=False,
    )
    assert started.code == 0, started.err
    assert started.out.splitlines()[1] == (
        "Executed by: bob@example.com (asserted by deploy-portal, not verified) · "
        "Triggered via: deploy-portal"
    )
    assert "run credential: " in started.out


def test_the_id_token_can_come_from_stdin_and_the_same_key_replays_the_same_run(
    portal: Portal, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = Path(portal.id_token_file("alice@example.com")).read_text()
    runs = []
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
        result = execute(portal, "--id-token", "-", "--idempotency-key", "change-1234")
        assert result.code == 0, result.err
        runs.append(result.json())
    assert runs[0]["run"]["run_id"] == runs[1]["run"]["run_id"]
    assert (runs[0]["replayed"], runs[1]["replayed"]) == (False, True)
    assert runs[0]["handed_off"] is False and runs[0]["run_credential"]


def test_a_person_the_portal_may_not_act_for_is_refused_with_exit_1(portal: Portal) -> None:
    stranger = TestIdentityProvider("https://evil.example")
    refused = execute(portal, "--id-token", portal.id_token_file("alice@example.com", stranger))
    assert refused.code == 1 and refused.out == ""
    assert refused.err.startswith("token-broker execute: PERMISSION_DENIED: ")
    assert "https://evil.example" in refused.err
    outsider = execute(portal, "--asserted-email", "eve@other.org", "--asserted-subject", "u-9")
    assert outsider.code == 1 and "PERMISSION_DENIED" in outsider.err


def test_execute_needs_on_behalf_of_and_exactly_one_person(portal: Portal) -> None:
    no_flag = portal.as_account(PORTAL, "execute", "acme/web/deploy", "--ceiling", "a=read")
    assert no_flag.code == 2 and "needs --on-behalf-of" in no_flag.err
    both = execute(
        portal, "--id-token", portal.id_token_file("a@example.com"), "--asserted-email", "b@x.io"
    )
    assert both.code == 2 and "give --id-token FILE, or --asserted-email" in both.err
    half = execute(portal, "--asserted-email", "b@example.com")
    assert half.code == 2 and "together" in half.err
    missing = execute(portal, "--id-token", str(portal.directory / "nothing.jwt"))
    assert missing.code == 2 and "nothing.jwt" in missing.err


def test_an_orchestrator_signs_in_with_its_key_and_tokens_inherit_its_policy_permissions(
    portal: Portal,
) -> None:
    started = portal.as_account(
        ORCHESTRATOR, "runs", "start", "acme/web/build", "--ceiling", "artifacts=write", "--json"
    )
    assert started.code == 0, started.err
    run_id = started.json()["run"]["run_id"]
    issued = portal.as_account(
        ORCHESTRATOR,
        "token",
        "issue",
        "--run",
        run_id,
        "--aud",
        "api",
        "--inherit-from",
        "ci-orchestrator",
        "--json",
    )
    assert issued.json()["permissions"] == {"artifacts": "read"}


def test_a_wrong_or_missing_account_key_is_reported_in_one_line(portal: Portal) -> None:
    impostor = new_account("deploy-portal", ["delegator"])  # same name, another key
    refused = portal.as_account(impostor, "runs", "list", "--org", "acme")
    assert refused.code == 1
    assert refused.err.startswith("token-broker runs list: UNAUTHENTICATED: ")
    no_key = run_cli(
        portal.capsys, "runs", "list", "--target", portal.server.target, "--account", "x"
    )
    assert no_key.code == 2 and "--account needs --key" in no_key.err
    not_a_key = portal.directory / "not-a-key.pem"
    not_a_key.write_text("hello")
    bad = run_cli(
        portal.capsys,
        "runs",
        "list",
        "--target",
        portal.server.target,
        "--account",
        "deploy-portal",
        "--key",
        str(not_a_key),
    )
    assert bad.code == 2 and bad.err.startswith("token-broker runs list: ")


def test_runs_list_shows_who_each_run_was_executed_by(portal: Portal) -> None:
    execute(portal, "--id-token", portal.id_token_file("alice@example.com"))
    listed = portal.as_account(AUDITOR, "runs", "list", "--org", "acme")
    assert listed.code == 0, listed.err
    [row] = [line.split("\t") for line in listed.out.splitlines()]
    assert row[1:5] == ["active", "acme/web/deploy", "alice@example.com", "deploy-portal"]
    as_json = json.loads(portal.as_account(AUDITOR, "runs", "list", "--org", "acme", "--json").out)
    assert as_json["runs"][0]["executed_by"] == "alice@example.com"
