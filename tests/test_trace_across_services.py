"""One run, one trace: portal → broker ExecuteOnBehalfOf → sample executor → broker IssueToken
→ sample API, every service a real gRPC or HTTP server on loopback with its own in-memory SDK.

Every span of the run is in the portal's trace and names the run and the person; the person
comes from the ID token the broker verified, so a portal that puts another person into the
baggage changes nothing — not a span, not an audit event, not a token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry import baggage
from opentelemetry import context as context_api
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode, format_trace_id

from broker.api.server import BrokerServer, create_server
from tests.accounts import Account, new_account, write_policy
from tests.conftest import make_settings
from tests.otel_support import InMemorySdk, attributes_of, in_memory_sdk, trace_id_of
from tests.support import eventually
from tokenbroker import BrokerClient, tracing
from tokenbroker.credentials import assertion_credentials, local_channel
from tokenbroker.defaults import SERVICE_NAME
from tokenbroker.samples.api import SampleApi, call_api
from tokenbroker.samples.executor import Execution, SampleExecutor
from tokenbroker.samples.idp import TestIdentityProvider
from tokenbroker.v1 import types_pb2

PORTAL_AUDIENCE = "token-broker-portal"
ALICE = "alice@example.com"
BROKER = "tokenbroker.v1.TokenBrokerService/"
EXECUTOR = "tokenbroker.v1.PipelineExecutorService/"
PORTAL_SPAN = "deploy acme/payments/deploy"
SPOOFED = {"enduser.id": "mallory@evil.example", "cicd.pipeline.run.id": "r-forged"}

# (kind, name) of every span each service records for the run.
EXPECTED_SPANS = {
    "portal": [("CLIENT", BROKER + "ExecuteOnBehalfOf"), ("INTERNAL", PORTAL_SPAN)],
    "broker": [
        ("CLIENT", EXECUTOR + "Execute"),  # the hand-off
        ("SERVER", BROKER + "ExecuteOnBehalfOf"),
        ("SERVER", BROKER + "IssueToken"),  # called by the executor's pipeline...
        ("SERVER", BROKER + "RevokeRun"),  # ...which ends the run when done
    ],
    "executor": [
        ("CLIENT", "GET"),  # the step calling the API
        ("CLIENT", BROKER + "IssueToken"),
        ("CLIENT", BROKER + "RevokeRun"),
        ("INTERNAL", "call-sample-api"),  # the step
        ("SERVER", "RUN acme/payments/deploy"),  # the pipeline run
        ("SERVER", EXECUTOR + "Execute"),
    ],
    "api": [("SERVER", "GET /whoami")],
}
# The broker also serves the API's own calls (signing keys, the audit stream it follows for
# revocations): they belong to no run, so they are traces of their own.
API_BACKGROUND_CALLS = {BROKER + "GetSigningKeys", BROKER + "StreamAudit"}
HTTP_CLIENT_KEYS = (
    "http.request.method",
    "url.full",
    "server.address",
    "server.port",
    "http.response.status_code",
)
HTTP_SERVER_KEYS = (
    "http.request.method",
    "url.path",
    "url.scheme",
    "http.route",
    "http.response.status_code",
)


@dataclass
class Services:
    """Portal, broker, executor and API, each recording its spans in its own SDK."""

    idp: TestIdentityProvider
    broker: BrokerServer
    executor: SampleExecutor
    api: SampleApi
    portal: BrokerClient  # deploy-portal, its channel traced with the portal's provider
    auditor: BrokerClient
    sdks: dict[str, InMemorySdk]


def delegation_toml(idp: TestIdentityProvider, jwks: Path) -> str:
    return f"""\
[accounts.deploy-portal.delegation]
user_domains = ["example.com"]

[[accounts.deploy-portal.delegation.identity_providers]]
issuer = "{idp.issuer}"
audience = "{PORTAL_AUDIENCE}"
jwks_file = "{jwks}"
"""


def credentials_of(account: Account, broker: BrokerServer) -> grpc.CallCredentials:
    audience = broker.broker.authn.audience
    return assertion_credentials(account.name, account.private_pem, audience, key_id=account.kid)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    idp = TestIdentityProvider("https://idp.example.com")
    jwks = idp.write_jwks(tmp_path / "idp-jwks.json")
    portal = new_account("deploy-portal", ["delegator"], extra_toml=delegation_toml(idp, jwks))
    # The API follows every revocation: an auditor of all organisations.
    api = new_account("sample-api", ["auditor"], ["*/*/*"])
    policy = write_policy(tmp_path / "policy.toml", [portal, api])
    sdks = {
        # The portal and the broker take nothing from baggage onto their spans...
        "portal": in_memory_sdk("deploy-portal"),
        "broker": in_memory_sdk(SERVICE_NAME),
        # ...the services that receive a run's context stamp its run entries on theirs.
        "executor": in_memory_sdk("sample-executor", [tracing.baggage_span_processor()]),
        "api": in_memory_sdk("sample-api", [tracing.baggage_span_processor()]),
    }
    with contextlib.ExitStack() as stack:  # stops everything in reverse order
        for sdk in sdks.values():
            stack.callback(sdk.shutdown)
        executor = stack.enter_context(
            SampleExecutor(tracer_provider=sdks["executor"].tracer_provider)
        )
        settings = make_settings(tmp_path / "data", policy=policy, executor_target=executor.target)
        broker = create_server(
            settings,
            tracer_provider=sdks["broker"].tracer_provider,
            meter_provider=sdks["broker"].meter_provider,
        )
        broker.start()
        stack.callback(broker.stop, grace=0.5)
        portal_channel = stack.enter_context(
            local_channel(broker.target, credentials_of(portal, broker))
        )
        auditor_channel = stack.enter_context(
            local_channel(broker.target, credentials_of(api, broker))
        )
        sample_api = stack.enter_context(
            SampleApi(
                broker.target,
                credentials=credentials_of(api, broker),
                tracer_provider=sdks["api"].tracer_provider,
            )
        )
        executor.api_url = sample_api.url
        yield Services(
            idp,
            broker,
            executor,
            sample_api,
            BrokerClient(
                channel=tracing.intercept_channel(portal_channel, sdks["portal"].tracer_provider)
            ),
            BrokerClient(channel=auditor_channel),
            sdks,
        )


@dataclass
class Deployment:
    run_id: str
    trace_id: str  # of the portal's span
    execution: Execution


def deploy_for_alice(services: Services, portal_baggage: Mapping[str, str]) -> Deployment:
    """The portal deploys for alice (her ID token) inside a span of its own, with
    `portal_baggage` in its context; returns once the executor has finished the run."""
    context = context_api.get_current()
    for key, value in portal_baggage.items():
        context = baggage.set_baggage(key, value, context)
    id_token = services.idp.id_token(subject="u-alice", email=ALICE, audience=PORTAL_AUDIENCE)
    tracer = services.sdks["portal"].tracer_provider.get_tracer("deploy-portal")
    attached = context_api.attach(context)
    try:
        with tracer.start_as_current_span(PORTAL_SPAN) as span:
            executed = services.portal.execute_on_behalf_of(
                "acme", "payments", "deploy", ceiling={"pipelines": "execute"}, id_token=id_token
            )
    finally:
        context_api.detach(attached)
    run_id = executed.run.run_id
    execution = services.executor.wait_for(run_id)
    return Deployment(run_id, format_trace_id(span.get_span_context().trace_id), execution)


def api_spans_named(services: Services, name: str) -> list[ReadableSpan]:
    """The API's spans called `name`, waiting briefly for one: the API ends its span just
    after sending the answer, which its caller may already have read."""
    return eventually(
        lambda: [s for s in services.sdks["api"].spans() if s.name == name],
        within=5,
        interval=0.005,
        what=f"the API's span {name!r}",
    )


def spans_of_the_run(services: Services) -> dict[str, list[ReadableSpan]]:
    """Every finished span, by service, except the broker's serving the API's own calls."""
    api_spans_named(services, "GET /whoami")
    spans = {service: sdk.spans() for service, sdk in services.sdks.items()}
    spans["broker"] = [s for s in spans["broker"] if s.name not in API_BACKGROUND_CALLS]
    return spans


def pick(attributes: Mapping[str, object], keys: Iterable[str]) -> dict[str, object]:
    return {key: attributes[key] for key in keys if key in attributes}


def kinds_and_names(spans: list[ReadableSpan]) -> list[tuple[str, str]]:
    return sorted((span.kind.name, span.name) for span in spans)


def audit_of(services: Services, run_id: str) -> list[types_pb2.AuditEvent]:
    return list(services.auditor.stream_audit(run_id=run_id, follow=False))


def assert_one_trace_naming_the_run_and_alice(
    services: Services, deployment: Deployment
) -> list[ReadableSpan]:
    """The checks both tests share; returns every span of the run."""
    assert (deployment.execution.api_status, deployment.execution.error) == (200, "")
    assert deployment.execution.api_answer["person"] == ALICE  # from the verified token
    spans = spans_of_the_run(services)
    assert {service: kinds_and_names(found) for service, found in spans.items()} == EXPECTED_SPANS
    everything = [span for found in spans.values() for span in found]

    # One trace id across every service, and no orphan: each span's parent is one of them,
    # but for the portal's own span, where the trace begins.
    assert {trace_id_of(span) for span in everything} == {deployment.trace_id}
    span_ids = {span.context.span_id for span in everything if span.context is not None}
    (root,) = [span for span in everything if span.parent is None]
    assert root.name == PORTAL_SPAN
    assert all(span.parent.span_id in span_ids for span in everything if span.parent)

    # The run and the person on every span but the portal's own: that span begins before the
    # run exists, and the portal's provider (rightly) copies nothing from baggage. The portal
    # learns the run and the verified person from the broker's answer, which its client span
    # of ExecuteOnBehalfOf records (broker: from its records; executor and API: from the
    # baggage the broker put on the hand-off).
    for span in everything:
        attributes = attributes_of(span)
        if span is root:
            assert tracing.RUN_ID not in attributes and tracing.PERSON not in attributes
            continue
        assert attributes.get(tracing.RUN_ID) == deployment.run_id, span.name
        assert attributes.get(tracing.PERSON) == ALICE, span.name

    # The audit trail of the run: the same person, the same trace.
    events = audit_of(services, deployment.run_id)
    assert [e.action for e in events] == ["run.executed_on_behalf", "token.issued", "run.ended"]
    for event in events:
        assert event.on_behalf_of.email == ALICE
        assert event.trace_id == deployment.trace_id
    return everything


def test_one_trace_id_spans_portal_broker_executor_and_api_each_naming_run_and_person(
    services: Services,
) -> None:
    deployment = deploy_for_alice(services, portal_baggage={})
    assert_one_trace_naming_the_run_and_alice(services, deployment)


def test_a_portal_claiming_mallory_in_baggage_changes_no_span_audit_event_or_token(
    services: Services,
) -> None:
    deployment = deploy_for_alice(services, portal_baggage=SPOOFED)
    everything = assert_one_trace_naming_the_run_and_alice(services, deployment)
    for span in everything:
        values = " ".join(str(value) for value in attributes_of(span).values())
        assert "mallory" not in values and "r-forged" not in values, span.name
    for event in audit_of(services, deployment.run_id):
        assert "mallory" not in str(event) and "r-forged" not in str(event)
    assert "mallory" not in str(deployment.execution.api_answer)


def test_the_http_spans_follow_the_http_semantic_conventions(services: Services) -> None:
    deployment = deploy_for_alice(services, portal_baggage={})
    spans = spans_of_the_run(services)
    (request,) = [s for s in spans["executor"] if s.name == "GET"]
    (served,) = spans["api"]
    assert served.parent is not None and request.context is not None
    assert served.parent.span_id == request.context.span_id
    port = services.api.url.split(":")[2].split("/")[0]
    assert pick(attributes_of(request), HTTP_CLIENT_KEYS) == {
        "http.request.method": "GET",
        "url.full": services.api.url,
        "server.address": "127.0.0.1",
        "server.port": int(port),
        "http.response.status_code": 200,
    }
    assert pick(attributes_of(served), HTTP_SERVER_KEYS) == {
        "http.request.method": "GET",
        "url.path": "/whoami",
        "url.scheme": "http",
        "http.route": "/whoami",
        "http.response.status_code": 200,
    }
    assert attributes_of(served)[tracing.RUN_ID] == deployment.run_id

    # A refusal is the client's fault, not the server's: status code recorded, no error status.
    not_found = call_api(services.api.url.replace("/whoami", "/elsewhere"), "no-token")
    assert not_found.status == 404
    (unrouted,) = api_spans_named(services, "GET")
    assert attributes_of(unrouted)["http.response.status_code"] == 404
    assert "http.route" not in attributes_of(unrouted)
    assert unrouted.status.status_code is StatusCode.UNSET
