"""The policy file: validation with precise errors, the development policy, and reloads."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from google.protobuf import json_format
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from broker.api.server import create_server
from broker.app import build_broker
from broker.policy import dev
from broker.policy.file import PolicyError, load_policy
from broker.policy.model import Role, Scope
from broker.runs.model import PipelineRef
from tests.accounts import (
    Callers,
    callers_of,
    new_account,
    policy_toml,
    public_pem,
    standard_accounts,
)
from tests.conftest import make_settings
from tests.support import REPO, eventually, start_broker_process, start_run_request
from tokenbroker.credentials import assertion_credentials, dev_admin_credentials, local_channel
from tokenbroker.defaults import DEV_CLIENT_FILE
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

ORCHESTRATOR = standard_accounts()["orchestrator"]
ROOT = standard_accounts()["root"]


def problems(tmp_path: Path, text: str, name: str = "policy.toml") -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(path) in str(caught.value), "the error names the file"
    return list(caught.value.problems)


def test_a_full_policy_loads_with_every_field(tmp_path: Path) -> None:
    (tmp_path / "idp-jwks.json").write_text(json.dumps({"keys": [{"kty": "EC", "kid": "i1"}]}))
    portal = new_account(
        "deploy-portal",
        ["delegator"],
        certificate_sans=["spiffe://acme.example/portal", "portal.acme.example"],
        extra_toml="""\
permissions = { artifacts = "read", pipelines = "execute" }
[accounts.deploy-portal.delegation]
user_domains = ["Example.com"]
asserted_identities = true
asserted_domains = ["contractors.example.com"]
max_chain_depth = 2
[[accounts.deploy-portal.delegation.identity_providers]]
issuer = "https://idp.example.com"
audience = "deploy-portal"
jwks_file = "idp-jwks.json"
[[accounts.deploy-portal.delegation.identity_providers]]
issuer = "https://login.example.org"
audience = "portal"
jwks_url = "https://login.example.org/keys"
""",
    )
    path = tmp_path / "policy.toml"
    path.write_text(policy_toml([portal, ORCHESTRATOR]))
    policy = load_policy(path)
    account = policy.account("deploy-portal")
    assert account is not None
    assert account.roles == {Role.DELEGATOR}
    assert account.scopes == (Scope("acme", "*", "*"),)
    assert account.keys[0].alg == "ES256" and account.keys[0].kid == "k1"
    assert account.permissions.as_dict() == {"artifacts": "read", "pipelines": "execute"}
    delegation = account.delegation
    assert delegation.user_domains == {"example.com"}
    assert delegation.asserted_identities and delegation.asserted_domains == {
        "contractors.example.com"
    }
    assert delegation.max_chain_depth == 2
    file_idp, url_idp = delegation.identity_providers
    assert json.loads(file_idp.jwks_json)["keys"][0]["kid"] == "i1"
    assert url_idp.jwks_url == "https://login.example.org/keys"
    assert policy.account_for_certificate(("portal.acme.example",)) is account
    orchestrator = policy.account("ci-orchestrator")
    assert orchestrator is not None and orchestrator.delegation.max_chain_depth == 4


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    text = """\
[accounts.ci]
roles = ["orchestator"]
scope = ["acme/*/*"]
keys = [{ pem = "-----BEGIN PRIVATE KEY-----\\nMII\\n-----END PRIVATE KEY-----" }]
permissions = { artifacts = "execute" }

[accounts."bad name!"]
roles = ["auditor"]
scopes = ["acme/*"]
certificate_sans = ["spiffe://x"]

[accounts.portal]
roles = ["delegator"]
scopes = ["acme/*/*"]
certificate_sans = ["spiffe://x"]
[accounts.portal.delegation]
asserted_identities = true
max_chain_depth = 0
[[accounts.portal.delegation.identity_providers]]
issuer = "http://idp.example.com"
audience = "p"
jwks_file = "missing.json"
"""
    found = problems(tmp_path, text)
    expected = [
        "accounts.ci.scope: unknown key (did you mean 'scopes'?)",
        "accounts.ci.roles[0]: unknown role 'orchestator'",
        "accounts.ci.keys[0].pem: is a private key; the policy holds only public keys",
        "accounts.ci.permissions.artifacts: level must be one of: none, read, write, admin",
        "accounts.bad name!: account names are",
        "accounts.bad name!.scopes[0]: 'acme/*' is not ORG/PROJECT/PIPELINE",
        "accounts.bad name!.scopes: required for role auditor",
        "accounts.portal.delegation.identity_providers[0].issuer: "
        "'http://idp.example.com' must be an https:// URL",
        "accounts.portal.delegation.identity_providers[0].jwks_file: cannot read",
        "accounts.portal.delegation.asserted_domains: required when asserted_identities = true",
        "accounts.portal.delegation.max_chain_depth: must be a whole number from 1 to 16",
        "accounts.portal.certificate_sans: 'spiffe://x' is already mapped to account 'bad name!'",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), f"{start!r} not in {found}"
    assert len(found) == len(expected), found


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("accounts = 3", "accounts: required: at least one [accounts.NAME] table"),
        ("[accounts.x\n", "not valid TOML"),
        ('version = 2\n[accounts.x]\nroles=["admin"]\ncertificate_sans=["a.b"]', "version: must"),
        ('[accounts.x]\nroles = ["admin"]', "accounts.x: needs 'keys' or 'certificate_sans'"),
        (
            '[accounts.x]\nroles=["admin"]\nkeys=[{jwk={kty="oct", k="c2VjcmV0"}}]',
            "accounts.x.keys[0].jwk: is a private or symmetric JWK",
        ),
        (
            '[accounts.x]\nroles=["auditor"]\nscopes=["a/*/*"]\ncertificate_sans=["a.b"]\n'
            "[accounts.x.delegation]\n",
            "accounts.x.delegation: only accounts with role delegator",
        ),
        (
            '[accounts.token-broker]\nroles=["admin"]\ncertificate_sans=["a.b"]',
            "accounts.token-broker: 'token-broker' is reserved",
        ),
        (
            '[accounts.x]\nroles=["admin"]\nkeys=[{file="nope.pem"}]',
            "accounts.x.keys[0].file: cannot read",
        ),
    ],
)
def test_invalid_policy_says_where_and_why(tmp_path: Path, text: str, problem: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(problem) for p in found), found


def test_keys_load_from_jwk_and_from_files_relative_to_the_policy(tmp_path: Path) -> None:

    ec_jwk = json.loads(ECAlgorithm.to_jwk(ORCHESTRATOR.key.public_key()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "rsa.json").write_text(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    (tmp_path / "keys" / "ed.pem").write_text(public_pem(ed25519.Ed25519PrivateKey.generate()))
    jwk_toml = ", ".join(f'{k} = "{v}"' for k, v in ec_jwk.items())
    (tmp_path / "policy.toml").write_text(
        f"""\
[accounts.multi]
roles = ["admin"]
keys = [
  {{ kid = "ec", jwk = {{ {jwk_toml} }} }},
  {{ kid = "rsa", file = "keys/rsa.json" }},
  {{ kid = "ed", file = "keys/ed.pem" }},
]
"""
    )
    account = load_policy(tmp_path / "policy.toml").account("multi")
    assert account is not None
    assert [(k.kid, k.alg) for k in account.keys] == [
        ("ec", "ES256"),
        ("rsa", "RS256"),
        ("ed", "EdDSA"),
    ]


@pytest.mark.parametrize(
    ("scope", "target", "covered"),
    [
        ("acme/*/*", PipelineRef("acme", "payments", "deploy"), True),
        ("acme/payments/*", PipelineRef("acme", "web", "deploy"), False),
        ("acme/payments/*", PipelineRef("acme", "payments", "*"), True),
        ("acme/*/*", PipelineRef("acme", "*", "*"), True),
        ("acme/payments/*", PipelineRef("acme", "*", "*"), False),
        ("*/*/*", PipelineRef("*", "*", "*"), True),
        ("acme/*/deploy", PipelineRef("acme", "web", "deploy"), True),
        ("acme/*/deploy", PipelineRef("acmecorp", "web", "deploy"), False),
    ],
)
def test_scope_covers_pipelines_and_selections_within_it(
    scope: str, target: PipelineRef, covered: bool
) -> None:
    assert Scope.parse(scope).covers(target) is covered


# --- the development policy ---------------------------------------------------------


def test_first_start_without_a_policy_writes_a_dev_policy_and_key_a_local_client_uses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    server = create_server(make_settings(data))
    server.start()
    try:
        for name in (dev.POLICY_FILE, dev.KEY_FILE, DEV_CLIENT_FILE):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
        assert "created a DEVELOPMENT policy" in caplog.text
        assert (data / dev.KEY_FILE).read_text() not in caplog.text
        with local_channel(server.target, dev_admin_credentials(data)) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            run = stub.StartRun(start_run_request(), timeout=5).run
            assert run.triggered_via == dev.ACCOUNT
            events = list(
                stub.StreamAudit(broker_pb2.StreamAuditRequest(stop_at_head=True), timeout=5)
            )
            actions = [e.event.action for e in events]
            assert actions == ["policy.loaded", "key.created", "run.started"]
    finally:
        server.stop(grace=0.5)
    key_before = (data / dev.KEY_FILE).read_bytes()
    again = create_server(make_settings(data))
    again.stop(grace=0)
    assert (data / dev.KEY_FILE).read_bytes() == key_before, "reused, not replaced"


def test_invalid_policy_at_start_opens_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('[accounts.x]\nroles = ["root"]')
    with pytest.raises(PolicyError):
        build_broker(make_settings(tmp_path / "data", policy=bad))
    assert not (tmp_path / "data").exists()


# --- reloading ----------------------------------------------------------------------


def _audit_details(callers: Callers, action: str) -> list[dict[str, object]]:
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(actions=[action]), stop_at_head=True
    )
    items = callers.stub(ROOT).StreamAudit(request, timeout=5)
    return [json_format.MessageToDict(i.event.details) for i in items if i.HasField("event")]


def test_reload_under_concurrent_load_loses_no_call_and_a_broken_file_keeps_the_old_policy(
    tmp_path: Path,
) -> None:
    base = list(standard_accounts().values())
    newcomer = new_account("newcomer", ["orchestrator"])
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy_toml(base))
    settings = make_settings(tmp_path / "data", store="memory", policy=policy_path)
    server = create_server(settings)
    server.start()
    failures: list[BaseException] = []
    calls = [0]
    stop = threading.Event()
    try:
        with callers_of(server) as callers:
            stub = callers.stub(ORCHESTRATOR)

            def load() -> None:
                while not stop.is_set():
                    try:
                        run_id = stub.StartRun(start_run_request(), timeout=5).run.run_id
                        stub.GetRun(broker_pb2.GetRunRequest(run_id=run_id), timeout=5)
                        calls[0] += 2
                    except BaseException as exc:
                        failures.append(exc)
                        return

            workers = [threading.Thread(target=load) for _ in range(3)]
            for worker in workers:
                worker.start()
            for i in range(20):
                policy_path.write_text(policy_toml(base + ([newcomer] if i % 2 else [])))
                assert server.broker.policy.reload()
                time.sleep(0.01)
            policy_path.write_text(policy_toml([*base, newcomer]) + "\n[accounts.broken\n")
            assert not server.broker.policy.reload()
            time.sleep(0.05)
            stop.set()
            for worker in workers:
                worker.join(timeout=10)
            assert not failures, failures
            assert calls[0] > 0
            kept = server.broker.policy.current()
            assert kept.account("newcomer") is not None, "the last good policy stays"
            callers.stub(newcomer).StartRun(start_run_request(), timeout=5)
            (failed,) = _audit_details(callers, "policy.reload_failed")
            assert "not valid TOML" in str(failed["problems"])
            assert failed["kept_sha256"] == kept.sha256
            loaded = _audit_details(callers, "policy.loaded")
            assert len(loaded) == 21  # the start, then each good reload
    finally:
        stop.set()
        server.stop(grace=0.5)


@pytest.mark.slow
def test_sighup_reloads_the_policy_of_a_running_broker(tmp_path: Path) -> None:
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy_toml([ROOT]))
    args = ["--policy", str(policy_path), "--issuer", "https://broker.test"]
    broker = start_broker_process(tmp_path / "data", args)
    try:
        newcomer = new_account("newcomer", ["orchestrator"])
        policy_path.write_text(policy_toml([ROOT, newcomer]))
        os.kill(broker.process.pid, signal.SIGHUP)
        eventually(lambda: broker.logs().count('"policy loaded"') >= 2, what="a reload")
        policy_path.write_text("[accounts.broken\n")
        os.kill(broker.process.pid, signal.SIGHUP)
        eventually(lambda: "policy reload failed" in broker.logs(), what="a failed reload")
        as_newcomer = assertion_credentials(
            newcomer.name, newcomer.private_pem, "https://broker.test", key_id=newcomer.kid
        )
        with local_channel(broker.target, as_newcomer) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            assert stub.StartRun(start_run_request(), timeout=5).run.triggered_via == "newcomer"
        as_root = assertion_credentials(ROOT.name, ROOT.private_pem, "https://broker.test")
        with local_channel(broker.target, as_root) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            request = broker_pb2.StreamAuditRequest(stop_at_head=True)
            actions = [i.event.action for i in stub.StreamAudit(request, timeout=5)]
        assert actions == [
            "policy.loaded",
            "key.created",
            "policy.loaded",
            "policy.reload_failed",
            "run.started",
        ]
        assert not (tmp_path / "data" / dev.POLICY_FILE).exists()
    finally:
        assert broker.terminate_and_wait() == 0


@pytest.mark.slow
def test_serve_with_an_invalid_policy_exits_with_the_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[accounts.ci]\nroles = ["orchestator"]\ncertificate_sans = ["ci.example"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--policy", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert f"{bad}: accounts.ci.roles[0]: unknown role 'orchestator'" in result.stderr


def test_the_readme_policy_example_is_valid(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Who may call what") :]
    example = section[section.index("```toml\n") + 8 :]
    example = example[: example.index("```")]
    siem = json.loads(ECAlgorithm.to_jwk(ORCHESTRATOR.key.public_key()))
    example = example.replace('x = "…", y = "…"', f'x = "{siem["x"]}", y = "{siem["y"]}"')
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "deploy-portal.pub.pem").write_text(public_pem(ROOT.key))
    (tmp_path / "policy.toml").write_text(example)
    policy = load_policy(tmp_path / "policy.toml")
    assert sorted(policy.accounts) == [
        "ci-orchestrator",
        "deploy-portal",
        "ops",
        "orders-api",
        "siem",
    ]


def test_the_readme_policy_example_as_written_names_its_placeholder_key_and_nothing_else(
    tmp_path: Path,
) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Who may call what") :]
    example = section[section.index("```toml\n") + 8 :]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "deploy-portal.pub.pem").write_text(public_pem(ROOT.key))
    found = problems(tmp_path, example[: example.index("```")])
    assert found == [
        "accounts.siem.keys[0].jwk: is not a usable JWK (Coords should be 32 bytes for curve P-256)"
    ]


@pytest.mark.parametrize(
    "jwk",
    [
        'kty = "EC", crv = "P-256", x = "…", y = "…"',
        'kty = "EC", crv = "P-256", x = 5, y = true',
        'kty = "EC", crv = "P-999", x = "AA", y = "AA"',
        'kty = "EC"',
        'kty = "RSA", n = "…", e = "AQAB"',
        'kty = "OKP", crv = "Ed25519", x = "AAAA"',
        'kty = "OKP", crv = "X25519", x = "AAAA"',
        'kty = "nope"',
        "kty = [1]",
        'kty = "EC", crv = "P-256", x = "AA", y = "AA", alg = "HS256"',
        'kty = "EC", crv = "P-256", x = "AA", y = "AA", alg = 5',
    ],
)
def test_every_malformed_jwk_is_a_problem_at_its_key_path_beside_the_others(
    tmp_path: Path, jwk: str
) -> None:
    found = problems(
        tmp_path,
        f'[accounts.x]\nroles = ["admin"]\nkeys = [{{ jwk = {{ {jwk} }} }}]\n'
        '[accounts.y]\nroles = ["auditr"]\ncertificate_sans = ["y.example"]\n',
    )
    assert len(found) == 2, found
    assert found[0].startswith("accounts.x.keys[0].jwk: is not a usable JWK ("), found
    assert len(found[0]) < 200 and "{" not in found[0], "short, without the key echoed"
    assert found[1].startswith("accounts.y.roles[0]: unknown role 'auditr'")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("-----BEGIN PUBLIC KEY-----\n…\n-----END PUBLIC KEY-----\n", "is not a PEM public key"),
        ('{"kty": 1}', "is not a usable JWK"),
        ("[1, 2]", "is not a PEM public key"),
        ("{", "is neither PEM nor JSON"),
        ("\xff\xfe", "is not a PEM public key"),
    ],
)
def test_a_malformed_key_file_is_named_with_its_path(
    tmp_path: Path, content: str, problem: str
) -> None:
    (tmp_path / "bad.key").write_text(content)
    [found] = problems(tmp_path, '[accounts.x]\nroles = ["admin"]\nkeys = [{ file = "bad.key" }]')
    assert found.startswith(f"accounts.x.keys[0].file: {tmp_path / 'bad.key'}: {problem}"), found


def test_a_key_file_too_large_to_be_a_key_is_refused_without_reading_it_all(
    tmp_path: Path,
) -> None:
    [found] = problems(tmp_path, '[accounts.x]\nroles = ["admin"]\nkeys = [{ file = "/dev/zero" }]')
    assert found == "accounts.x.keys[0].file: /dev/zero is larger than 1024 KiB"


def test_an_identity_provider_url_that_cannot_be_parsed_is_a_problem(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[accounts.p]\nroles = ["delegator"]\nscopes = ["a/*/*"]\ncertificate_sans = ["p.a"]\n'
        "[[accounts.p.delegation.identity_providers]]\n"
        'issuer = "https://[::1"\naudience = "p"\njwks_url = "https://idp.example/jwks"\n',
    )
    assert found == [
        "accounts.p.delegation.identity_providers[0].issuer: 'https://[::1' is not a URL"
    ]
