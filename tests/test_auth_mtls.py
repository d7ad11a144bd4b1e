"""mTLS: a client certificate from --client-ca names the caller through its URI or DNS SAN."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from tests.accounts import new_account, sign_assertion, standard_accounts, write_policy
from tests.certs import Issued, dns, issue, new_ca, server_cert, uri
from tests.conftest import make_settings
from tests.support import details, rpc_error, start_run_request
from tokenbroker.credentials import bearer_credentials, tls_channel
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

Stub = broker_pb2_grpc.TokenBrokerServiceStub
ORCHESTRATOR_SPIFFE = "spiffe://acme.example/ns/ci/sa/orchestrator"
AUDITOR_DNS = "siem.acme.example"


@dataclass
class Pki:
    server: BrokerServer
    ca: Issued
    channels: list[grpc.Channel]

    def stub(self, client: Issued | None, credentials: grpc.CallCredentials | None = None) -> Stub:
        channel = tls_channel(
            self.server.target,
            credentials,
            root_certificates=self.ca.cert_pem,
            private_key=client.key_pem if client else None,
            certificate_chain=client.cert_pem if client else None,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        self.channels.append(channel)
        return Stub(channel)

    def client(self, *sans: str) -> Issued:
        names = [uri(s) if "://" in s else dns(s) for s in sans]
        return issue("client", names, self.ca)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca = new_ca()
    cert_path, key_path = server_cert(ca).write(tmp_path, "server")
    ca_path = tmp_path / "client-ca.pem"
    ca_path.write_bytes(ca.cert_pem)
    orchestrator = new_account(
        "ci-orchestrator", ["orchestrator"], certificate_sans=(ORCHESTRATOR_SPIFFE,)
    )
    auditor = new_account("siem", ["auditor"], ["*/*/*"], certificate_sans=(AUDITOR_DNS,))
    policy = write_policy(
        tmp_path / "policy.toml", [orchestrator, auditor, standard_accounts()["root"]]
    )
    settings = make_settings(
        tmp_path / "data",
        store="memory",
        policy=policy,
        tls_cert=cert_path,
        tls_key=key_path,
        client_ca=ca_path,
    )
    server = create_server(settings)
    server.start()
    made = Pki(server, ca, [])
    try:
        yield made
    finally:
        for channel in made.channels:
            channel.close()
        server.stop(grace=0.5)


def _denials(pki: Pki) -> list[str]:
    auditor = pki.stub(pki.client(AUDITOR_DNS))
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(actions=["authn.denied"]), stop_at_head=True
    )
    return [str(i.event.details["reason"]) for i in auditor.StreamAudit(request, timeout=5)]


def test_certificate_uri_san_maps_to_its_service_account(pki: Pki) -> None:
    stub = pki.stub(pki.client(ORCHESTRATOR_SPIFFE, "ignored.example"))
    run = stub.StartRun(start_run_request(), timeout=5).run
    assert run.triggered_via == "ci-orchestrator"


def test_certificate_dns_san_maps_to_its_service_account(pki: Pki) -> None:
    stub = pki.stub(pki.client(AUDITOR_DNS))
    request = broker_pb2.StreamAuditRequest(stop_at_head=True)
    actions = [i.event.action for i in stub.StreamAudit(request, timeout=5)]
    assert actions == ["policy.loaded", "key.created"]


def test_valid_certificate_mapped_to_no_account_is_unauthenticated_and_audited(pki: Pki) -> None:
    stub = pki.stub(pki.client("spiffe://acme.example/ns/ci/sa/unknown"))
    error = rpc_error(lambda: stub.StartRun(start_run_request(), timeout=5))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert details(error) == (
        "client certificate spiffe://acme.example/ns/ci/sa/unknown "
        "is not mapped to any service account"
    )
    assert _denials(pki) == [details(error)]


def test_certificate_from_an_unknown_ca_is_refused_at_the_handshake(pki: Pki) -> None:
    stranger = issue("client", [uri(ORCHESTRATOR_SPIFFE)], new_ca("someone else's CA"))
    stub = pki.stub(stranger)
    error = rpc_error(lambda: stub.StartRun(start_run_request(), timeout=5))
    # gRPC verifies the chain before any call exists: the client cannot even connect.
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert _denials(pki) == [], "nothing reached the broker"


def test_connection_without_a_client_certificate_is_refused(pki: Pki) -> None:
    error = rpc_error(lambda: pki.stub(None).StartRun(start_run_request(), timeout=5))
    assert error.code() is grpc.StatusCode.UNAVAILABLE


def test_a_bearer_credential_names_the_caller_over_a_certificate(pki: Pki) -> None:
    root = standard_accounts()["root"]
    token = sign_assertion(root, pki.server.broker.authn.audience)
    stub = pki.stub(pki.client(ORCHESTRATOR_SPIFFE), bearer_credentials(token))
    assert stub.StartRun(start_run_request(), timeout=5).run.triggered_via == "root"


def test_a_step_token_bound_to_the_client_certificate_needs_that_certificate(pki: Pki) -> None:
    from cryptography import x509 as x509_
    from cryptography.hazmat.primitives import serialization

    from tokenbroker.dpop import certificate_thumbprint

    client = pki.client(ORCHESTRATOR_SPIFFE)
    stub = pki.stub(client)
    run = stub.StartRun(start_run_request()).run
    issued = stub.IssueToken(
        broker_pb2.IssueTokenRequest(
            run_id=run.run_id, audience="api.example.com", bind_client_certificate=True
        )
    )
    der = x509_.load_pem_x509_certificate(client.cert_pem).public_bytes(serialization.Encoding.DER)
    assert issued.cnf_x5t_s256 == certificate_thumbprint(der)

    def verdict(thumbprint: str) -> int:
        request = broker_pb2.VerifyTokenRequest(
            token=issued.token, certificate_thumbprint=thumbprint
        )
        return stub.VerifyToken(request).status

    assert verdict(issued.cnf_x5t_s256) == broker_pb2.TOKEN_STATUS_ACTIVE
    other = pki.client(ORCHESTRATOR_SPIFFE).cert_pem
    other_der = x509_.load_pem_x509_certificate(other).public_bytes(serialization.Encoding.DER)
    assert (
        verdict(certificate_thumbprint(other_der)) == broker_pb2.TOKEN_STATUS_CERTIFICATE_MISMATCH
    )
    assert verdict("") == broker_pb2.TOKEN_STATUS_CERTIFICATE_MISMATCH
