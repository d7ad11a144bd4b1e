"""`BrokerClient`: token-broker from Python, one method per RPC.

    from datetime import timedelta
    from tokenbroker import BrokerClient

    with BrokerClient.local() as broker:              # a `make run` broker on this machine
        started = broker.start_run("acme", "web", "deploy",
                                   ceiling={"artifacts": "write"}, deadline=timedelta(hours=1))
        run_id = started.run.run_id
        token = broker.issue_token("artifacts.example.com", {"artifacts": "write"},
                                   run_id=run_id).token
        assert broker.verify_token(token, "artifacts.example.com").active
        broker.revoke_run(run_id, reason="pipeline finished")
        for event in broker.stream_audit(run_id=run_id, follow=False):
            print(event.sequence, event.action)

Methods take plain Python values — permissions as `{"resource": "level"}`, durations as
`timedelta` or seconds — and **return the RPC's generated response message** unchanged
(`broker_pb2.StartRunResponse`, …), so fields the broker adds later reach you without a new
client. The two exceptions iterate: `list_runs` yields `Run` messages across all pages and
`stream_audit` yields `AuditEvent` messages.

Every call has a deadline (`timeout`, default 10 s, per client or per call; it covers the
retries too). Calls are retried after UNAVAILABLE only where that is safe — see
`tokenbroker.retry`. Failures raise `tokenbroker.errors.BrokerError` subclasses.

In a pipeline step, `BrokerClient.for_run()` reads the broker address and the run
credential from the environment (TOKEN_BROKER_TARGET, TOKEN_BROKER_RUN_CREDENTIAL), and
`tokenbroker.step_token("api.example.com", {"pipelines": "read"})` is the whole job.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import grpc
from google.protobuf.message import Message

from tokenbroker import messages
from tokenbroker.bound import StepToken
from tokenbroker.connect import RunEnvironment, Tls, open_channel
from tokenbroker.credentials import bearer_credentials, dev_admin_credentials
from tokenbroker.defaults import DEFAULT_TARGET as DEFAULT_TARGET  # still importable from here
from tokenbroker.dpop import DPoPKey
from tokenbroker.errors import REQUEST_ID_HEADER, ConfigurationError, Unavailable, from_rpc_error
from tokenbroker.messages import Asserted, Permissions, Seconds
from tokenbroker.retry import Attempts, Retry, RetryPolicy, rule_for
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from tokenbroker.tracing import TracerProvider

DEFAULT_TIMEOUT = 10.0

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)


def local_credentials(data_dir: str | Path) -> grpc.CallCredentials:
    """The development admin credentials of a broker serving from `data_dir` without a policy;
    ConfigurationError when the broker has not written them there."""
    try:
        return dev_admin_credentials(data_dir)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigurationError(
            f"no development admin key in {data_dir}/ ({exc.__class__.__name__}): is a broker "
            "serving from that data dir without --policy? Otherwise pass credentials."
        ) from exc


def tracing_wanted(tracer_provider: TracerProvider | None) -> bool:
    """Whether a client's calls may be traced: with a provider, or started inside a trace
    (`TRACEPARENT`) to join. Otherwise a client has no tracing interceptor at all (one that
    can only make no-op spans is not worth its cost per call) and never imports OpenTelemetry."""
    return tracer_provider is not None or bool(os.environ.get("TRACEPARENT"))


def _traced(
    channel: grpc.Channel, target: str, tracer_provider: TracerProvider | None
) -> grpc.Channel:
    """`channel` traced when there is a provider or a trace to join; as it is otherwise, and
    when the client was installed without OpenTelemetry (no `tracing` extra)."""
    if not tracing_wanted(tracer_provider):
        return channel
    try:
        from tokenbroker import tracing
    except ImportError:  # installed without the `tracing` extra: nothing to join with
        return channel

    interceptor = tracing.client_interceptor(tracer_provider, target=target)
    return channel if interceptor is None else grpc.intercept_channel(channel, interceptor)


class BrokerClient:
    """A synchronous token-broker client; thread-safe; close it (or use `with`)."""

    def __init__(
        self,
        target: str = "",
        *,
        credentials: grpc.CallCredentials | None = None,
        tls: Tls = None,
        channel: grpc.Channel | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        run_id: str = "",
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """Connect to `target` (HOST:PORT) with `credentials`, or use an open `channel`
        (which the client then does not close). `tls`: see `tokenbroker.connect`.
        `run_id` is the run this client acts for (a run credential's own run).

        Tracing: with a `tracer_provider`, every call is a CLIENT span whose context goes to
        the broker. Started inside another process's trace (`TRACEPARENT` in the
        environment, as a CI runner sets it), calls join that trace when no span of this
        process is current, with or without a provider. A given `channel` is used as it is."""
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
            channel = _traced(open_channel(target, credentials, tls), target, tracer_provider)
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
        """A client for a broker on this machine started without a policy (`make run`),
        signed in as the development admin whose key the broker wrote to `data_dir`."""
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
        """A client acting for the run of this pipeline step, from TOKEN_BROKER_TARGET and
        TOKEN_BROKER_RUN_CREDENTIAL (see `tokenbroker.connect.RunEnvironment`)."""
        env = RunEnvironment.from_environ(environ)
        return cls(
            env.target,
            credentials=bearer_credentials(env.run_credential),
            tls=env.tls,
            run_id=env.run_id,
            timeout=timeout,
            retry=retry,
        )

    def close(self) -> None:
        """Close the channel (unless it was given to the constructor)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start_run(
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
        """Register a run; the response carries the run and its run credential.
        `pipeline_ids` (any of org_id, project_id, pipeline_id) and `environment` go into
        the run's tokens (docs/federation.md).
        Retried after UNAVAILABLE only when `idempotency_key` is given."""
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
        return self._unary(self._stub.StartRun, request, timeout)

    def execute_on_behalf_of(
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
        """Start a run for the person an `id_token` proves (or the caller `asserted`).
        Without an `idempotency_key` the client makes one for this call and its retries."""
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
        return self._unary(self._stub.ExecuteOnBehalfOf, request, timeout)

    def renew_run(
        self, run_id: str = "", *, timeout: float | None = None
    ) -> broker_pb2.RenewRunResponse:
        """Extend a run's lease (default: this client's own run)."""
        request = messages.renew_run(run_id or self.run_id)
        return self._unary(self._stub.RenewRun, request, timeout)

    def issue_token(
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
        """Mint a step token for `audience` (default run: this client's own); bound to
        `dpop_key` (cnf.jkt) or to this connection's client certificate when asked."""
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
        return self._unary(self._stub.IssueToken, request, timeout)

    def step_token(
        self,
        audience: str,
        permissions: Permissions | None = None,
        *,
        ttl: Seconds | None = None,
        step: str = "",
        bound: bool = True,
    ) -> str:
        """Give me my step token: a token of this client's run for `audience`.

        Bound by default (RFC 9449): a key is made in memory for it, and the answer is a
        `StepToken` — the token string, plus `.headers(method, url)` and `.auth()` that attach
        a fresh proof to each request — so a copy that leaks into a log is worthless.
        `bound=False` returns a plain bearer token, for tools that cannot send proofs."""
        if not self.run_id:
            raise ConfigurationError("this client acts for no run: use BrokerClient.for_run()")
        if not bound:
            return self.issue_token(audience, permissions, ttl=ttl, step=step).token
        key = DPoPKey.generate()
        issued = self.issue_token(audience, permissions, ttl=ttl, step=step, dpop_key=key)
        return StepToken(issued.token, key)

    def verify_token(
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
        """Check a token online; an invalid token is an answer (`active` False, `reason`).
        A bound token needs what came with it: its DPoP `proof`, the request's `method` and
        `url` (or the client certificate's thumbprint), and the nonce the API requires."""
        request = messages.verify_token(
            token,
            audience,
            proof=proof,
            method=method,
            url=url,
            certificate_thumbprint=certificate_thumbprint,
            nonce=nonce,
        )
        return self._unary(self._stub.VerifyToken, request, timeout)

    def revoke_run(
        self, run_id: str = "", reason: str = "", *, timeout: float | None = None
    ) -> broker_pb2.RevokeRunResponse:
        """End a run (default: this client's own); all its tokens die now. Idempotent."""
        request = messages.revoke_run(run_id or self.run_id, reason)
        return self._unary(self._stub.RevokeRun, request, timeout)

    def get_run(self, run_id: str, *, timeout: float | None = None) -> broker_pb2.GetRunResponse:
        """One run, with its attribution."""
        return self._unary(self._stub.GetRun, messages.get_run(run_id), timeout)

    def list_runs(
        self,
        *,
        org: str = "",
        project: str = "",
        pipeline: str = "",
        state: str | types_pb2.RunState.ValueType | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[types_pb2.Run]:
        """Every matching run, newest first, fetching pages as the iteration goes."""
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
            page = self._unary(self._stub.ListRuns, request, timeout)
            yield from page.runs
            page_token = page.next_page_token
            if not page_token:
                return

    def signing_keys(self, *, timeout: float | None = None) -> broker_pb2.GetSigningKeysResponse:
        """The published verification keys (JWKS) and the tokens' issuer."""
        return self._unary(self._stub.GetSigningKeys, broker_pb2.GetSigningKeysRequest(), timeout)

    def rotate_signing_key(
        self, *, emergency: bool = False, timeout: float | None = None
    ) -> broker_pb2.RotateSigningKeyResponse:
        """Publish new signing keys, which sign once the broker's pre-publication window has
        passed (`signs_from`), or at once with `emergency` (the old keys stop now). Never
        retried: each call rotates again."""
        request = broker_pb2.RotateSigningKeyRequest(emergency=emergency)
        return self._unary(self._stub.RotateSigningKey, request, timeout)

    def tree_head(self, *, timeout: float | None = None) -> broker_pb2.GetTreeHeadResponse:
        """The audit log's latest signed tree head and the key that verifies it."""
        return self._unary(self._stub.GetTreeHead, broker_pb2.GetTreeHeadRequest(), timeout)

    def prove_inclusion(
        self, sequence: int, tree_size: int = 0, *, timeout: float | None = None
    ) -> broker_pb2.ProveInclusionResponse:
        """Event `sequence` and its inclusion proof in the tree of `tree_size` (0: latest)."""
        request = broker_pb2.ProveInclusionRequest(sequence=sequence, tree_size=tree_size)
        return self._unary(self._stub.ProveInclusion, request, timeout)

    def prove_consistency(
        self, first: int, second: int = 0, *, timeout: float | None = None
    ) -> broker_pb2.ProveConsistencyResponse:
        """The proof that the tree of `second` (0: latest) extends the tree of `first`."""
        request = broker_pb2.ProveConsistencyRequest(first=first, second=second)
        return self._unary(self._stub.ProveConsistency, request, timeout)

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
    ) -> AuditStream:
        """Audit events after sequence `after`, then live ones while `follow` (until
        cancelled); with `follow=False` it ends at the log's head. Resumes by itself after
        an interruption. A following stream has no deadline unless `timeout` is given."""
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
        return AuditStream(self._stub, request, Attempts(self.retry, Retry.ON_UNAVAILABLE, timeout))

    def _unary(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        timeout: float | None,
    ) -> Response:
        request_id = messages.new_request_id()
        attempts = Attempts(
            self.retry, rule_for(request), self.timeout if timeout is None else timeout
        )
        while True:
            try:
                return rpc(
                    request,
                    timeout=attempts.timeout(),
                    metadata=((REQUEST_ID_HEADER, request_id),),
                )
            except grpc.RpcError as error:
                delay = attempts.delay_before_retry(error)
                if delay is None:
                    raise from_rpc_error(error, request_id) from error
            time.sleep(delay)


class AuditStream(Iterator[types_pb2.AuditEvent]):
    """Audit events as they come; `cursor` is the sequence to resume after. Cancel it (or
    leave its `with` block) to stop following."""

    def __init__(
        self,
        stub: broker_pb2_grpc.TokenBrokerServiceStub,
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
        self._call: Iterator[broker_pb2.StreamAuditResponse] | None = None
        self._cancelled = False
        self._lock = threading.Lock()  # so cancel() reaches the call actually running

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> types_pb2.AuditEvent:
        if self._pending:
            return self._take()
        while True:
            call = self._open()
            try:
                item = next(call)
            except StopIteration:
                if not self._follow or self._cancelled:
                    raise
                self._resume(self._attempts.next_delay(), None)  # the broker is going away
                continue
            except grpc.RpcError as error:
                if self._cancelled:
                    raise StopIteration from None
                self._resume(self._attempts.delay_before_retry(error), error)
                continue
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

    def _open(self) -> Iterator[broker_pb2.StreamAuditResponse]:
        with self._lock:
            if self._cancelled:
                raise StopIteration
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

    def _resume(self, delay: float | None, error: grpc.RpcError | None) -> None:
        """Reopen after `delay` seconds from the cursor, or raise when that is not allowed."""
        self._call = None
        if delay is None:
            if error is None:
                raise Unavailable("the broker ended the audit stream", request_id=self._request_id)
            raise from_rpc_error(error, self._request_id) from error
        time.sleep(delay)

    def cancel(self) -> None:
        """Stop the stream; iteration ends (also when called from another thread)."""
        with self._lock:
            self._cancelled = True
            if isinstance(self._call, grpc.Call):
                self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


def step_token(
    audience: str,
    permissions: Permissions | None = None,
    *,
    ttl: Seconds | None = None,
    step: str = "",
    environ: Mapping[str, str] | None = None,
    bound: bool = True,
) -> str:
    """Give me my step token: in a pipeline step, mint a token of this step's run for
    `audience`, from the broker and run credential in the environment (like GITHUB_TOKEN).
    Bound to a key made in memory unless `bound=False` (see `BrokerClient.step_token`)."""
    with BrokerClient.for_run(environ) as client:
        return client.step_token(audience, permissions, ttl=ttl, step=step, bound=bound)
