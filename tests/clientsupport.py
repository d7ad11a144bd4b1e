"""Shared by the client library tests: the credential they call with, and a flaky fake broker
for retry tests."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from google.protobuf.message import Message

from broker.api.server import BrokerServer
from tests.accounts import standard_accounts
from tokenbroker.credentials import assertion_credentials
from tokenbroker.retry import RetryPolicy
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

# Short waits so retry tests stay fast; the count of attempts is what they check.
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.005)


def client_credentials(server: BrokerServer) -> grpc.CallCredentials:
    """The one credential the client tests call `server` with: root of the standard test
    policy (orchestrator, auditor and admin: the README example reads the audit stream and
    the rotation tests rotate keys)."""
    root = standard_accounts()["root"]
    audience = server.broker.authn.audience
    return assertion_credentials(root.name, root.private_pem, audience, key_id=root.kid)


class FlakyBroker(broker_pb2_grpc.TokenBrokerServiceServicer):
    """Answers UNAVAILABLE to the first `failures` attempts of each RPC, then succeeds.

    With `answered`, the failures look like the broker's own (a request id is sent first);
    otherwise like a call that never reached it.
    """

    def __init__(
        self,
        failures: int,
        *,
        answered: bool = False,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    ) -> None:
        """`code`: what the failures answer (CANCELLED: as a broker shutting down does)."""
        self.failures = failures
        self.answered = answered
        self.code = code
        self.requests: dict[str, list[Message]] = {}

    def attempts(self, method: str) -> int:
        return len(self.requests.get(method, []))

    def _attempt(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        self.requests.setdefault(method, []).append(request)
        if self.attempts(method) <= self.failures:
            if self.answered:
                context.send_initial_metadata((("x-request-id", "fake-broker"),))
            context.abort(self.code, "briefly unavailable")

    def GetRun(
        self, request: broker_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.GetRunResponse:
        self._attempt("GetRun", request, context)
        return broker_pb2.GetRunResponse(run=types_pb2.Run(run_id=request.run_id))

    def StartRun(
        self, request: broker_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.StartRunResponse:
        self._attempt("StartRun", request, context)
        return broker_pb2.StartRunResponse(run=types_pb2.Run(run_id="r-fake"))

    def ExecuteOnBehalfOf(
        self, request: broker_pb2.ExecuteOnBehalfOfRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ExecuteOnBehalfOfResponse:
        self._attempt("ExecuteOnBehalfOf", request, context)
        return broker_pb2.ExecuteOnBehalfOfResponse(run=types_pb2.Run(run_id="r-fake"))

    def IssueToken(
        self, request: broker_pb2.IssueTokenRequest, context: grpc.ServicerContext
    ) -> broker_pb2.IssueTokenResponse:
        self._attempt("IssueToken", request, context)
        return broker_pb2.IssueTokenResponse(token="t", token_id="tok-fake")

    def RotateSigningKey(
        self, request: broker_pb2.RotateSigningKeyRequest, context: grpc.ServicerContext
    ) -> broker_pb2.RotateSigningKeyResponse:
        self._attempt("RotateSigningKey", request, context)
        return broker_pb2.RotateSigningKeyResponse(key_id="k-new")

    def RenewRun(
        self, request: broker_pb2.RenewRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.RenewRunResponse:
        self._attempt("RenewRun", request, context)
        return broker_pb2.RenewRunResponse(run=types_pb2.Run(run_id=request.run_id))

    def VerifyToken(
        self, request: broker_pb2.VerifyTokenRequest, context: grpc.ServicerContext
    ) -> broker_pb2.VerifyTokenResponse:
        self._attempt("VerifyToken", request, context)
        return broker_pb2.VerifyTokenResponse(active=False, reason="fake")

    def RevokeRun(
        self, request: broker_pb2.RevokeRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.RevokeRunResponse:
        self._attempt("RevokeRun", request, context)
        return broker_pb2.RevokeRunResponse(run=types_pb2.Run(run_id=request.run_id))

    def ListRuns(
        self, request: broker_pb2.ListRunsRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ListRunsResponse:
        """Two pages: the first one points at the second."""
        self._attempt("ListRuns", request, context)
        if not request.page_token:
            return broker_pb2.ListRunsResponse(
                runs=[types_pb2.Run(run_id="r-b")], next_page_token="p2"
            )
        return broker_pb2.ListRunsResponse(runs=[types_pb2.Run(run_id="r-a")])

    def GetSigningKeys(
        self, request: broker_pb2.GetSigningKeysRequest, context: grpc.ServicerContext
    ) -> broker_pb2.GetSigningKeysResponse:
        self._attempt("GetSigningKeys", request, context)
        return broker_pb2.GetSigningKeysResponse(issuer="https://fake")

    def GetTreeHead(
        self, request: broker_pb2.GetTreeHeadRequest, context: grpc.ServicerContext
    ) -> broker_pb2.GetTreeHeadResponse:
        self._attempt("GetTreeHead", request, context)
        return broker_pb2.GetTreeHeadResponse()

    def ProveInclusion(
        self, request: broker_pb2.ProveInclusionRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ProveInclusionResponse:
        self._attempt("ProveInclusion", request, context)
        return broker_pb2.ProveInclusionResponse()

    def ProveConsistency(
        self, request: broker_pb2.ProveConsistencyRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ProveConsistencyResponse:
        self._attempt("ProveConsistency", request, context)
        return broker_pb2.ProveConsistencyResponse()

    def StreamAudit(
        self, request: broker_pb2.StreamAuditRequest, context: grpc.ServicerContext
    ) -> Iterator[broker_pb2.StreamAuditResponse]:
        """One event per connection; every connection but the last breaks after it."""
        self.requests.setdefault("StreamAudit", []).append(request)
        event = types_pb2.AuditEvent(sequence=request.after_sequence + 1, action="run.started")
        yield broker_pb2.StreamAuditResponse(event=event)
        if self.attempts("StreamAudit") <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")


@contextmanager
def serving(servicer: broker_pb2_grpc.TokenBrokerServiceServicer) -> Iterator[str]:
    """Serve `servicer` on a loopback port; yield its target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    broker_pb2_grpc.add_TokenBrokerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()
