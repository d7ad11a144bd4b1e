"""Retries happen only where a second attempt cannot act twice: against a fake broker that
answers UNAVAILABLE a few times, counting attempts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from tests.clientsupport import FAST_RETRY, FlakyBroker, serving
from tokenbroker import AsyncBrokerClient, BrokerClient, RetryPolicy, Unavailable
from tokenbroker.retry import Attempts, Retry, retryable, rule_for
from tokenbroker.v1 import broker_pb2


def test_an_idempotent_read_is_retried_until_it_succeeds() -> None:
    flaky = FlakyBroker(failures=2)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        assert client.get_run("r-1").run.run_id == "r-1"
    assert flaky.attempts("GetRun") == 3


RETRIED_AFTER_UNAVAILABLE: dict[str, Callable[[BrokerClient], object]] = {
    "GetRun": lambda client: client.get_run("r-1"),
    "GetSigningKeys": lambda client: client.signing_keys(),
    "VerifyToken": lambda client: client.verify_token("t"),
    "RevokeRun": lambda client: client.revoke_run("r-1"),
    "RenewRun": lambda client: client.renew_run("r-1"),
    "IssueToken": lambda client: client.issue_token("api", run_id="r-1"),
}


@pytest.mark.parametrize("method", sorted(RETRIED_AFTER_UNAVAILABLE))
def test_calls_that_cannot_act_twice_are_retried(method: str) -> None:
    flaky = FlakyBroker(failures=1)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        RETRIED_AFTER_UNAVAILABLE[method](client)
    assert flaky.attempts(method) == 2


def test_each_page_of_list_runs_is_retried_on_its_own() -> None:
    flaky = FlakyBroker(failures=1)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        assert [run.run_id for run in client.list_runs()] == ["r-b", "r-a"]
    tokens = [r.page_token for r in flaky.requests["ListRuns"]]  # type: ignore[attr-defined]
    assert tokens == ["", "", "p2"]


def test_retries_stop_after_the_policys_attempts_and_raise_unavailable() -> None:
    flaky = FlakyBroker(failures=10)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
    with (
        serving(flaky) as target,
        BrokerClient(target, retry=policy) as client,
        pytest.raises(Unavailable, match="briefly unavailable"),
    ):
        client.get_run("r-1")
    assert flaky.attempts("GetRun") == 3


def test_start_run_without_an_idempotency_key_is_not_retried() -> None:
    flaky = FlakyBroker(failures=1)
    with (
        serving(flaky) as target,
        BrokerClient(target, retry=FAST_RETRY) as client,
        pytest.raises(Unavailable),
    ):
        client.start_run("acme", "web", "deploy", ceiling={"artifacts": "write"})
    assert flaky.attempts("StartRun") == 1


def test_start_run_with_an_idempotency_key_is_retried_with_the_same_key() -> None:
    flaky = FlakyBroker(failures=2)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        client.start_run("acme", "web", "deploy", ceiling={"a": "read"}, idempotency_key="k-1")
    requests = flaky.requests["StartRun"]
    assert [r.idempotency_key for r in requests] == ["k-1"] * 3  # type: ignore[attr-defined]


def test_rotating_the_signing_key_is_never_retried() -> None:
    flaky = FlakyBroker(failures=1)
    with (
        serving(flaky) as target,
        BrokerClient(target, retry=FAST_RETRY) as client,
        pytest.raises(Unavailable),
    ):
        client.rotate_signing_key()
    assert flaky.attempts("RotateSigningKey") == 1


def test_execute_on_behalf_of_gets_one_key_per_call_which_its_retries_reuse() -> None:
    flaky = FlakyBroker(failures=2)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        for _ in range(2):
            client.execute_on_behalf_of(
                "acme", "web", "deploy", ceiling={"a": "read"}, id_token="eyJ.x.y"
            )
    keys = [r.idempotency_key for r in flaky.requests["ExecuteOnBehalfOf"]]  # type: ignore[attr-defined]
    assert len(keys) == 4  # two failures, then one success per call
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert all(keys)


def test_execute_on_behalf_of_is_not_retried_when_the_broker_itself_said_unavailable() -> None:
    # The broker ended the run because its executor refused it: the same key would only
    # replay that ended run.
    flaky = FlakyBroker(failures=1, answered=True)
    with (
        serving(flaky) as target,
        BrokerClient(target, retry=FAST_RETRY) as client,
        pytest.raises(Unavailable) as raised,
    ):
        client.execute_on_behalf_of(
            "acme", "web", "deploy", ceiling={"a": "read"}, id_token="eyJ.x.y"
        )
    assert flaky.attempts("ExecuteOnBehalfOf") == 1
    assert raised.value.request_id == "fake-broker"


def test_issuing_a_token_is_retried() -> None:
    flaky = FlakyBroker(failures=1)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        assert client.issue_token("api", run_id="r-1").token_id == "tok-fake"
    assert flaky.attempts("IssueToken") == 2


def test_an_interrupted_audit_stream_resumes_after_the_last_event_it_saw() -> None:
    flaky = FlakyBroker(failures=2)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        stream = client.stream_audit(after=10, follow=False)
        assert [event.sequence for event in stream] == [11, 12, 13]
        assert stream.cursor == 13
    after = [r.after_sequence for r in flaky.requests["StreamAudit"]]  # type: ignore[attr-defined]
    assert after == [10, 11, 12]


def test_the_async_client_retries_reads_but_not_start_run_without_a_key() -> None:
    flaky = FlakyBroker(failures=1)

    async def scenario() -> None:
        async with AsyncBrokerClient(target, retry=FAST_RETRY) as client:
            assert (await client.get_run("r-2")).run.run_id == "r-2"
            with pytest.raises(Unavailable):
                await client.start_run("acme", "web", "deploy", ceiling={"a": "read"})
            events = [e.sequence async for e in client.stream_audit(follow=False)]
            assert events == [1, 2]

    with serving(flaky) as target:
        asyncio.run(scenario())
    assert flaky.attempts("GetRun") == 2
    assert flaky.attempts("StartRun") == 1


def test_no_retry_is_started_that_could_not_finish_before_the_deadline() -> None:
    now = 0.0
    policy = RetryPolicy(max_attempts=10, initial_backoff=1.0, max_backoff=1.0, jitter=lambda: 1.0)
    attempts = Attempts(policy, Retry.ON_UNAVAILABLE, timeout=2.5, clock=lambda: now)
    assert attempts.timeout() == 2.5
    now = 0.5  # the first attempt failed after half a second
    assert attempts.next_delay() == 1.0
    now = 1.5
    assert attempts.timeout() == 1.0  # the second attempt gets what is left
    now = 2.0
    assert attempts.next_delay() is None  # a third could not start before 2.5 s
    assert attempts.made == 2


def test_requests_for_different_rpcs_get_the_documented_rules() -> None:
    assert rule_for(broker_pb2.StartRunRequest()) is Retry.NEVER
    assert rule_for(broker_pb2.StartRunRequest(idempotency_key="k")) is Retry.ON_UNAVAILABLE
    assert rule_for(broker_pb2.ExecuteOnBehalfOfRequest()) is Retry.IF_NOT_RECEIVED
    assert rule_for(broker_pb2.RotateSigningKeyRequest()) is Retry.NEVER
    assert rule_for(broker_pb2.RevokeRunRequest()) is Retry.ON_UNAVAILABLE


@pytest.mark.parametrize("method", sorted(RETRIED_AFTER_UNAVAILABLE))
def test_a_call_the_server_cancelled_while_draining_is_retried_like_unavailable(
    method: str,
) -> None:
    flaky = FlakyBroker(failures=1, code=grpc.StatusCode.CANCELLED)
    with serving(flaky) as target, BrokerClient(target, retry=FAST_RETRY) as client:
        RETRIED_AFTER_UNAVAILABLE[method](client)
    assert flaky.attempts(method) == 2


def test_a_call_the_server_cancelled_is_not_retried_where_unavailable_would_not_be() -> None:
    flaky = FlakyBroker(failures=1, code=grpc.StatusCode.CANCELLED)
    with (
        serving(flaky) as target,
        BrokerClient(target, retry=FAST_RETRY) as client,
        pytest.raises(Exception, match="briefly unavailable"),
    ):
        client.start_run("acme", "web", "deploy", ceiling={"artifacts": "write"})
    assert flaky.attempts("StartRun") == 1


class _Cancelled(grpc.RpcError):
    def __init__(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None:
        return None


def test_a_call_this_process_cancelled_itself_is_never_retried() -> None:
    for local in ("Locally cancelled by application!", "Channel closed!"):
        assert not retryable(Retry.ON_UNAVAILABLE, _Cancelled(local))
    assert retryable(Retry.ON_UNAVAILABLE, _Cancelled("CANCELLED"))
    assert retryable(Retry.IF_NOT_RECEIVED, _Cancelled("CANCELLED"))
    assert not retryable(Retry.NEVER, _Cancelled("CANCELLED"))
