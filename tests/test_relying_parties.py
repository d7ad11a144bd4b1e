"""Issue 20 item 5: would AWS, GCP, Azure, Vault and Fulcio accept a broker token as it is?

A real broker process serves discovery and JWKS on its HTTP port; each relying party's
published checks (tests/relying_parties.py, with the documents they follow) fetch discovery
over the issuer's own scheme, cache the JWKS with PyJWKClient and then apply their trust
rules. Every acceptance has its refusal beside it: another organisation's token, another
audience, another environment, a role that forgot to bind its audience.

Two orgs share the subject template `org:{org_id}/{project_id}/{pipeline_id}/{environment:10}`
(acme's id is pinned to 1001, globex's to 2002); initech has none and gets the built-in
default.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.accounts import policy_toml, standard_accounts
from tests.certs import new_ca, server_cert
from tests.relying_parties import (
    AZURE_AUDIENCE,
    FULCIO_CLIENT_ID,
    OidcProvider,
    Refused,
    aws_assume_role_with_web_identity,
    azure_federated_credential,
    fulcio_identity,
    gcp_exchange,
    vault_jwt_login,
)
from tests.support import BrokerProcess, perms, pipeline, start_broker_process
from tokenbroker.credentials import assertion_credentials, local_channel
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

STS = "sts.amazonaws.com"
GCP_AUDIENCE = (
    "https://iam.googleapis.com/projects/123456789/locations/global/"
    "workloadIdentityPools/ci/providers/token-broker"
)
VAULT = "https://vault.example.com"
TEMPLATE = "org:{org_id}/{project_id}/{pipeline_id}/{environment:10}"
ACME = types_pb2.PipelineIds(org_id="1001", project_id="11", pipeline_id="111")
GLOBEX = types_pb2.PipelineIds(org_id="2002", project_id="22", pipeline_id="222")
ACME_SUB = "org:1001/11/111/prod"

FEDERATION = f"""
[federation.claims.team]
from = "input.team"
pattern = "[a-z][a-z0-9-]{{0,31}}"
max_length = 32

[federation.aws_session_tags]
audiences = ["{STS}"]
tags = {{ OrgId = "org_id", Env = "environment", Team = "team" }}
transitive = ["OrgId"]

[federation.orgs.acme]
org_id = "1001"
subject = "{TEMPLATE}"

[federation.orgs.globex]
org_id = "2002"
subject = "{TEMPLATE}"
"""


class Broker:
    """The broker process as a pipeline sees it: runs started by root, tokens per audience."""

    def __init__(self, process: BrokerProcess, issuer: str) -> None:
        self.process = process
        self.issuer = issuer
        root = standard_accounts()["root"]
        credentials = assertion_credentials(root.name, root.private_pem, issuer, key_id=root.kid)
        self.channel = local_channel(process.target, credentials)
        self.stub = broker_pb2_grpc.TokenBrokerServiceStub(self.channel)

    def token(
        self,
        audience: str,
        org: str = "acme",
        ids: types_pb2.PipelineIds | None = ACME,
        environment: str = "prod",
        project: str = "web",
        name: str = "deploy",
        **inputs: str,
    ) -> str:
        started = self.stub.StartRun(
            broker_pb2.StartRunRequest(
                pipeline=pipeline(org, project, name),
                permission_ceiling=perms(artifacts="read"),
                pipeline_ids=ids,
                environment=environment,
                inputs=inputs,
            ),
            timeout=10,
        )
        issued = self.stub.IssueToken(
            broker_pb2.IssueTokenRequest(
                run_id=started.run.run_id, audience=audience, permissions=perms(artifacts="read")
            ),
            timeout=10,
        )
        return str(issued.token)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], ssl.SSLContext | None]:
    """HTTPS as a cloud requires (`--http-tls-cert`), with a test CA the relying parties
    trust: the announced issuer is then an https:// URL."""
    ca = new_ca()
    cert, key = server_cert(ca).write(tmp_path_factory.mktemp("tls"), "http")
    trusting = ssl.create_default_context(cadata=ca.cert_pem.decode())
    return ["--http-tls-cert", str(cert), "--http-tls-key", str(key)], trusting


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, tls: tuple[list[str], ssl.SSLContext | None]
) -> Iterator[Broker]:
    directory = tmp_path_factory.mktemp("rp")
    process = start_broker_process(
        directory / "data", ["--policy", str(_policy(directory)), *tls[0]]
    )
    running = Broker(process, _logged_issuer(process))
    try:
        yield running
    finally:
        running.channel.close()
        process.terminate_and_wait()


def _logged_issuer(process: BrokerProcess) -> str:
    for line in process.logs().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("msg") == "token-broker serving":
            return str(entry["issuer"])
    raise AssertionError("the broker logged no issuer")


@pytest.fixture(scope="module")
def provider(broker: Broker, tls: tuple[list[str], ssl.SSLContext | None]) -> OidcProvider:
    """Discovery fetched once over the issuer's scheme (http or https), keys cached."""
    return OidcProvider(broker.issuer, tls[1])


def test_discovery_is_fetched_over_https_and_names_that_issuer(
    broker: Broker, provider: OidcProvider
) -> None:
    assert provider.discovery["issuer"] == broker.issuer
    assert broker.issuer.startswith("https://") and provider.ssl_context is not None
    assert provider.discovery["jwks_uri"].startswith(broker.issuer + "/")
    assert "ES256" in provider.discovery["id_token_signing_alg_values_supported"]
    assert {"sub", "aud", "org_id", "pipeline_id", "environment"} <= set(
        provider.discovery["claims_supported"]
    )


def test_the_jwks_is_fetched_once_and_cached_across_tokens(
    broker: Broker, provider: OidcProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = OidcProvider(broker.issuer, provider.ssl_context)
    fetches: list[int] = []
    fetch = fresh.keys.fetch_data

    def counted() -> Any:
        fetches.append(1)
        return fetch()

    monkeypatch.setattr(fresh.keys, "fetch_data", counted)
    for _ in range(3):
        fresh.verify(broker.token(STS), STS)
    assert len(fetches) == 1


# --- AWS -----------------------------------------------------------------------------------


def _aws_trust_policy(host: str, sub: str, org_id: str, tag_session: bool = True) -> Any:
    actions = ["sts:AssumeRoleWithWebIdentity"] + (["sts:TagSession"] if tag_session else [])
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": f"arn:aws:iam::111122223333:oidc-provider/{host}"},
                "Action": actions,
                "Condition": {
                    "StringEquals": {f"{host}:aud": STS, "aws:RequestTag/OrgId": org_id},
                    "StringLike": {f"{host}:sub": sub},
                },
            }
        ],
    }


def _assume(provider: OidcProvider, token: str, policy: Any) -> Any:
    return aws_assume_role_with_web_identity(
        provider,
        token,
        client_ids=[STS],
        role_arn="arn:aws:iam::111122223333:role/acme-deploy",
        trust_policy=policy,
    )


def test_aws_assumes_the_role_for_its_org_with_session_tags(
    broker: Broker, provider: OidcProvider
) -> None:
    host = broker.issuer.split("://", 1)[1]
    policy = _aws_trust_policy(host, "org:1001/*", "1001")
    session = _assume(provider, broker.token(STS, team="payments"), policy)
    assert session.subject == ACME_SUB
    assert dict(session.principal_tags) == {"OrgId": "1001", "Env": "prod", "Team": "payments"}
    assert session.transitive_tag_keys == ("OrgId",)


def test_aws_refuses_another_orgs_token_another_audience_and_a_role_without_tag_session(
    broker: Broker, provider: OidcProvider
) -> None:
    host = broker.issuer.split("://", 1)[1]
    policy = _aws_trust_policy(host, "org:1001/*", "1001")
    globex = broker.token(STS, org="globex", ids=GLOBEX)
    with pytest.raises(Refused, match="Not authorized"):
        _assume(provider, globex, policy)
    # globex's token cannot pass by its tags either: the trust policy pins both sub and tag.
    with pytest.raises(Refused, match="Not authorized"):
        _assume(provider, globex, _aws_trust_policy(host, "org:*", "1001"))
    with pytest.raises(Refused, match="Audience"):
        _assume(provider, broker.token("api.example.com"), policy)
    with pytest.raises(Refused, match="Not authorized"):
        _assume(provider, broker.token(STS), _aws_trust_policy(host, "org:1001/*", "1001", False))


def test_no_org_can_borrow_another_orgs_pinned_id_to_pass_its_trust_policy(
    broker: Broker,
) -> None:
    """The trust policies below key on org ids: the broker refuses to start a run of acme
    claiming globex's id (or any id but acme's own), so no token ever carries one."""
    for ids in (GLOBEX, types_pb2.PipelineIds(org_id="3003", project_id="22", pipeline_id="222")):
        with pytest.raises(grpc.RpcError) as refused:
            broker.token(STS, org="acme", ids=ids)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- GCP -----------------------------------------------------------------------------------

GCP_MAPPING = {
    "google.subject": "assertion.sub",
    "attribute.org_id": "assertion.org_id",
    "attribute.environment": "assertion.environment",
}
GCP_CONDITION = "assertion.org_id == '1001' && attribute.environment == 'prod'"


def test_gcp_maps_a_subject_of_at_most_127_bytes_and_its_condition_admits_the_org(
    broker: Broker, provider: OidcProvider
) -> None:
    attributes = gcp_exchange(
        provider,
        broker.token(GCP_AUDIENCE),
        allowed_audiences=[GCP_AUDIENCE],
        attribute_mapping=GCP_MAPPING,
        attribute_condition=GCP_CONDITION,
    )
    assert attributes["google.subject"] == ACME_SUB
    assert attributes["attribute.org_id"] == "1001"


def test_gcp_refuses_another_org_another_environment_and_another_audience(
    broker: Broker, provider: OidcProvider
) -> None:
    def exchange(token: str) -> Any:
        return gcp_exchange(
            provider,
            token,
            allowed_audiences=[GCP_AUDIENCE],
            attribute_mapping=GCP_MAPPING,
            attribute_condition=GCP_CONDITION,
        )

    with pytest.raises(Refused, match="attribute condition"):
        exchange(broker.token(GCP_AUDIENCE, org="globex", ids=GLOBEX))
    with pytest.raises(Refused, match="attribute condition"):
        exchange(broker.token(GCP_AUDIENCE, environment="staging"))
    with pytest.raises(Refused, match="Audience"):
        exchange(broker.token(STS))


def test_gcp_refuses_the_run_subject_of_long_names_which_is_why_ids_or_templates(
    broker: Broker, provider: OidcProvider
) -> None:
    """initech has no template and sends no ids: its subject is the run's, `run:` + names +
    run id, which long names push past GCP's 127 bytes."""
    token = broker.token(GCP_AUDIENCE, org="initech", ids=None, project="p" * 60, name="d" * 30)
    with pytest.raises(Refused, match=r"google\.subject is 1[3-9][0-9] bytes; at most 127"):
        gcp_exchange(
            provider,
            token,
            allowed_audiences=[GCP_AUDIENCE],
            attribute_mapping={"google.subject": "assertion.sub"},
        )


# --- Azure ---------------------------------------------------------------------------------


def test_azure_matches_issuer_subject_and_audience_exactly(
    broker: Broker, provider: OidcProvider
) -> None:
    credential = {"issuer": broker.issuer, "subject": ACME_SUB, "audiences": [AZURE_AUDIENCE]}
    assert azure_federated_credential(provider, broker.token(AZURE_AUDIENCE), credential)
    globex = broker.token(AZURE_AUDIENCE, org="globex", ids=GLOBEX)
    with pytest.raises(Refused, match="AADSTS700213"):
        azure_federated_credential(provider, globex, credential)
    with pytest.raises(Refused, match="AADSTS700213"):
        azure_federated_credential(
            provider, broker.token(AZURE_AUDIENCE, environment="dev"), credential
        )
    upper = {**credential, "subject": ACME_SUB.upper()}
    with pytest.raises(Refused, match="AADSTS700213"):
        azure_federated_credential(provider, broker.token(AZURE_AUDIENCE), upper)
    with pytest.raises(Refused, match="Audience"):
        azure_federated_credential(provider, broker.token(STS), credential)


# --- Vault ---------------------------------------------------------------------------------

VAULT_ROLE = {
    "role_type": "jwt",
    "bound_audiences": [VAULT],
    "bound_claims_type": "glob",
    "bound_claims": {"org_id": "1001", "environment": "prod*"},
    "bound_subject": "",
    "user_claim": "sub",
    "claim_mappings": {"pipeline_id": "pipeline_id", "environment": "environment"},
}


def test_vault_logs_the_orgs_pipeline_in_with_glob_bound_claims(
    broker: Broker, provider: OidcProvider
) -> None:
    metadata = vault_jwt_login(provider, broker.token(VAULT), VAULT_ROLE)
    assert metadata == {"pipeline_id": "111", "environment": "prod"}
    pinned = {**VAULT_ROLE, "bound_subject": ACME_SUB}
    assert vault_jwt_login(provider, broker.token(VAULT), pinned)


def test_vault_refuses_another_org_another_environment_and_an_unbound_audience(
    broker: Broker, provider: OidcProvider
) -> None:
    with pytest.raises(Refused, match="'org_id' does not match"):
        vault_jwt_login(provider, broker.token(VAULT, org="globex", ids=GLOBEX), VAULT_ROLE)
    with pytest.raises(Refused, match="'environment' does not match"):
        vault_jwt_login(provider, broker.token(VAULT, environment="staging"), VAULT_ROLE)
    with pytest.raises(Refused, match="does not match any bound audience"):
        vault_jwt_login(provider, broker.token("https://other.example.com"), VAULT_ROLE)
    # Vault >= 1.17: a role that binds no audience refuses every token that carries one.
    unbound = {**VAULT_ROLE, "bound_audiences": []}
    with pytest.raises(Refused, match="no audiences bound to the role"):
        vault_jwt_login(provider, broker.token(VAULT), unbound)


# --- Fulcio --------------------------------------------------------------------------------


def test_fulcio_finds_every_claim_it_needs_and_no_subject_is_shared_across_orgs(
    broker: Broker, provider: OidcProvider
) -> None:
    seen: dict[str, str] = {}
    identities = set()
    for org, ids in (("acme", ACME), ("globex", GLOBEX), ("initech", None)):
        for environment in ("prod", "dev"):
            for _ in range(2):  # the same pipeline again: the same identity, same org
                token = broker.token(FULCIO_CLIENT_ID, org=org, ids=ids, environment=environment)
                identities.add(fulcio_identity(provider, token, seen, org))
    assert len({seen[i] for i in identities}) == 3
    assert f"{broker.issuer}#{ACME_SUB}" in identities


def test_fulcio_check_refuses_an_identity_reused_by_another_org_and_a_foreign_audience(
    broker: Broker, provider: OidcProvider
) -> None:
    token = broker.token(FULCIO_CLIENT_ID)
    seen = {f"{broker.issuer}#{ACME_SUB}": "globex"}  # as if globex had had it first
    with pytest.raises(Refused, match="already issued to another organisation"):
        fulcio_identity(provider, token, seen, "acme")
    with pytest.raises(Refused, match="Audience"):
        fulcio_identity(provider, broker.token(STS), {}, "acme")


def test_a_token_signed_by_another_broker_fails_the_signature_check_they_all_share(
    broker: Broker, provider: OidcProvider, tmp_path: Path
) -> None:
    """A second broker signs with its own keys: the first broker's JWKS cannot verify it."""
    other = start_broker_process(tmp_path / "other", ["--policy", str(_policy(tmp_path))])
    # Over plain HTTP is fine: the impostor's token is only presented, never its discovery.
    try:
        impostor = Broker(other, _logged_issuer(other))
        try:
            token = impostor.token(STS)
        finally:
            impostor.channel.close()
    finally:
        other.terminate_and_wait()
    with pytest.raises(Refused, match="Unable to find a signing key"):
        provider.verify(token, STS)


def _policy(directory: Path) -> Path:
    path = directory / "policy.toml"
    path.write_text(policy_toml(standard_accounts().values()) + FEDERATION)
    return path
