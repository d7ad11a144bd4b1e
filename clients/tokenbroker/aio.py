"""`AsyncBrokerClient`: the same client for asyncio (grpc.aio).

    async with AsyncBrokerClient.local() as broker:
        started = await broker.start_run("acme", "web", "deploy", ceiling={"artifacts": "write"})
        async for event in broker.stream_audit(run_id=started.run.run_id, follow=False):
            print(event.action)

Methods, arguments, return values, deadlines, retries, errors and tracing are those of
`tokenbroker.client.BrokerClient` (the request builders, retry rules and error mapping are
shared); only the calls are awaited and the iterators are asynchronous. Create the client
inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import grpc
from google.protobuf.message import Message

from tokenbroker import messages
from tokenbroker.bound import StepToken
from tokenbroker.client import DEFAULT_TIMEOUT, local_credentials, tracing_wanted
from tokenbroker.connect import RunEnvironment, Tls, open_aio_channel
from tokenbroker.credentials import bearer_credentials
from tokenbroker.defaults import DEFAULT_TARGET
from tokenbroker.dpop import DPoPKey
from tokenbroker.errors import REQUEST_ID_HEADER, ConfigurationError, Unavailable, from_rpc_error
from tokenbroker.messages import Asserted, Permissions, Seconds
from tokenbroker.retry import Attempts, Retry, RetryPolicy, rule_for
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from tokenbroker.tracing import TracerProvider

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)


def _tracing_interceptors(
    target: str, tracer_provider: TracerProvider | None
) -> list[grpc.aio.ClientInterceptor]:
    """As `tokenbroker.client._traced` decides for `BrokerClient`: interceptors only when there
    is a provider or a trace to join, and OpenTelemetry is installed."""
    if not tracing_wanted(tracer_provider):
        return []
    try:
        from tokenbroker import tracing
    except ImportError:  # installed without the `tracing` extra
        return []
    return tracing.aio_client_interceptors(tracer_provider, target=target)


class AsyncBrokerClient:
    """An asyncio token-broker client; close it (or use `async with`)."""

    def __init__(
        self,
        target: str = "",
        *,
        credentials: grpc.CallCredentials | None = None,
        tls: Tls = None,
        channel: grpc.aio.Channel | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        run_id: str = "",
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """As `BrokerClient`; a given `channel` must be a grpc.aio channel.

        Tracing as `BrokerClient`: with a `tracer_provider`, every call (every attempt of a
        retried one, every opening of an audit stream) is a CLIENT span whose context goes to
        the broker; started inside another process's trace (`TRACEPARENT` in the
        environment), calls join that trace when no span of this process is current, with or
        without a provider. A given `channel` is used as it is."""
        if (channel is None) == (not target):
            raise ValueError("give a target or a channel (one of them)")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.target = target
        self.run_id = run_id
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._owns_channel = channel is None
        if channel is None:
            interceptors = _tracing_interceptors(target, tracer_provider)
            channel = open_aio_channel(target, credentials, tls, interceptors)
        self._channel = channel
        self._stub = broker_pb2_grpc.TokenBrokerServiceStub(self._channel)

    @classmethod
    def local(
        cls,
        target: str = DEFAULT_TARGET,
        data_dir: str | Path = "var",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> Self:
        """As `BrokerClient.local`: the development admin of a broker on this machine."""
        credentials = local_credentials(data_dir)
        return cls(target, credentials=credentials, timeout=timeout, retry=retry)

    @classmethod
    def for_run(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> Self:
        """As `BrokerClient.for_run`: the run of this pipeline step, from the environment."""
        env = RunEnvironment.from_environ(environ)
        return cls(
            env.target,
            credentials=bearer_credentials(env.run_credential),
            tls=env.tls,
            run_id=env.run_id,
            timeout=timeout,
            retry=retry,
        )

    async def close(self) -> None:
        """Close the channel (unless it was given to the constructor)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start_run(
        self,
        org: str,
        project: str,
        pipeline: str,
        *,
        ceiling: Permissions,
        deadline: Seconds | None = None,
        lease: Seconds | None = None,
        inputs: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        pipeline_ids: Mapping[str, str] | None = None,
        environment: str = "",
        timeout: float | None = None,
    ) -> broker_pb2.StartRunResponse:
        """As `BrokerClient.start_run`."""
        request = messages.start_run(
            org,
            project,
            pipeline,
            ceiling=ceiling,
            deadline=deadline,
            lease=lease,
            inputs=inputs,
            idempotency_key=idempotency_key,
            pipeline_ids=pipeline_ids,
            environment=environment,
        )
        return await self._unary(self._stub.StartRun, request, timeout)

    async def execute_on_behalf_of(
        self,
        org: str,
        project: str,
        pipeline: str,
        *,
        ceiling: Permissions,
        id_token: str | None = None,
        asserted: Asserted | None = None,
        deadline: Seconds | None = None,
        lease: Seconds | None = None,
        inputs: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        pipeline_ids: Mapping[str, str] | None = None,
        environment: str = "",
        timeout: float | None = None,
    ) -> broker_pb2.ExecuteOnBehalfOfResponse:
        """As `BrokerClient.execute_on_behalf_of`."""
        request = messages.execute_on_behalf_of(
            org,
            project,
            pipeline,
            ceiling=ceiling,
            id_token=id_token,
            asserted=asserted,
            deadline=deadline,
            lease=lease,
            inputs=inputs,
            idempotency_key=idempotency_key or messages.new_idempotency_key(),
            pipeline_ids=pipeline_ids,
            environment=environment,
        )
        return await self._unary(self._stub.ExecuteOnBehalfOf, request, timeout)

    async def renew_run(
        self, run_id: str = "", *, timeout: float | None = None
    ) -> broker_pb2.RenewRunResponse:
        """As `BrokerClient.renew_run`."""
        request = messages.renew_run(run_id or self.run_id)
        return await self._unary(self._stub.RenewRun, request, timeout)

    async def issue_token(
        self,
        audience: str,
        permissions: Permissions | None = None,
        *,
        run_id: str = "",
        ttl: Seconds | None = None,
        step: str = "",
        inherit_from: str = "",
        dpop_key: DPoPKey | None = None,
        bind_client_certificate: bool = False,
        timeout: float | None = None,
    ) -> broker_pb2.IssueTokenResponse:
        """As `BrokerClient.issue_token`."""
        request = messages.issue_token(
            audience,
            permissions,
            run_id=run_id or self.run_id,
            ttl=ttl,
            step=step,
            inherit_from=inherit_from,
            dpop_jwk=dpop_key.public_jwk_json if dpop_key is not None else "",
            bind_client_certificate=bind_client_certificate,
        )
        return await self._unary(self._stub.IssueToken, request, timeout)

    async def step_token(
        self,
        audience: str,
        permissions: Permissions | None = None,
        *,
        ttl: Seconds | None = None,
        step: str = "",
        bound: bool = True,
    ) -> str:
        """As `BrokerClient.step_token`: bound to a key made in memory unless `bound=False`."""
        if not self.run_id:
            raise ConfigurationError("this client acts for no run: use AsyncBrokerClient.for_run()")
        if not bound:
            return (await self.issue_token(audience, permissions, ttl=ttl, step=step)).token
        key = DPoPKey.generate()
        issued = await self.issue_token(audience, permissions, ttl=ttl, step=step, dpop_key=key)
        return StepToken(issued.token, key)

    async def verify_token(
        self,
        token: str,
        audience: str = "",
        *,
        proof: str = "",
        method: str = "",
        url: str = "",
        certificate_thumbprint: str = "",
        nonce: str = "",
        timeout: float | None = None,
    ) -> broker_pb2.VerifyTokenResponse:
        """As `BrokerClient.verify_token`."""
        request = messages.verify_token(
            token,
            audience,
            proof=proof,
            method=method,
            url=url,
            certificate_thumbprint=certificate_thumbprint,
            nonce=nonce,
        )
        return await self._unary(self._stub.VerifyToken, request, timeout)

    async def revoke_run(
        self, run_id: str = "", reason: str = "", *, timeout: float | None = None
    ) -> broker_pb2.RevokeRunResponse:
        """As `BrokerClient.revoke_run`."""
        request = messages.revoke_run(run_id or self.run_id, reason)
        return await self._unary(self._stub.RevokeRun, request, timeout)

    async def get_run(
        self, run_id: str, *, timeout: float | None = None
    ) -> broker_pb2.GetRunResponse:
        """As `BrokerClient.get_run`."""
        return await self._unary(self._stub.GetRun, messages.get_run(run_id), timeout)

    async def list_runs(
        self,
        *,
        org: str = "",
        project: str = "",
        pipeline: str = "",
        state: str | types_pb2.RunState.ValueType | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[types_pb2.Run]:
        """As `BrokerClient.list_runs`: every matching run, newest first."""
        page_token = ""
        while True:
            request = messages.list_runs(
                org=org,
                project=project,
                pipeline=pipeline,
                state=state,
                page_size=page_size,
                page_token=page_token,
            )
            page = await self._unary(self._stub.ListRuns, request, timeout)
            for run in page.runs:
                yield run
            page_token = page.next_page_token
            if not page_token:
                return

    async def signing_keys(
        self, *, timeout: float | None = None
    ) -> broker_pb2.GetSigningKeysResponse:
        """As `BrokerClient.signing_keys`."""
        request = broker_pb2.GetSigningKeysRequest()
        return await self._unary(self._stub.GetSigningKeys, request, timeout)

    async def rotate_signing_key(
        self, *, emergency: bool = False, timeout: float | None = None
    ) -> broker_pb2.RotateSigningKeyResponse:
        """As `BrokerClient.rotate_signing_key` (never retried)."""
        request = broker_pb2.RotateSigningKeyRequest(emergency=emergency)
        return await self._unary(self._stub.RotateSigningKey, request, timeout)

    def stream_audit(
        self,
        after: int = 0,
        *,
        run_id: str = "",
        principal: str = "",
        person: str = "",
        actions: Iterable[str] = (),
        org: str = "",
        project: str = "",
        follow: bool = True,
        timeout: float | None = None,
    ) -> AsyncAuditStream:
        """As `BrokerClient.stream_audit`, iterated with `async for`."""
        request = messages.stream_audit(
            after,
            run_id=run_id,
            principal=principal,
            person=person,
            actions=actions,
            org=org,
            project=project,
            follow=follow,
        )
        if timeout is None and not follow:
            timeout = self.timeout
        attempts = Attempts(self.retry, Retry.ON_UNAVAILABLE, timeout)
        return AsyncAuditStream(self._stub, request, attempts)

    async def _unary(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        timeout: float | None,
    ) -> Response:
        request_id = messages.new_request_id()
        attempts = Attempts(
            self.retry, rule_for(request), self.timeout if timeout is None else timeout
        )
        while True:
            try:
                return await rpc(
                    request,
                    timeout=attempts.timeout(),
                    metadata=((REQUEST_ID_HEADER, request_id),),
                )
            except grpc.RpcError as error:
                delay = attempts.delay_before_retry(error)
                if delay is None:
                    raise from_rpc_error(error, request_id) from error
            await asyncio.sleep(delay)


class AsyncAuditStream(AsyncIterator[types_pb2.AuditEvent]):
    """As `tokenbroker.client.AuditStream`, for `async for`; `cancel()` stops it."""

    def __init__(
        self,
        stub: broker_pb2_grpc.TokenBrokerServiceAsyncStub,
        request: broker_pb2.StreamAuditRequest,
        attempts: Attempts,
    ) -> None:
        self._stub = stub
        self._request = request
        self._follow = not request.stop_at_head
        self._attempts = attempts
        self._request_id = messages.new_request_id()
        self.cursor = request.after_sequence
        self._pending: collections.deque[types_pb2.AuditEvent] = collections.deque()
        self._call: (
            grpc.aio.UnaryStreamCall[broker_pb2.StreamAuditRequest, broker_pb2.StreamAuditResponse]
            | None
        ) = None
        self._cancelled = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> types_pb2.AuditEvent:
        if self._pending:
            return self._take()
        while True:
            call = self._open()
            try:
                item = await call.read()
            except grpc.RpcError as error:
                await self._resume(self._attempts.delay_before_retry(error), error)
                continue
            except asyncio.CancelledError:
                if not self._cancelled:
                    raise  # the task was cancelled, not the stream
                raise StopAsyncIteration from None
            if item is grpc.aio.EOF:
                if not self._follow:
                    raise StopAsyncIteration
                await self._resume(self._attempts.next_delay(), None)
                continue
            assert isinstance(item, broker_pb2.StreamAuditResponse)
            self._attempts.progressed()
            if item.HasField("heartbeat"):
                self.cursor = max(self.cursor, item.heartbeat.scanned_through)
                continue
            self._pending.extend(messages.events_of(item))
            if self._pending:
                return self._take()

    def _take(self) -> types_pb2.AuditEvent:
        """The next event of a page already received; the cursor moves with what is
        handed out, so a resumed stream neither skips nor repeats an event."""
        event = self._pending.popleft()
        self.cursor = event.sequence
        return event

    def _open(
        self,
    ) -> grpc.aio.UnaryStreamCall[broker_pb2.StreamAuditRequest, broker_pb2.StreamAuditResponse]:
        if self._cancelled:
            raise StopAsyncIteration
        if self._call is None:
            request = broker_pb2.StreamAuditRequest()
            request.CopyFrom(self._request)
            request.after_sequence = self.cursor
            self._call = self._stub.StreamAudit(
                request,
                timeout=self._attempts.timeout(),
                metadata=((REQUEST_ID_HEADER, self._request_id),),
            )
        return self._call

    async def _resume(self, delay: float | None, error: grpc.RpcError | None) -> None:
        self._call = None
        if self._cancelled:
            raise StopAsyncIteration
        if delay is None:
            if error is None:
                raise Unavailable("the broker ended the audit stream", request_id=self._request_id)
            raise from_rpc_error(error, self._request_id) from error
        await asyncio.sleep(delay)

    def cancel(self) -> None:
        """Stop the stream; iteration ends."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


async def step_token(
    audience: str,
    permissions: Permissions | None = None,
    *,
    ttl: Seconds | None = None,
    step: str = "",
    environ: Mapping[str, str] | None = None,
    bound: bool = True,
) -> str:
    """As `tokenbroker.step_token`, awaited."""
    async with AsyncBrokerClient.for_run(environ) as client:
        return await client.step_token(audience, permissions, ttl=ttl, step=step, bound=bound)
