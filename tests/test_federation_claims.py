"""Issue 20 items 1-2 over real gRPC: immutable ids sent at StartRun reach the run and its
tokens; the policy's subject templates, custom claims and AWS session tags shape step tokens;
nothing the policy does not name reaches a token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.runs.claims import AWS_TAGS_CLAIM
from tests.accounts import Callers, callers_of, policy_toml, standard_accounts
from tests.clientsupport import client_credentials
from tests.conftest import make_settings
from tests.support import ShiftedClock, details, perms, pipeline, rpc_error
from tokenbroker import BrokerClient
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

Stub = broker_pb2_grpc.TokenBrokerServiceStub
STS = "sts.amazonaws.com"
IDS = types_pb2.PipelineIds(org_id="91824", project_id="5501", pipeline_id="77")
ALICE = broker_pb2.AssertedPerson(subject="u-alice", email="alice@example.com")

FEDERATION = """
[federation.claims.team]
from = "input.team"
pattern = "[a-z][a-z0-9-]{0,31}"
max_length = 32

[federation.claims.tier]
from = "input.tier"
enum = ["gold", "silver"]

[federation.aws_session_tags]
audiences = ["sts.amazonaws.com"]
tags = { OrgId = "org_id", Team = "team", Env = "environment" }
transitive = ["OrgId"]

[federation.orgs.globex]
org_id = "2002"
subject = "globex:{org:20}:{project:30}:{pipeline:30}:{step:20}"

[federation.delegators.deploy-portal]
subject = "portal:{org_id}:{pipeline_id}:{environment:40}"
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BrokerServer]:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml(standard_accounts().values()) + FEDERATION)
    settings = make_settings(tmp_path / "data", policy=policy)
    running = create_server(settings, broker=build_broker(settings, clock=ShiftedClock()))
    running.start()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def callers(server: BrokerServer) -> Iterator[Callers]:
    with callers_of(server) as made:
        yield made


@pytest.fixture
def root(callers: Callers) -> Stub:
    return callers.stub(standard_accounts()["root"])


def start(stub: Stub, org: str = "acme", **fields: Any) -> broker_pb2.StartRunResponse:
    request = broker_pb2.StartRunRequest(
        pipeline=pipeline(org, "web", "deploy"),
        permission_ceiling=perms(artifacts="read"),
        **fields,
    )
    response: broker_pb2.StartRunResponse = stub.StartRun(request, timeout=10)
    return response


def claims_of(stub: Stub, run_id: str, audience: str = "api.example.com", step: str = "") -> Any:
    issued = stub.IssueToken(
        broker_pb2.IssueTokenRequest(
            run_id=run_id, audience=audience, permissions=perms(artifacts="read"), step=step
        ),
        timeout=10,
    )
    return jwt.decode(issued.token, options={"verify_signature": False})


def test_immutable_ids_and_environment_are_stored_with_the_run_and_put_in_its_tokens(
    root: Stub,
) -> None:
    run = start(root, pipeline_ids=IDS, environment="production").run
    assert (run.pipeline_ids, run.environment) == (IDS, "production")
    fetched = root.GetRun(broker_pb2.GetRunRequest(run_id=run.run_id), timeout=10).run
    assert (fetched.pipeline_ids, fetched.environment) == (IDS, "production")
    claims = claims_of(root, run.run_id)
    assert (claims["org_id"], claims["project_id"], claims["pipeline_id"]) == (
        "91824",
        "5501",
        "77",
    )
    assert claims["environment"] == "production"


def test_without_a_template_a_run_with_all_ids_gets_the_ids_subject(root: Stub) -> None:
    run = start(root, pipeline_ids=IDS).run
    assert claims_of(root, run.run_id)["sub"] == "ids:91824/5501/77"


def test_without_a_template_or_ids_a_run_keeps_the_run_subject(root: Stub) -> None:
    run = start(root, pipeline_ids=types_pb2.PipelineIds(org_id="91824")).run
    assert claims_of(root, run.run_id)["sub"] == f"run:acme/web/deploy:{run.run_id}"


def test_an_orgs_template_shapes_the_subject_and_step_names_a_part_of_it(root: Stub) -> None:
    run = start(root, org="globex").run
    assert claims_of(root, run.run_id, step="build")["sub"] == "globex:globex:web:deploy:build"
    refused = rpc_error(lambda: claims_of(root, run.run_id, step="a-step-name-of-30-characters"))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "allows step of at most 20 characters" in details(refused)


def test_a_delegators_template_wins_and_a_run_without_its_ids_gets_no_token(
    callers: Callers,
) -> None:
    portal = callers.stub(standard_accounts()["delegator"])
    with_ids = portal.ExecuteOnBehalfOf(
        broker_pb2.ExecuteOnBehalfOfRequest(
            pipeline=pipeline("acme", "web", "deploy"),
            permission_ceiling=perms(artifacts="read"),
            idempotency_key="k-1",
            asserted=ALICE,
            pipeline_ids=IDS,
            environment="staging",
        ),
        timeout=10,
    )
    step = callers.bearer_stub(with_ids.run_credential)
    assert claims_of(step, "")["sub"] == "portal:91824:77:staging"
    without = portal.ExecuteOnBehalfOf(
        broker_pb2.ExecuteOnBehalfOfRequest(
            pipeline=pipeline("acme", "web", "deploy"),
            permission_ceiling=perms(artifacts="read"),
            idempotency_key="k-2",
            asserted=ALICE,
        ),
        timeout=10,
    )
    refused = rpc_error(lambda: claims_of(callers.bearer_stub(without.run_credential), ""))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "delegator deploy-portal" in details(refused) and "needs org_id" in details(refused)
    events = callers.stub(standard_accounts()["root"]).StreamAudit(
        broker_pb2.StreamAuditRequest(
            filter=broker_pb2.AuditFilter(run_id=without.run.run_id, actions=["token.refused"]),
            stop_at_head=True,
        ),
        timeout=10,
    )
    (recorded,) = [message.event for message in events if message.HasField("event")]
    assert "needs org_id" in str(recorded.details["reason"])


def test_a_child_run_inherits_its_parents_ids_and_cannot_choose_its_own(callers: Callers) -> None:
    portal = callers.stub(standard_accounts()["delegator"])
    parent = portal.ExecuteOnBehalfOf(
        broker_pb2.ExecuteOnBehalfOfRequest(
            pipeline=pipeline("acme", "web", "deploy"),
            permission_ceiling=perms(artifacts="read"),
            idempotency_key="parent",
            asserted=ALICE,
            pipeline_ids=IDS,
            environment="staging",
        ),
        timeout=10,
    )
    as_parent = callers.bearer_stub(parent.run_credential)

    def child(key: str, name: str, **fields: Any) -> broker_pb2.ExecuteOnBehalfOfResponse:
        response: broker_pb2.ExecuteOnBehalfOfResponse = as_parent.ExecuteOnBehalfOf(
            broker_pb2.ExecuteOnBehalfOfRequest(
                pipeline=pipeline("acme", "web", name),
                permission_ceiling=perms(artifacts="read"),
                idempotency_key=key,
                **fields,
            ),
            timeout=10,
        )
        return response

    same = child("c-1", "deploy").run
    assert (same.pipeline_ids, same.environment) == (IDS, "staging")
    other = child("c-2", "test").run
    assert other.pipeline_ids == types_pb2.PipelineIds(org_id="91824", project_id="5501")
    forged = types_pb2.PipelineIds(org_id="1", project_id="1", pipeline_id="1")
    refused = rpc_error(lambda: child("c-3", "deploy", pipeline_ids=forged))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "from its parent" in details(refused)


def test_custom_claims_come_only_from_named_inputs_that_pass_their_rules(root: Stub) -> None:
    inputs = {"team": "payments", "tier": "gold", "secret": "hunter2", "note": "x"}
    run = start(root, inputs=inputs).run
    claims = claims_of(root, run.run_id)
    assert (claims["team"], claims["tier"]) == ("payments", "gold")
    assert "hunter2" not in str(claims) and "note" not in claims and "secret" not in claims
    for bad in ({"team": "Payments!"}, {"tier": "platinum"}, {"team": "x" * 33}):
        broken = start(root, inputs=bad).run
        refused = rpc_error(lambda run_id=broken.run_id: claims_of(root, run_id))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no token carries it" in details(refused)
        assert next(iter(bad.values())) not in details(refused)  # the rule, never the value


def test_aws_session_tags_go_only_to_the_audiences_the_policy_names(root: Stub) -> None:
    run = start(root, pipeline_ids=IDS, environment="production", inputs={"team": "payments"}).run
    tags = claims_of(root, run.run_id, audience=STS)[AWS_TAGS_CLAIM]
    assert tags == {
        "principal_tags": {"OrgId": ["91824"], "Team": ["payments"], "Env": ["production"]},
        "transitive_tag_keys": ["OrgId"],
    }
    assert AWS_TAGS_CLAIM not in claims_of(root, run.run_id, audience="api.example.com")


def test_a_tag_whose_value_the_run_lacks_is_left_out_with_its_transitive_key(root: Stub) -> None:
    run = start(root, environment="dev").run
    tags = claims_of(root, run.run_id, audience=STS)[AWS_TAGS_CLAIM]
    assert tags == {"principal_tags": {"Env": ["dev"]}, "transitive_tag_keys": []}


def test_ids_and_environment_outside_their_limits_are_refused_at_the_edge(root: Stub) -> None:
    for fields in (
        {"pipeline_ids": types_pb2.PipelineIds(org_id="a/b")},
        {"pipeline_ids": types_pb2.PipelineIds(pipeline_id="x" * 37)},
        {"environment": "prod uction"},
    ):
        refused = rpc_error(lambda fields=fields: start(root, **fields))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_issued_subject_is_in_the_audit_record(root: Stub) -> None:
    run = start(root, pipeline_ids=IDS).run
    claims_of(root, run.run_id)
    events = root.StreamAudit(
        broker_pb2.StreamAuditRequest(
            filter=broker_pb2.AuditFilter(run_id=run.run_id, actions=["token.issued"]),
            stop_at_head=True,
        ),
        timeout=10,
    )
    (issued,) = [message.event for message in events if message.HasField("event")]
    assert issued.details["sub"] == "ids:91824/5501/77"


def test_the_client_library_sends_ids_and_environment(server: BrokerServer) -> None:
    with BrokerClient(server.target, credentials=client_credentials(server)) as client:
        started = client.start_run(
            "acme",
            "web",
            "deploy",
            ceiling={"artifacts": "read"},
            pipeline_ids={"org_id": "91824", "pipeline_id": "77"},
            environment="production",
        )
    assert started.run.pipeline_ids == types_pb2.PipelineIds(org_id="91824", pipeline_id="77")
    assert started.run.environment == "production"


def test_a_pinned_org_id_is_filled_in_and_no_run_may_claim_another(root: Stub) -> None:
    filled = start(root, org="globex").run
    assert filled.pipeline_ids == types_pb2.PipelineIds(org_id="2002")
    assert claims_of(root, filled.run_id, step="s")["org_id"] == "2002"
    cases = (
        ("globex", IDS, "org globex has another immutable id"),
        ("acme", types_pb2.PipelineIds(org_id="2002"), "the id of another organisation"),
    )
    for org, ids, why in cases:
        refused = rpc_error(lambda org=org, ids=ids: start(root, org=org, pipeline_ids=ids))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert why in details(refused)
    events = root.StreamAudit(
        broker_pb2.StreamAuditRequest(
            filter=broker_pb2.AuditFilter(actions=["run.refused"]), stop_at_head=True
        ),
        timeout=10,
    )
    refusals = [message.event for message in events if message.HasField("event")]
    assert [e.pipeline.org for e in refusals] == ["globex", "acme"]
