"""RFC 8693 token exchange and RFC 7662 introspection on the broker's HTTP port: the same
domain calls, checks and audit events as IssueToken and VerifyToken, every OAuth error code,
and hostile forms answered 400 — never a 500."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from google.protobuf import duration_pb2, json_format

from broker.api import oauth_status
from broker.api.http import Request, broker_routes
from broker.api.http.exchange import ACCESS_TOKEN_TYPE, GRANT_TYPE, JWT_TYPE
from broker.api.http.introspection import CLIENT_ASSERTION_TYPE
from broker.api.http.oauth import carries_credentials_safely
from broker.api.oauth_status import Endpoint
from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.errors import (
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ScopeExceeded,
    Unauthenticated,
    Unavailable,
)
from tests.accounts import Callers, callers_of, sign_assertion, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.otel_support import InMemorySdk, attributes_of
from tests.support import ShiftedClock, reap, start_run_request
from tokenbroker.v1 import broker_pb2

FORM = "application/x-www-form-urlencoded"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    document: dict[str, Any]


@pytest.fixture
def http_server(tmp_path: Path, clock: ShiftedClock) -> Iterator[BrokerServer]:
    settings = make_settings(
        tmp_path / "data", policy=standard_policy(tmp_path), http_listen="127.0.0.1:0"
    )
    running = create_server(settings, broker=build_broker(settings, clock=clock))
    running.start()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def http_callers(http_server: BrokerServer) -> Iterator[Callers]:
    with callers_of(http_server) as made:
        yield made


def post(
    server: BrokerServer,
    path: str,
    form: dict[str, str] | list[tuple[str, str]] | bytes,
    headers: dict[str, str] | None = None,
) -> Reply:
    assert server.http is not None
    body = form if isinstance(form, bytes) else urllib.parse.urlencode(form).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)
    try:
        connection.request(
            "POST", path, body=body, headers={"Content-Type": FORM, **(headers or {})}
        )
        response = connection.getresponse()
        return Reply(response.status, dict(response.getheaders()), json.loads(response.read()))
    finally:
        connection.close()


def run_credential(callers: Callers, **overrides: object) -> tuple[str, str]:
    """A new run's (run id, run credential), ceiling pipelines:execute and artifacts:write."""
    stub = callers.stub(standard_accounts()["orchestrator"])
    started = stub.StartRun(start_run_request(**overrides), timeout=5)
    return started.run.run_id, started.run_credential


def exchange_form(credential: str, **more: str) -> dict[str, str]:
    return {
        "grant_type": GRANT_TYPE,
        "subject_token": credential,
        "subject_token_type": JWT_TYPE,
        "audience": "api.example.com",
        "scope": "pipelines:read",
        **more,
    }


def exchange(server: BrokerServer, form: Any, headers: dict[str, str] | None = None) -> Reply:
    return post(server, "/oauth2/token", form, headers)


def introspect(server: BrokerServer, token: str, bearer: str, **more: str) -> Reply:
    return post(
        server,
        "/oauth2/introspect",
        {"token": token, **more},
        {"Authorization": f"Bearer {bearer}"},
    )


def assertion(callers: Callers, role: str = "auditor") -> str:
    return sign_assertion(standard_accounts()[role], callers.audience)


def actions(server: BrokerServer) -> list[str]:
    return [event.draft.action for event in server.broker.store.read_events(0, 100_000)]


# --- token exchange --------------------------------------------------------------------------


def test_a_run_credential_is_exchanged_for_a_step_token_as_issue_token_would_mint_it(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    run_id, credential = run_credential(http_callers)
    reply = exchange(
        http_server, exchange_form(credential, scope="pipelines:execute artifacts:read", ttl="120")
    )
    assert reply.status == 200, reply.document
    assert reply.headers["Cache-Control"] == "no-store"
    document = reply.document
    assert document["token_type"] == "Bearer"
    assert document["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert document["scope"] == "artifacts:read pipelines:execute"
    assert 110 <= document["expires_in"] <= 120
    claims = jwt.decode(document["access_token"], options={"verify_signature": False})
    assert claims["run_id"] == run_id
    assert claims["aud"] == "api.example.com"
    assert claims["permissions"] == {"artifacts": "read", "pipelines": "execute"}
    stub = http_callers.stub(standard_accounts()["auditor"])
    verdict = stub.VerifyToken(
        broker_pb2.VerifyTokenRequest(token=document["access_token"], audience="api.example.com"),
        timeout=5,
    )
    assert verdict.active
    assert actions(http_server)[-1] == "token.issued"


def test_a_requested_jwt_token_type_is_answered_as_that_type(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    form = exchange_form(
        credential, requested_token_type=JWT_TYPE, subject_token_type=ACCESS_TOKEN_TYPE
    )
    reply = exchange(http_server, form)
    assert reply.status == 200
    assert reply.document["issued_token_type"] == JWT_TYPE


def test_permissions_beyond_the_ceiling_are_invalid_scope_and_audited_as_refused(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    reply = exchange(http_server, exchange_form(credential, scope="pipelines:admin"))
    assert (reply.status, reply.document["error"]) == (400, "invalid_scope")
    assert "ceiling" in reply.document["error_description"]
    assert actions(http_server)[-1] == "token.refused"


@pytest.mark.parametrize(
    "scope",
    ["pipelines", "pipelines:read:x", "Pipelines:read", "pipelines:sideways", "a:read  b:read"],
)
def test_a_malformed_scope_is_invalid_scope(
    http_server: BrokerServer, http_callers: Callers, scope: str
) -> None:
    _, credential = run_credential(http_callers)
    reply = exchange(http_server, exchange_form(credential, scope=scope))
    assert (reply.status, reply.document["error"]) == (400, "invalid_scope"), reply.document


def test_two_audiences_a_resource_or_a_bad_audience_are_invalid_target(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    two = [*exchange_form(credential).items(), ("audience", "other.example.com")]
    resource = exchange_form(credential, resource="https://api.example.com/")
    own_issuer = exchange_form(credential, audience=http_callers.audience)
    spaced = exchange_form(credential, audience="api example")
    for form in (two, resource, own_issuer, spaced):
        reply = exchange(http_server, form)
        assert (reply.status, reply.document["error"]) == (400, "invalid_target"), form


def test_a_grant_type_other_than_token_exchange_is_unsupported_grant_type(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    reply = exchange(http_server, exchange_form(credential, grant_type="client_credentials"))
    assert (reply.status, reply.document["error"]) == (400, "unsupported_grant_type")


def test_an_ended_runs_credential_is_an_invalid_request_as_rfc_8693_says(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    run_id, credential = run_credential(http_callers)
    http_callers.stub(standard_accounts()["orchestrator"]).RevokeRun(
        broker_pb2.RevokeRunRequest(run_id=run_id, reason="done"), timeout=5
    )
    reply = exchange(http_server, exchange_form(credential))
    assert (reply.status, reply.document["error"]) == (400, "invalid_request")
    assert reply.document["error_description"].startswith("subject_token: run credential rejected")
    assert actions(http_server)[-1] == "authn.denied"


def test_an_expired_runs_credential_is_refused(
    http_server: BrokerServer, http_callers: Callers, clock: ShiftedClock
) -> None:
    _, credential = run_credential(http_callers, deadline=duration_pb2.Duration(seconds=60))
    clock.advance(120)
    reap(http_server)
    reply = exchange(http_server, exchange_form(credential))
    assert (reply.status, reply.document["error"]) == (400, "invalid_request")


def test_a_service_account_assertion_as_subject_token_is_unauthorized_client(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    reply = exchange(http_server, exchange_form(assertion(http_callers, "orchestrator")))
    assert (reply.status, reply.document["error"]) == (400, "unauthorized_client")


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        ({"subject_token": ""}, "subject_token"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "subject_token_type"),
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:id_token"}, "requested"),
        ({"actor_token": "x", "actor_token_type": JWT_TYPE}, "actor_token"),
        ({"audience": ""}, "audience"),
        ({"ttl": "5"}, "ttl"),
        ({"ttl": "ten"}, "ttl"),
        ({"ttl": "²"}, "ttl"),
        ({"step": "has space"}, "step"),
    ],
)
def test_a_malformed_exchange_is_invalid_request_naming_the_parameter(
    http_server: BrokerServer, http_callers: Callers, change: dict[str, str], mentions: str
) -> None:
    _, credential = run_credential(http_callers)
    reply = exchange(http_server, {**exchange_form(credential), **change})
    assert (reply.status, reply.document["error"]) == (400, "invalid_request"), reply.document
    assert mentions in reply.document["error_description"]


def test_a_parameter_sent_twice_is_invalid_request(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    form = [*exchange_form(credential).items(), ("scope", "artifacts:read")]
    reply = exchange(http_server, form)
    assert (reply.status, reply.document["error"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"grant_type": "x"}', {"Content-Type": "application/json"}),
        (b"grant_type=x", {"Content-Type": "text/plain"}),
        (b"a=1&&b=2", {}),
        (b"a=%ff", {}),
        ("grant_type=\u00e9".encode(), {}),
        (b"&".join(b"f%d=1" % i for i in range(40)), {}),
        (b"subject_token=" + b"x" * 20_000, {}),
        (b"grant_type=a%00b", {}),
        (b"", {}),
    ],
)
def test_a_hostile_form_is_answered_400_invalid_request_never_500(
    http_server: BrokerServer, body: bytes, headers: dict[str, str]
) -> None:
    for path in ("/oauth2/token", "/oauth2/introspect"):
        reply = post(http_server, path, body, headers)
        assert reply.status in (400, 401), (path, body[:40], reply)
        assert reply.document["error"] in ("invalid_request", "invalid_client")
        assert reply.headers["Cache-Control"] == "no-store"


def test_a_failing_store_is_temporarily_unavailable_with_retry_after(
    http_server: BrokerServer, http_callers: Callers, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, credential = run_credential(http_callers)

    def refuse(*args: object, **kwargs: object) -> None:
        raise Unavailable("storage refuses writes")

    monkeypatch.setattr(http_server.broker.issuance, "issue", refuse)
    reply = exchange(http_server, exchange_form(credential))
    assert (reply.status, reply.document["error"]) == (503, "temporarily_unavailable")
    assert reply.headers["Retry-After"] == "1"


def test_a_request_id_is_kept_and_the_callers_trace_is_joined(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = exchange(
        http_server,
        exchange_form(credential),
        {"X-Request-Id": "req-42", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert reply.headers["X-Request-Id"] == "req-42"
    issued = list(http_server.broker.store.read_events(0, 100_000))[-1]
    assert (issued.draft.request_id, issued.draft.trace_id) == ("req-42", trace_id)


# --- introspection ---------------------------------------------------------------------------


def step_token(server: BrokerServer, callers: Callers) -> tuple[str, str]:
    run_id, credential = run_credential(callers)
    reply = exchange(server, exchange_form(credential))
    return run_id, reply.document["access_token"]


def test_introspection_answers_an_active_tokens_claims_as_verify_token_does(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    run_id, token = step_token(http_server, http_callers)
    reply = introspect(http_server, token, assertion(http_callers), audience="api.example.com")
    assert reply.status == 200
    assert reply.headers["Cache-Control"] == "no-store"
    document = reply.document
    stub = http_callers.stub(standard_accounts()["auditor"])
    verdict = stub.VerifyToken(broker_pb2.VerifyTokenRequest(token=token), timeout=5)
    claims = json_format.MessageToDict(verdict.claims)
    assert document["active"] is True
    assert {k: document[k] for k in claims} == {
        k: (int(v) if isinstance(v, float) else v) for k, v in claims.items()
    }
    assert document["run_id"] == run_id
    assert document["scope"] == "pipelines:read"
    assert document["token_type"] == "Bearer"


def test_a_client_assertion_in_the_form_authenticates_as_the_bearer_does(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, token = step_token(http_server, http_callers)
    form = {
        "token": token,
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": assertion(http_callers),
    }
    reply = post(http_server, "/oauth2/introspect", form)
    assert reply.status == 200
    assert reply.document["active"] is True


def test_a_run_credential_may_introspect_too(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, credential = run_credential(http_callers)
    _, token = step_token(http_server, http_callers)
    assert introspect(http_server, token, credential).document["active"] is True


def test_any_bad_token_is_only_active_false(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    run_id, token = step_token(http_server, http_callers)
    run_cred = run_credential(http_callers)[1]
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    caller = assertion(http_callers)
    cases = [forged, "not a jwt", "x" * 16_000, "a.b.c", run_cred]
    for bad in cases:
        reply = introspect(http_server, bad, caller)
        assert (reply.status, reply.document) == (200, {"active": False}), bad[:30]
    wrong_audience = introspect(http_server, token, caller, audience="other.example.com")
    assert wrong_audience.document == {"active": False}
    http_callers.stub(standard_accounts()["orchestrator"]).RevokeRun(
        broker_pb2.RevokeRunRequest(run_id=run_id, reason="done"), timeout=5
    )
    assert introspect(http_server, token, caller).document == {"active": False}
    assert "token.verify_failed" in actions(http_server)  # the forgery, as VerifyToken audits it


def test_introspection_without_a_valid_caller_is_401_invalid_client(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    _, token = step_token(http_server, http_callers)
    anonymous = post(http_server, "/oauth2/introspect", {"token": token})
    expired = introspect(
        http_server,
        token,
        sign_assertion(standard_accounts()["auditor"], http_callers.audience, now=1_000_000),
    )
    for reply in (anonymous, expired):
        assert (reply.status, reply.document["error"]) == (401, "invalid_client")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert actions(http_server)[-1] == "authn.denied"


def test_two_client_authentications_are_invalid_request(
    http_server: BrokerServer, http_callers: Callers
) -> None:
    form = {
        "token": "x",
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": assertion(http_callers),
    }
    reply = post(
        http_server,
        "/oauth2/introspect",
        form,
        {"Authorization": f"Bearer {assertion(http_callers)}"},
    )
    assert (reply.status, reply.document["error"]) == (400, "invalid_request")


# --- discovery and the one mapping -----------------------------------------------------------


def test_discovery_advertises_the_token_and_introspection_endpoints(
    http_server: BrokerServer,
) -> None:
    assert http_server.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", http_server.http.port, timeout=10)
    connection.request("GET", "/.well-known/openid-configuration")
    document = json.loads(connection.getresponse().read())
    connection.close()
    issuer = document["issuer"]
    assert document["token_endpoint"] == issuer + "/oauth2/token"
    assert document["introspection_endpoint"] == issuer + "/oauth2/introspect"
    assert document["grant_types_supported"] == [GRANT_TYPE]


@pytest.mark.parametrize(
    ("error", "token", "introspection"),
    [
        (InvalidArgument.field("scope[0]", "x"), (400, "invalid_scope"), (400, "invalid_request")),
        (InvalidArgument.field("audience", "x"), (400, "invalid_target"), (400, "invalid_request")),
        (
            InvalidArgument([FieldViolation("audience", "x"), FieldViolation("ttl", "y")]),
            (400, "invalid_request"),
            (400, "invalid_request"),
        ),
        (Unauthenticated("x"), (400, "invalid_request"), (401, "invalid_client")),
        (ScopeExceeded("x"), (400, "invalid_scope"), (401, "invalid_client")),
        (PermissionDenied("x"), (400, "unauthorized_client"), (401, "invalid_client")),
        (FailedPrecondition("x"), (400, "invalid_grant"), (400, "invalid_request")),
        (NotFound("x"), (400, "invalid_grant"), (400, "invalid_request")),
        (
            ResourceExhausted("x", 2.5),
            (429, "temporarily_unavailable"),
            (429, "temporarily_unavailable"),
        ),
        (Unavailable("x"), (503, "temporarily_unavailable"), (503, "temporarily_unavailable")),
        (AlreadyExists("x"), (500, "server_error"), (500, "server_error")),
        (BrokerError("x"), (500, "server_error"), (500, "server_error")),
    ],
)
def test_every_domain_error_has_one_oauth_answer_per_endpoint(
    error: BrokerError, token: tuple[int, str], introspection: tuple[int, str]
) -> None:
    for endpoint, expected in ((Endpoint.TOKEN, token), (Endpoint.INTROSPECTION, introspection)):
        answer = oauth_status.oauth_error_for(error, endpoint, "req-1")
        assert (answer.status, answer.error) == expected


def test_an_error_description_is_short_printable_ascii_without_quotes() -> None:
    described = oauth_status.describe('bad "value" \\ \u202e\n' + "x" * 1000)
    assert len(described) < 400
    assert all(c not in described for c in '"\\\n\u202e')
    assert described.isascii()


def test_over_plaintext_http_on_a_non_loopback_address_the_oauth_endpoints_refuse(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path / "data", policy=standard_policy(tmp_path), http_listen="0.0.0.0:50052"
    )
    broker = build_broker(settings)
    try:
        routes = broker_routes(broker, "https://broker.example.com")
        form = urllib.parse.urlencode({"grant_type": GRANT_TYPE}).encode()
        for path in ("/oauth2/token", "/oauth2/introspect"):
            handler = routes.resolve("POST", path)
            assert handler is not None
            request = Request("POST", path, {}, {"content-type": FORM}, form, "10.0.0.7")
            answer = handler(request)
            assert answer.status == 400
            assert b"plaintext HTTP on a non-loopback address" in answer.body
        discovery = routes.resolve("GET", "/.well-known/openid-configuration")
        assert discovery is not None
        document = json.loads(discovery(Request("GET", "", {}, {}, b"", "10.0.0.7")).body)
        assert "token_endpoint" not in document and "introspection_endpoint" not in document
        assert document["jwks_uri"] == "https://broker.example.com/.well-known/jwks.json"
    finally:
        broker.close()


@pytest.mark.parametrize(
    "subject_token",
    [
        " ",
        "Bearer x",
        "a.b.c",
        "\u202e.\u0000.x",
        "eyJhbGciOiJub25lIn0.e30.",
        "eyJ0eXAiOiJ0b2tlbmJyb2tlci1ydW4rand0IiwiYWxnIjoiRVMyNTYifQ.e30.AAAA",
        "x" * 16_000,
    ],
)
def test_a_hostile_subject_token_is_invalid_request_never_500(
    http_server: BrokerServer, subject_token: str
) -> None:
    reply = exchange(http_server, exchange_form(subject_token))
    assert (reply.status, reply.document["error"]) == (400, "invalid_request"), reply.document
    assert reply.document["error_description"].startswith("subject_token")


def test_an_exchange_is_a_server_span_naming_the_run_and_counted_as_issue_token_is(
    tmp_path: Path, broker_sdk: InMemorySdk
) -> None:
    settings = make_settings(
        tmp_path / "data", policy=standard_policy(tmp_path), http_listen="127.0.0.1:0"
    )
    broker = build_broker(
        settings,
        tracer_provider=broker_sdk.tracer_provider,
        meter_provider=broker_sdk.meter_provider,
    )
    running = create_server(settings, broker=broker)
    running.start()
    try:
        with callers_of(running) as callers:
            run_id, credential = run_credential(callers)
            assert exchange(running, exchange_form(credential)).status == 200
    finally:
        running.stop(grace=0.5)
    (span,) = [s for s in broker_sdk.spans() if s.name == "POST /oauth2/token"]
    attributes = attributes_of(span)
    assert attributes["http.response.status_code"] == 200
    assert attributes["tokenbroker.principal"] == f"run:{run_id}"
    assert attributes["cicd.pipeline.run.id"] == run_id
    assert (
        broker_sdk.total("tokenbroker.tokens.issued", **{"tokenbroker.token.outcome": "issued"})
        == 1
    )


def test_a_run_ended_between_checking_the_credential_and_minting_is_invalid_grant(
    http_server: BrokerServer, http_callers: Callers, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, credential = run_credential(http_callers)
    orchestrator = http_callers.stub(standard_accounts()["orchestrator"])
    authenticate = http_server.broker.authn.authenticate

    def authenticate_then_end_the_run(*args: Any, **kwargs: Any) -> Any:
        principal = authenticate(*args, **kwargs)
        if principal.run_id == run_id:  # the race: the run ends right after the check
            orchestrator.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run_id), timeout=5)
        return principal

    monkeypatch.setattr(http_server.broker.authn, "authenticate", authenticate_then_end_the_run)
    reply = exchange(http_server, exchange_form(credential))
    assert (reply.status, reply.document["error"]) == (400, "invalid_grant")
    assert "no longer active" in reply.document["error_description"]


def test_the_oauth_endpoints_are_served_over_https_loopback_or_with_insecure_only(
    tmp_path: Path,
) -> None:
    def safe(**overrides: object) -> bool:
        return carries_credentials_safely(make_settings(tmp_path, **overrides))

    assert safe(http_listen="127.0.0.1:0")
    assert not safe(http_listen="0.0.0.0:50052")
    assert safe(http_listen="0.0.0.0:50052", insecure=True)
    tls = {"http_tls_cert": tmp_path / "c.pem", "http_tls_key": tmp_path / "k.pem"}
    assert safe(http_listen="0.0.0.0:50052", **tls)
    assert not safe(http_listen="")
