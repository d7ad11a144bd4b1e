"""Discovery a cloud can reach: the HTTP port over TLS (certificates from a test CA), the
issuer an https:// URL, and the discovery document a relying party reads."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from broker.api.server import BrokerServer, create_server
from broker.settings import Settings, SettingsError
from tests.accounts import callers_of, standard_accounts
from tests.certs import Issued, new_ca, server_cert
from tests.conftest import make_settings, standard_policy
from tests.support import start_run_request
from tokenbroker.v1 import broker_pb2

# What AWS, GCP, Azure and Vault read, as GitHub's and GitLab's issuers publish it.
RELYING_PARTY_FIELDS = {
    "issuer",
    "jwks_uri",
    "response_types_supported",
    "subject_types_supported",
    "id_token_signing_alg_values_supported",
    "claims_supported",
    "scopes_supported",
}


@pytest.fixture(scope="module")
def ca() -> Issued:
    return new_ca()


@pytest.fixture
def https(tmp_path: Path, ca: Issued) -> Iterator[BrokerServer]:
    cert, key = server_cert(ca).write(tmp_path, "http")
    policy = standard_policy(tmp_path)
    policy.write_text(
        policy.read_text() + '\n[audiences."sts.amazonaws.com"]\nalgorithm = "RS256"\n'
    )
    settings = make_settings(
        tmp_path / "data",
        policy=policy,
        http_listen="127.0.0.1:0",
        http_tls_cert=cert,
        http_tls_key=key,
    )
    running = create_server(settings)
    running.start()
    yield running
    running.stop(grace=0.5)


def trusting(ca: Issued) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.cert_pem.decode())


def get_json(url: str, context: ssl.SSLContext) -> Any:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        assert response.headers["Content-Type"] == "application/json"
        return json.load(response)


def test_discovery_and_jwks_are_served_over_https_with_a_consistent_https_issuer(
    https: BrokerServer, ca: Issued
) -> None:
    assert https.http is not None
    issuer = https.broker.tokens.issuer
    assert issuer == f"https://127.0.0.1:{https.http.port}"
    discovery = get_json(issuer + "/.well-known/openid-configuration", trusting(ca))
    assert set(discovery) >= RELYING_PARTY_FIELDS
    assert discovery["issuer"] == issuer  # byte for byte: what every relying party compares
    assert discovery["jwks_uri"] == issuer + "/.well-known/jwks.json"
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    assert {"iss", "sub", "aud", "iat", "exp"} <= set(discovery["claims_supported"])
    jwks = get_json(discovery["jwks_uri"], trusting(ca))
    assert {key["alg"] for key in jwks["keys"]} == {"ES256", "RS256"}


def test_a_token_verifies_against_the_jwks_fetched_over_https(
    https: BrokerServer, ca: Issued
) -> None:
    with callers_of(https) as callers:
        stub = callers.stub(standard_accounts()["orchestrator"])
        run = stub.StartRun(start_run_request()).run
        request = broker_pb2.IssueTokenRequest(run_id=run.run_id, audience="sts.amazonaws.com")
        token = stub.IssueToken(request).token
    issuer = https.broker.tokens.issuer
    discovery = get_json(issuer + "/.well-known/openid-configuration", trusting(ca))
    client = jwt.PyJWKClient(discovery["jwks_uri"], ssl_context=trusting(ca))
    key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience="sts.amazonaws.com",
        issuer=discovery["issuer"],
    )
    assert claims["iss"] == issuer and claims["run_id"] == run.run_id


def test_a_client_that_does_not_trust_the_certificate_is_refused(https: BrokerServer) -> None:
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get_json(
            https.broker.tokens.issuer + "/.well-known/jwks.json", ssl.create_default_context()
        )


def test_plain_http_to_the_tls_port_gets_no_answer_and_the_port_keeps_serving(
    https: BrokerServer, ca: Issued
) -> None:
    assert https.http is not None
    with socket.create_connection(("127.0.0.1", https.http.port), timeout=10) as plain:
        plain.sendall(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"keys" not in plain.recv(4096)  # a TLS alert or nothing, never the JWKS
    jwks = get_json(https.broker.tokens.issuer + "/.well-known/jwks.json", trusting(ca))
    assert jwks["keys"]


def test_the_http_tls_flags_go_together_and_need_the_http_port(tmp_path: Path) -> None:
    cert = tmp_path / "http.crt"
    with pytest.raises(SettingsError, match="go together"):
        make_settings(tmp_path, http_listen="127.0.0.1:0", http_tls_cert=cert)
    with pytest.raises(SettingsError, match="needs --http-listen"):
        make_settings(tmp_path, http_tls_cert=cert, http_tls_key=cert)


def test_a_certificate_that_does_not_match_its_key_stops_the_start(
    tmp_path: Path, ca: Issued
) -> None:
    cert, _ = server_cert(ca).write(tmp_path, "one")
    _, other_key = server_cert(ca).write(tmp_path, "two")
    settings = make_settings(
        tmp_path / "data",
        http_listen="127.0.0.1:0",
        http_tls_cert=cert,
        http_tls_key=other_key,
    )
    with pytest.raises(SettingsError, match="not a matching PEM certificate and key"):
        create_server(settings)
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_the_default_issuer_is_https_when_the_http_port_serves_tls(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    settings = Settings(http_listen="127.0.0.1:8443", http_tls_cert=pem, http_tls_key=pem)
    assert settings.effective_issuer == "https://127.0.0.1:8443"
    assert Settings(http_listen="127.0.0.1:8080").effective_issuer == "http://127.0.0.1:8080"


def test_plain_http_on_a_non_loopback_address_with_an_https_issuer_warns(
    tmp_path: Path,
) -> None:
    """`serve` logs this warning at start, beside the INSECURE one for plaintext gRPC."""
    behind_proxy = Settings(http_listen="10.0.0.5:8080", issuer="https://broker.example.com")
    warning = behind_proxy.plain_discovery_warning()
    assert warning is not None and "--http-tls-cert" in warning
    pem = tmp_path / "x.pem"
    quiet = [
        Settings(http_listen="127.0.0.1:8080", issuer="https://broker.example.com"),
        Settings(http_listen="10.0.0.5:8080", issuer="http://broker.example.com"),
        Settings(
            http_listen="10.0.0.5:8443",
            issuer="https://broker.example.com",
            http_tls_cert=pem,
            http_tls_key=pem,
        ),
    ]
    assert [s.plain_discovery_warning() for s in quiet] == [None, None, None]
