"""The asyncio client against a live broker: the same story, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from broker.api.server import BrokerServer
from tests.clientsupport import client_credentials
from tests.support import UNKNOWN_RUN_ID, eventually_async
from tokenbroker import AsyncBrokerClient, InvalidRequest, NotFound, RunNotActive, aio
from tokenbroker.v1 import types_pb2

Scenario = Callable[[AsyncBrokerClient], Awaitable[None]]


def run_with_client(server: BrokerServer, scenario: Scenario) -> None:
    """Run `scenario` in a fresh event loop with a client created inside it."""

    async def main() -> None:
        credentials = client_credentials(server)
        async with AsyncBrokerClient(server.target, credentials=credentials) as client:
            await scenario(client)

    asyncio.run(main())


def test_a_run_starts_mints_verifies_ends_and_shows_in_the_audit_log(
    server: BrokerServer,
) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        started = await client.start_run(
            "acme", "web", "deploy", ceiling={"artifacts": "write"}, deadline=3600
        )
        run_id = started.run.run_id
        issued = await client.issue_token("artifacts", {"artifacts": "write"}, run_id=run_id)
        assert (await client.verify_token(issued.token, "artifacts")).active
        ended = await client.revoke_run(run_id, reason="pipeline finished")
        assert ended.run.state == types_pb2.RUN_STATE_ENDED
        assert (await client.verify_token(issued.token)).reason == "run ended"
        actions = [e.action async for e in client.stream_audit(run_id=run_id, follow=False)]
        assert actions == ["run.started", "token.issued", "run.ended"]
        assert [r.run_id async for r in client.list_runs(state="ended")] == [run_id]

    run_with_client(server, scenario)


def test_async_errors_map_to_the_same_exceptions(server: BrokerServer) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        with pytest.raises(NotFound) as not_found:
            await client.get_run(UNKNOWN_RUN_ID)
        assert isinstance(not_found.value.__cause__, grpc.aio.AioRpcError)
        assert not_found.value.request_id
        with pytest.raises(InvalidRequest) as invalid:
            await client.issue_token("has spaces", run_id=UNKNOWN_RUN_ID, ttl=1)
        assert set(invalid.value.fields) == {"audience", "ttl"}
        run_id = (await client.start_run("acme", "web", "x", ceiling={"a": "read"})).run.run_id
        await client.revoke_run(run_id)
        with pytest.raises(RunNotActive):
            await client.issue_token("api", run_id=run_id)

    run_with_client(server, scenario)


def test_an_async_audit_stream_follows_live_until_cancelled(server: BrokerServer) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        stream = client.stream_audit(actions=["run.started"])
        seen: list[str] = []

        async def read() -> None:
            async for event in stream:
                seen.append(event.run_id)

        reader = asyncio.ensure_future(read())
        started = await client.start_run("acme", "web", "deploy", ceiling={"a": "read"})
        await eventually_async(lambda: seen, what="the stream to deliver the run's event")
        stream.cancel()  # while the reader waits for the next event
        await asyncio.wait_for(reader, timeout=5)
        assert seen == [started.run.run_id]
        assert stream.cursor >= 1

    run_with_client(server, scenario)


def test_an_async_step_token_comes_from_the_environment(server: BrokerServer) -> None:
    async def scenario(client: AsyncBrokerClient) -> None:
        started = await client.start_run("acme", "web", "deploy", ceiling={"pipelines": "read"})
        environ = {
            "TOKEN_BROKER_TARGET": server.target,
            "TOKEN_BROKER_RUN_CREDENTIAL": started.run_credential,
        }
        token = await aio.step_token("sample-api", {"pipelines": "read"}, environ=environ)
        verdict = await client.verify_token(token, "sample-api")
        assert verdict.run_id == started.run.run_id
        keys = await client.signing_keys()
        rotated = await client.rotate_signing_key()
        assert keys.keys[0].kid in rotated.retiring_key_ids

    run_with_client(server, scenario)
