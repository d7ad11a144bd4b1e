"""A sample PipelineExecutorService: what a real executor does with a run it is handed.

`Execute` accepts the run at once; then, in the background, the "pipeline" has one step:
with the run credential it mints a step token (`pipelines: read`, audience "sample-api"),
bound to a key made in memory for the step (the client's default), calls the sample API with
it and a fresh DPoP proof, records what the API answered and ends the run with RevokeRun
("pipeline finished") — so every token of the run dies with it. With `show_leak` (the demo)
it also shows what a leaked copy of the token would get: the token alone, without a proof,
is refused.

    with SampleExecutor(api_url=api.url) as executor:       # serves on 127.0.0.1, port 0
        ...start a broker with --executor-target executor.target...
        execution = executor.wait_for(run_id)

With a `tracer_provider` the executor joins the run's trace: `Execute` is a SERVER span in
the broker's trace, the pipeline continues that context in its own thread (a pipeline-run
span, a span per step), its calls to the broker and the API carry `traceparent` and the
baggage the broker sent — run id, pipeline, person — and `tracing.baggage_span_processor()`
on the provider stamps those onto every span.

Not for production: no persistence, no retries of the pipeline itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from tokenbroker import tracing
from tokenbroker.bound import dpop_credentials
from tokenbroker.client import BrokerClient
from tokenbroker.connect import open_channel
from tokenbroker.credentials import bearer_credentials
from tokenbroker.dpop import DPoPKey
from tokenbroker.errors import BrokerError
from tokenbroker.samples.api import AUDIENCE, ApiAnswer, call_api
from tokenbroker.v1 import executor_pb2, executor_pb2_grpc, types_pb2
from tokenbroker.verification import read_claims

log = logging.getLogger(__name__)

STEP = "call-sample-api"
STEP_PERMISSIONS = {"pipelines": "read"}
FINISHED = "pipeline finished"
MAX_REASON = 512  # what RevokeRun records at most

# CICD semantic conventions (https://opentelemetry.io/docs/specs/semconv/cicd/cicd-spans/).
ACTION = "cicd.pipeline.action.name"
RESULT = "cicd.pipeline.result"
TASK_NAME = "cicd.pipeline.task.name"


@dataclass(frozen=True)
class Execution:
    """One run as the executor carried it out."""

    execution_id: str
    run_id: str
    api_status: int  # 0 when the API was never reached
    api_answer: Mapping[str, Any]
    run_ended: bool
    error: str = ""
    # The step token, kept so a demo can show it is refused once the run has ended.
    token: str = field(default="", repr=False)
    # What the API answered to the token alone (as a leak into a log would give it).
    leaked_answer: ApiAnswer = field(default=ApiAnswer(0, {}), repr=False)
    # The key the run credential it was handed is bound to (its cnf.jkt), "" if unbound.
    credential_jkt: str = ""


class SampleExecutor(executor_pb2_grpc.PipelineExecutorServiceServicer):
    """The executor's gRPC server and its background pipelines; start, then stop (or `with`)."""

    def __init__(
        self,
        api_url: str = "",
        *,
        audience: str = AUDIENCE,
        tracer_provider: trace.TracerProvider | None = None,
        show_leak: bool = False,
        dpop_key: DPoPKey | None = None,
    ) -> None:
        """`api_url` is what the step calls; it may be set later, before runs arrive.
        `show_leak`: also send the step token alone, as a leak would, and record the answer.
        `dpop_key`: the executor's own key, when the broker binds the run credentials it
        hands over to it (`--executor-dpop-jwk` with `public_jwk_json`): every call then
        carries a fresh DPoP proof."""
        self.api_url = api_url
        self.show_leak = show_leak
        self.dpop_key = dpop_key
        self.audience = audience
        self.tracer_provider = tracer_provider
        interceptors: list[grpc.ServerInterceptor] = []
        if tracer_provider is not None:
            interceptors.append(tracing.ServerTracingInterceptor(tracer_provider))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors
        )
        executor_pb2_grpc.add_PipelineExecutorServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._done: list[Execution] = []
        self._changed = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._stopping = False

    @property
    def target(self) -> str:
        """The address to give the broker as --executor-target."""
        return f"127.0.0.1:{self.port}"

    @property
    def executions(self) -> list[Execution]:
        """Executions finished so far, in the order they finished."""
        with self._changed:
            return list(self._done)

    def start(self) -> Self:
        """Start serving."""
        self._server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Refuse new runs, let running pipelines finish (briefly), stop serving."""
        with self._changed:
            self._stopping = True
            workers = list(self._workers)
        self._server.stop(grace).wait()
        for worker in workers:
            worker.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for(self, run_id: str, timeout: float = 10.0) -> Execution:
        """The execution of `run_id` once finished; TimeoutError if it does not in time."""
        with self._changed:
            found = self._changed.wait_for(lambda: self._find(run_id), timeout)
        if not found:
            raise TimeoutError(f"run {run_id} did not finish within {timeout:g}s")
        return found

    def _find(self, run_id: str) -> Execution | None:
        return next((e for e in self._done if e.run_id == run_id), None)

    def Execute(
        self, request: executor_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> executor_pb2.ExecuteResponse:
        """Accept the run and carry it out in the background."""
        if not request.run.run_id or not request.run_credential or not request.broker_target:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "run, run_credential and broker_target required"
            )
        execution_id = f"x-{uuid.uuid4().hex[:12]}"
        # The pipeline continues this call's context (its trace, the broker's baggage).
        worker = threading.Thread(
            target=contextvars.copy_context().run,
            args=(
                self._carry_out,
                execution_id,
                request.run,
                request.run_credential,
                request.broker_target,
            ),
            name=f"pipeline-{execution_id}",
        )
        with self._changed:
            if self._stopping or not self.api_url:
                return executor_pb2.ExecuteResponse(accepted=False)
            self._workers.append(worker)
        worker.start()
        log.info("run accepted", extra={"run_id": request.run.run_id, "execution": execution_id})
        return executor_pb2.ExecuteResponse(accepted=True, execution_id=execution_id)

    def _carry_out(
        self, execution_id: str, run: types_pb2.Run, credential: str, broker_target: str
    ) -> None:
        token, answer, error = "", ApiAnswer(0, {}), ""
        leaked = ApiAnswer(0, {})
        ended = False
        with (
            self._pipeline_span(run) as pipeline,
            self._broker(broker_target, credential) as channel,
        ):
            broker = BrokerClient(channel=channel, run_id=run.run_id)
            try:
                with self._span(STEP, SpanKind.INTERNAL, {TASK_NAME: STEP}) as step:
                    token = broker.step_token(self.audience, STEP_PERMISSIONS, step=STEP)
                    answer = call_api(self.api_url, token, tracer_provider=self.tracer_provider)
                    if answer.status != 200:
                        _failed(step, str(answer.status))
                    if self.show_leak:
                        # The string alone, without the key: what a build log's reader holds.
                        leaked = call_api(self.api_url, str(token))
            except (BrokerError, OSError, ValueError) as exc:
                error = f"step failed: {exc}"
            try:
                reason = FINISHED if not error else f"pipeline failed: {error}"[:MAX_REASON]
                broker.revoke_run(reason=reason)
                ended = True
            except BrokerError as exc:
                error = error or f"could not end the run: {exc}"
            _finished(pipeline, succeeded=not error and answer.status == 200)
        claims = read_claims(credential) or {}
        cnf = claims.get("cnf")
        jkt = str(cnf.get("jkt", "")) if isinstance(cnf, dict) else ""
        execution = Execution(
            execution_id, run.run_id, answer.status, answer.body, ended, error, token, leaked, jkt
        )
        with self._changed:
            self._done.append(execution)
            self._changed.notify_all()

    def _broker(self, target: str, credential: str) -> grpc.Channel:
        """A channel to the broker as the run; traced (context and baggage go out) if asked."""
        credentials = (
            dpop_credentials(credential, self.dpop_key)
            if self.dpop_key is not None
            else bearer_credentials(credential)
        )
        channel = open_channel(target, credentials)
        if self.tracer_provider is None:
            return channel
        return tracing.intercept_channel(channel, self.tracer_provider, target=target)

    def _pipeline_span(self, run: types_pb2.Run) -> contextlib.AbstractContextManager[Span]:
        """The pipeline-run span (CICD semantic conventions: SERVER, "{action} {pipeline}")."""
        ref = run.pipeline
        name = f"{ref.org}/{ref.project}/{ref.pipeline}"
        attributes = {ACTION: "RUN", tracing.PIPELINE: name, tracing.RUN_ID: run.run_id}
        return self._span(f"RUN {name}", SpanKind.SERVER, attributes)

    @contextlib.contextmanager
    def _span(self, name: str, kind: SpanKind, attributes: Mapping[str, str]) -> Iterator[Span]:
        """A current span of the executor's provider; none without a provider."""
        if self.tracer_provider is None:
            yield INVALID_SPAN
            return
        tracer = trace.get_tracer(__name__, tracer_provider=self.tracer_provider)
        with tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            yield span


def _failed(span: Span, error_type: str) -> None:
    span.set_attribute(tracing.ERROR_TYPE, error_type)
    span.set_status(Status(StatusCode.ERROR))


def _finished(pipeline: Span, *, succeeded: bool) -> None:
    pipeline.set_attribute(RESULT, "success" if succeeded else "failure")
    if not succeeded:
        _failed(pipeline, "step_failed")
