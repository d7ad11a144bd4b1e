"""The sample executor and sample API: a run is executed, its step token accepted by an API
that verifies offline, the run ends, and the same token is then refused with "run ended"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from tests.accounts import standard_accounts
from tests.clientsupport import client_credentials
from tests.conftest import make_settings, standard_policy
from tests.support import eventually
from tokenbroker import BrokerClient
from tokenbroker.credentials import assertion_credentials
from tokenbroker.errors import RunNotActive, Unavailable
from tokenbroker.samples.api import ApiAnswer, SampleApi, call_api
from tokenbroker.samples.executor import SampleExecutor
from tokenbroker.v1 import broker_pb2, executor_pb2, executor_pb2_grpc, types_pb2


@pytest.fixture
def executor() -> Iterator[SampleExecutor]:
    with SampleExecutor() as running:
        yield running


@pytest.fixture
def broker_handing_off(tmp_path: Path, executor: SampleExecutor) -> Iterator[BrokerServer]:
    """A broker configured to hand delegated runs to the sample executor."""
    settings = make_settings(
        tmp_path / "data", executor_target=executor.target, policy=standard_policy(tmp_path)
    )
    running = create_server(settings)
    running.start()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def api(broker_handing_off: BrokerServer) -> Iterator[SampleApi]:
    target = broker_handing_off.target
    with SampleApi(target, credentials=client_credentials(broker_handing_off)) as running:
        yield running


@pytest.fixture
def client(broker_handing_off: BrokerServer) -> Iterator[BrokerClient]:
    credentials = client_credentials(broker_handing_off)
    with BrokerClient(broker_handing_off.target, credentials=credentials) as broker:
        yield broker


def hand_over(
    executor: SampleExecutor, started: broker_pb2.StartRunResponse, broker_target: str
) -> executor_pb2.ExecuteResponse:
    """What the broker's hand-off does: call Execute with the run and its credential."""
    request = executor_pb2.ExecuteRequest(
        run=started.run, run_credential=started.run_credential, broker_target=broker_target
    )
    with grpc.insecure_channel(executor.target) as channel:
        stub = executor_pb2_grpc.PipelineExecutorServiceStub(channel)
        return stub.Execute(request, timeout=5)


def answer_once_refused(api: SampleApi, token: str, within: float = 2.0) -> ApiAnswer:
    """The API's answer, polled until it refuses the token (revocations arrive by stream)."""
    answers: list[ApiAnswer] = []

    def refused() -> bool:
        answers.append(call_api(api.url, token))
        return answers[-1].status != 200

    eventually(refused, within=within, what="the API to refuse the token")
    return answers[-1]


def test_the_sample_executor_runs_a_step_against_the_api_and_then_ends_the_run(
    broker_handing_off: BrokerServer,
    executor: SampleExecutor,
    api: SampleApi,
    client: BrokerClient,
) -> None:
    executor.api_url = api.url
    started = client.start_run("acme", "payments", "deploy", ceiling={"pipelines": "execute"})
    run_id = started.run.run_id

    accepted = hand_over(executor, started, broker_handing_off.target)
    execution = executor.wait_for(run_id)

    assert accepted.accepted and accepted.execution_id == execution.execution_id
    assert (execution.api_status, execution.error) == (200, "")
    assert execution.api_answer["run_id"] == run_id
    assert execution.api_answer["pipeline"] == "acme/payments/deploy"
    assert execution.api_answer["step"] == "call-sample-api"
    assert execution.run_ended
    run = client.get_run(run_id).run
    assert (run.state, run.end_reason) == (
        types_pb2.RUN_STATE_ENDED,
        "pipeline finished",
    )
    refused = answer_once_refused(api, execution.token)
    assert refused.status == 401
    assert refused.body == {"error": "invalid_token", "reason": "run ended", "status": "RUN_ENDED"}
    assert [e.run_id for e in executor.executions] == [run_id]


def test_the_api_says_precisely_why_it_refuses_a_request(
    executor: SampleExecutor, api: SampleApi, client: BrokerClient
) -> None:
    run_id = client.start_run(
        "acme", "payments", "deploy", ceiling={"pipelines": "read"}
    ).run.run_id
    for_other_api = client.issue_token("other-api", {"pipelines": "read"}, run_id=run_id).token
    without_permission = client.issue_token("sample-api", run_id=run_id).token

    assert call_api(api.url, for_other_api).body["status"] == "WRONG_AUDIENCE"
    assert call_api(api.url, "not-a-jwt").body["status"] == "MALFORMED"
    assert call_api(api.url, without_permission).status == 403
    assert api.answer(None) == ApiAnswer(
        401, {"error": "invalid_request", "reason": "no bearer token"}
    )


def test_the_executor_declines_runs_while_it_has_no_api_to_call(
    broker_handing_off: BrokerServer, executor: SampleExecutor, client: BrokerClient
) -> None:
    started = client.start_run("acme", "payments", "deploy", ceiling={"pipelines": "read"})
    assert not hand_over(executor, started, broker_handing_off.target).accepted
    assert executor.executions == []


@pytest.fixture
def portal(broker_handing_off: BrokerServer) -> Iterator[BrokerClient]:
    """deploy-portal: a delegator that may assert identities in example.com."""
    account = standard_accounts()["delegator"]
    credentials = assertion_credentials(
        account.name, account.private_pem, broker_handing_off.broker.authn.audience,
        key_id=account.kid,
    )  # fmt: skip
    with BrokerClient(broker_handing_off.target, credentials=credentials) as broker:
        yield broker


ALICE = {"subject": "u-1", "email": "alice@example.com"}


def test_execute_on_behalf_of_hands_the_run_to_the_executor_and_not_the_credential(
    executor: SampleExecutor, api: SampleApi, portal: BrokerClient, client: BrokerClient
) -> None:
    executor.api_url = api.url
    executed = portal.execute_on_behalf_of(
        "acme", "payments", "deploy", ceiling={"pipelines": "execute"}, asserted=ALICE
    )
    assert executed.handed_off and not executed.run_credential
    execution = executor.wait_for(executed.run.run_id)
    assert (execution.api_status, execution.error) == (200, "")
    assert execution.api_answer["run_id"] == executed.run.run_id
    run = client.get_run(executed.run.run_id).run
    assert run.state == types_pb2.RUN_STATE_ENDED
    assert run.on_behalf_of.email == "alice@example.com"


def test_a_refused_hand_off_ends_the_run_and_a_retry_with_the_same_key_says_so(
    executor: SampleExecutor, portal: BrokerClient, client: BrokerClient
) -> None:
    # The sample executor declines runs while it has no API to call.
    with pytest.raises(Unavailable, match="did not accept"):
        portal.execute_on_behalf_of(
            "acme", "payments", "deploy", ceiling={"pipelines": "read"}, asserted=ALICE,
            idempotency_key="once",
        )  # fmt: skip
    (ended,) = [r for r in client.list_runs(org="acme")]
    assert (ended.state, ended.end_reason.startswith("executor did not accept")) == (
        types_pb2.RUN_STATE_ENDED,
        True,
    )
    with pytest.raises(RunNotActive, match="new idempotency key"):
        portal.execute_on_behalf_of(
            "acme", "payments", "deploy", ceiling={"pipelines": "read"}, asserted=ALICE,
            idempotency_key="once",
        )  # fmt: skip
