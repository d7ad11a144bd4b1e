"""TokenBrokerService: proto in → one domain call → proto out. No logic lives here."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import grpc

from broker import limits
from broker.api import convert
from broker.api import interceptor as calls
from broker.app import Broker
from broker.audit.feed import AuditFilter, Heartbeat
from broker.errors import InvalidArgument
from broker.runs.lifecycle import DEFAULT_PAGE_SIZE
from broker.store import RunQuery
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

# StreamAudit pages: at most this many events, and about this many bytes, per message.
MAX_EVENTS_PER_MESSAGE = 1000
MAX_PAGE_BYTES = 1 << 20


class TokenBrokerServicer(broker_pb2_grpc.TokenBrokerServiceServicer):
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._encoded = convert.EncodedEvents()

    def StartRun(
        self, request: broker_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.StartRunResponse:
        binding = convert.credential_binding(request)
        started = self._broker.runs.start(
            calls.current(), convert.run_spec(request), credential_bound=binding.bound
        )
        credential = self._broker.tokens.mint_run_credential(started.run, binding)
        return broker_pb2.StartRunResponse(
            run=convert.run_pb(started.run),
            run_credential=credential.token,
            run_credential_expire_time=convert.timestamp(credential.expire_time),
        )

    def ExecuteOnBehalfOf(
        self, request: broker_pb2.ExecuteOnBehalfOfRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ExecuteOnBehalfOfResponse:
        executed = self._broker.delegation.execute(
            calls.current(),
            convert.run_spec(request),
            request.id_token if request.WhichOneof("person") == "id_token" else None,
            convert.asserted_identity(request),
            convert.credential_binding(request),
        )
        response = broker_pb2.ExecuteOnBehalfOfResponse(
            run=convert.run_pb(executed.run),
            handed_off=executed.handed_off,
            replayed=executed.replayed,
        )
        if executed.credential is not None:
            response.run_credential = executed.credential.token
            response.run_credential_expire_time.CopyFrom(
                convert.timestamp(executed.credential.expire_time)
            )
        return response

    def RenewRun(
        self, request: broker_pb2.RenewRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.RenewRunResponse:
        run = self._broker.runs.renew(calls.current(), request.run_id)
        return broker_pb2.RenewRunResponse(run=convert.run_pb(run))

    def IssueToken(
        self, request: broker_pb2.IssueTokenRequest, context: grpc.ServicerContext
    ) -> broker_pb2.IssueTokenResponse:
        minted = self._broker.issuance.issue(calls.current(), convert.token_request(request))
        return broker_pb2.IssueTokenResponse(
            token=minted.token,
            token_id=minted.token_id,
            expire_time=convert.timestamp(minted.expire_time),
            permissions=convert.permissions_pb(minted.permissions),
            key_id=minted.key_id,
            cnf_jkt=minted.binding.jkt,
            cnf_x5t_s256=minted.binding.x5t,
        )

    def VerifyToken(
        self, request: broker_pb2.VerifyTokenRequest, context: grpc.ServicerContext
    ) -> broker_pb2.VerifyTokenResponse:
        result = self._broker.issuance.verify(
            calls.current(), request.token, request.audience, convert.presentation(request)
        )
        return convert.verification_pb(result)

    def RevokeRun(
        self, request: broker_pb2.RevokeRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.RevokeRunResponse:
        run, already = self._broker.runs.end(calls.current(), request.run_id, request.reason)
        return broker_pb2.RevokeRunResponse(run=convert.run_pb(run), already_ended=already)

    def GetRun(
        self, request: broker_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> broker_pb2.GetRunResponse:
        return broker_pb2.GetRunResponse(
            run=convert.run_pb(self._broker.runs.read(calls.current(), request.run_id))
        )

    def ListRuns(
        self, request: broker_pb2.ListRunsRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ListRunsResponse:
        query = RunQuery(
            org=request.org,
            project=request.project,
            pipeline=request.pipeline,
            state=convert.RUN_STATE_FROM_PB.get(request.state),
            limit=request.page_size or DEFAULT_PAGE_SIZE,
            before=_decode_page_token(request.page_token),
        )
        runs = self._broker.runs.list(calls.current(), query)
        # A page may hold fewer than page_size runs, with a next_page_token, when they are
        # large: far below the 4 MiB a default client accepts, whatever the page size.
        page = convert.runs_within(runs, limits.MAX_PAGE_BYTES)
        next_token = ""
        if len(page) < len(runs) or len(runs) == query.limit:
            last = runs[len(page) - 1]
            next_token = _encode_page_token(last.create_time, last.run_id)
        return broker_pb2.ListRunsResponse(runs=page, next_page_token=next_token)

    def GetSigningKeys(
        self, request: broker_pb2.GetSigningKeysRequest, context: grpc.ServicerContext
    ) -> broker_pb2.GetSigningKeysResponse:
        jwks = self._broker.keys.jwks()
        return broker_pb2.GetSigningKeysResponse(
            keys=[convert.jwk_pb(k) for k in jwks["keys"]],
            jwks_json=json.dumps(jwks),
            issuer=self._broker.tokens.issuer,
            schedule=[convert.key_status_pb(k) for k in self._broker.keys.schedule()],
        )

    def RotateSigningKey(
        self, request: broker_pb2.RotateSigningKeyRequest, context: grpc.ServicerContext
    ) -> broker_pb2.RotateSigningKeyResponse:
        rotation = self._broker.keys.rotate(calls.current(), emergency=request.emergency)
        return broker_pb2.RotateSigningKeyResponse(
            key_id=rotation.new_kids[0],
            retiring_key_ids=rotation.retiring_kids,
            signs_from=convert.timestamp(rotation.signs_from),
            new_key_ids=rotation.new_kids,
            emergency=rotation.emergency,
        )

    def GetTreeHead(
        self, request: broker_pb2.GetTreeHeadRequest, context: grpc.ServicerContext
    ) -> broker_pb2.GetTreeHeadResponse:
        heads = self._broker.tree_heads
        served = self._broker.quorum.cosigned(heads.tree_head(calls.current()))
        return broker_pb2.GetTreeHeadResponse(
            tree_head=convert.tree_head_pb(served.head, served.note),
            verifier_key=heads.verifier_key,
            cosignatures=served.cosignatures,
            final=served.final,
        )

    def ProveInclusion(
        self, request: broker_pb2.ProveInclusionRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ProveInclusionResponse:
        proof = self._broker.tree_heads.prove_inclusion(
            calls.current(), request.sequence, request.tree_size
        )
        return convert.inclusion_pb(proof)

    def ProveConsistency(
        self, request: broker_pb2.ProveConsistencyRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ProveConsistencyResponse:
        proof = self._broker.tree_heads.prove_consistency(
            calls.current(), request.first, request.second
        )
        return broker_pb2.ProveConsistencyResponse(
            first=proof.first,
            second=proof.second,
            proof=proof.hashes,
            tree_head=convert.tree_head_pb(proof.head),
        )

    @property
    def encoded_events(self) -> convert.EncodedEvents:
        return self._encoded

    def StreamAudit(  # type: ignore[override]  # bytes: responses serialised already
        self, request: broker_pb2.StreamAuditRequest, context: grpc.ServicerContext
    ) -> Iterator[broker_pb2.StreamAuditResponse | bytes]:
        """Events go out as bytes put together from each event's one encoding (the
        interceptor's serializer sends bytes as they are); heartbeats as messages."""
        f = request.filter
        event_filter = AuditFilter(
            run_id=f.run_id,
            principal=f.principal,
            person=f.person,
            actions=frozenset(f.actions),
            org=f.org,
            project=f.project,
        )
        pages = self._broker.feed.follow_pages(
            calls.current(),
            request.after_sequence,
            event_filter,
            stop_at_head=request.stop_at_head,
            cancelled=lambda: not context.is_active(),
        )
        per_message = min(max(request.max_events_per_message, 1), MAX_EVENTS_PER_MESSAGE)
        for item in pages:
            if isinstance(item, Heartbeat):
                yield broker_pb2.StreamAuditResponse(
                    heartbeat=broker_pb2.StreamAuditHeartbeat(
                        scanned_through=item.scanned_through, time=convert.timestamp(item.time)
                    )
                )
            elif per_message == 1:
                for event in item:
                    yield convert.event_message(self._encoded.of(event))
            else:
                for chunk in _pages([self._encoded.of(e) for e in item], per_message):
                    yield convert.page_message(chunk)


def _pages(events: list[bytes], per_message: int) -> Iterator[list[bytes]]:
    """Consecutive chunks of at most `per_message` events and about MAX_PAGE_BYTES each, so
    a page stays far below gRPC's 4 MB message limit whatever the events hold."""
    chunk: list[bytes] = []
    size = 0
    for event in events:
        event_size = len(event)
        if chunk and (len(chunk) == per_message or size + event_size > MAX_PAGE_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(event)
        size += event_size
    if chunk:
        yield chunk


def _encode_page_token(create_time: float, run_id: str) -> str:
    raw = json.dumps([create_time, run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        create_time, run_id = json.loads(base64.urlsafe_b64decode(padded))
        return float(create_time), str(run_id)
    except (ValueError, TypeError):
        raise InvalidArgument.field(
            "page_token", "not a token returned by ListRuns; start again without one"
        ) from None
