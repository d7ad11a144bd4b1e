"""Hand-off of delegated runs to a PipelineExecutorService over gRPC (the outbound edge)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from broker.api import convert
from broker.runs.binding import UNBOUND, Binding
from broker.runs.delegation import HandoffFailed
from broker.runs.model import Run
from broker.telemetry.otel import Telemetry, handed_off_run_attributes
from tokenbroker import tracing
from tokenbroker.v1 import executor_pb2, executor_pb2_grpc

HANDOFF_TIMEOUT = 10.0


def traced_channel(channel: grpc.Channel, telemetry: Telemetry, target: str = "") -> grpc.Channel:
    """An outgoing channel (to an executor at `target`) whose calls join the current trace; a
    call made while `telemetry.handing_off(run)` names the run on its span, from the broker's
    record."""
    return tracing.intercept_channel(
        channel, telemetry.tracer_provider, attributes=handed_off_run_attributes, target=target
    )


class GrpcHandoff:
    def __init__(self, target: str, binding: Binding = UNBOUND) -> None:
        # The executor's key (--executor-dpop-jwk): credentials handed to it are bound to it.
        self.binding = binding
        # Plaintext only on loopback or with --insecure: Settings refuses anything else.
        self._channel = grpc.insecure_channel(target)
        self._stub = executor_pb2_grpc.PipelineExecutorServiceStub(self._channel)
        self.broker_target = ""  # where the executor calls back; set once the port is bound

    def instrument(self, wrap: Callable[[grpc.Channel], grpc.Channel]) -> None:
        """Route hand-offs through `wrap(channel)` (tracing: the executor joins the trace)."""
        self._stub = executor_pb2_grpc.PipelineExecutorServiceStub(wrap(self._channel))

    def hand_off(self, run: Run, credential: str) -> str:
        request = executor_pb2.ExecuteRequest(
            run=convert.run_pb(run), run_credential=credential, broker_target=self.broker_target
        )
        try:
            response = self._stub.Execute(request, timeout=HANDOFF_TIMEOUT)
        except grpc.RpcError as error:
            raise HandoffFailed(f"{error.code().name}: {error.details()}") from None
        if not response.accepted:
            raise HandoffFailed("the executor declined the run")
        return response.execution_id

    def close(self) -> None:
        self._channel.close()
