"""Protobuf ⇄ domain. Pure functions; validation of values happens in the domain types."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from broker import limits
from broker.api import eventwire
from broker.api.eventwire import METHOD_TO_PB, OUTCOME_TO_PB
from broker.audit import events as audit
from broker.audit.events import AuditEvent
from broker.audit.treehead import InclusionProof, TreeHead
from broker.errors import InvalidArgument
from broker.identity import Person
from broker.runs import model as runs
from broker.runs.binding import Binding, jkt_of_jwk
from broker.runs.delegation import AssertedIdentity
from broker.runs.issuance import DEFAULT_TTL, TokenRequest
from broker.runs.keys import PREPUBLISHED, RETIRING, SIGNING, KeyStatus
from broker.runs.lifecycle import DEFAULT_DEADLINE, RunSpec
from broker.runs.model import PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from tokenbroker.dpop import Presentation
from tokenbroker.v1 import broker_pb2, types_pb2
from tokenbroker.verification import CheckResult, TokenStatus

RUN_STATE_TO_PB = {
    RunState.ACTIVE: types_pb2.RUN_STATE_ACTIVE,
    RunState.ENDED: types_pb2.RUN_STATE_ENDED,
    RunState.EXPIRED: types_pb2.RUN_STATE_EXPIRED,
}
RUN_STATE_FROM_PB = {v: k for k, v in RUN_STATE_TO_PB.items()}


TOKEN_STATUS_TO_PB = {
    status: getattr(broker_pb2, f"TOKEN_STATUS_{status.name}") for status in TokenStatus
}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(round(seconds * 1_000_000))
    return ts


def duration_seconds(message: Any, has: bool, field: str, default: float | None) -> float | None:
    """Seconds of an optional Duration field; `default` when unset. Rejects negative or NaN."""
    if not has:
        return default
    value = message.seconds + message.nanos / 1e9
    if value <= 0 or math.isnan(value):
        raise InvalidArgument.field(field, "must be a positive duration")
    return float(value)


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMicroseconds(round(seconds * 1_000_000))
    return d


def pipeline_ref(message: types_pb2.PipelineRef, field: str = "pipeline") -> PipelineRef:
    return PipelineRef.parse(message.org, message.project, message.pipeline, field)


def permissions(items: Any, field: str) -> PermissionSet:
    return PermissionSet.parse(((p.resource, p.level) for p in items), field)


def permissions_pb(permission_set: PermissionSet) -> list[types_pb2.Permission]:
    return [types_pb2.Permission(resource=r, level=lvl) for r, lvl in permission_set.items()]


def run_spec(request: broker_pb2.StartRunRequest | broker_pb2.ExecuteOnBehalfOfRequest) -> RunSpec:
    deadline = duration_seconds(
        request.deadline, request.HasField("deadline"), "deadline", DEFAULT_DEADLINE
    )
    assert deadline is not None
    return RunSpec(
        pipeline=pipeline_ref(request.pipeline),
        ceiling=permissions(request.permission_ceiling, "permission_ceiling"),
        deadline_seconds=deadline,
        lease_seconds=duration_seconds(request.lease, request.HasField("lease"), "lease", None),
        inputs=runs.validate_inputs(dict(request.inputs)),
        idempotency_key=request.idempotency_key,
        ids=pipeline_ids(request.pipeline_ids),
        environment=runs.parse_environment(request.environment) if request.environment else "",
    )


def pipeline_ids(message: types_pb2.PipelineIds) -> runs.PipelineIds:
    return runs.PipelineIds.parse(message.org_id, message.project_id, message.pipeline_id)


def person_pb(person: Person | None) -> types_pb2.Person | None:
    if person is None:
        return None
    return types_pb2.Person(
        subject=person.subject,
        issuer=person.issuer,
        email=person.email,
        display_name=person.display_name,
        verification_method=METHOD_TO_PB[person.method],
        evidence_sha256=person.evidence_sha256,
    )


def pipeline_pb(ref: PipelineRef) -> types_pb2.PipelineRef:
    return types_pb2.PipelineRef(org=ref.org, project=ref.project, pipeline=ref.pipeline)


def run_pb(run: Run) -> types_pb2.Run:
    executed_by, triggered_via, summary = runs.attribution(run)
    message = types_pb2.Run(
        run_id=run.run_id,
        pipeline=pipeline_pb(run.pipeline),
        state=RUN_STATE_TO_PB[run.state],
        create_time=timestamp(run.create_time),
        deadline=timestamp(run.deadline),
        end_reason=run.end_reason,
        triggered_via=run.triggered_via,
        on_behalf_of=person_pb(run.on_behalf_of),
        permission_ceiling=permissions_pb(run.permission_ceiling),
        parent_run_id=run.parent_run_id,
        attribution=types_pb2.Attribution(
            executed_by=executed_by, triggered_via=triggered_via, summary=summary
        ),
        inputs=dict(run.inputs),
        ended_by=run.ended_by,
        actor_chain=list(run.actor_chain),
        environment=run.environment,
    )
    if run.ids:
        message.pipeline_ids.CopyFrom(
            types_pb2.PipelineIds(
                org_id=run.ids.org_id,
                project_id=run.ids.project_id,
                pipeline_id=run.ids.pipeline_id,
            )
        )
    if run.end_time is not None:
        message.end_time.CopyFrom(timestamp(run.end_time))
    if run.lease_seconds is not None:
        message.lease.CopyFrom(duration(run.lease_seconds))
    if run.lease_expire_time is not None:
        message.lease_expire_time.CopyFrom(timestamp(run.lease_expire_time))
    return message


def runs_within(runs: list[Run], max_bytes: int) -> list[types_pb2.Run]:
    """The leading runs whose messages fit in `max_bytes` together (always at least one)."""
    page: list[types_pb2.Run] = []
    total = 0
    for run in runs:
        message = run_pb(run)
        total += message.ByteSize() + 8  # field tag and length prefix of each entry
        if page and total > max_bytes:
            break
        page.append(message)
    return page


def struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(dict(data))
    return message


def audit_event_pb(event: AuditEvent) -> types_pb2.AuditEvent:
    d = event.draft
    message = types_pb2.AuditEvent(
        sequence=event.sequence,
        time=timestamp(d.time),
        action=d.action,
        outcome=OUTCOME_TO_PB[d.outcome],
        principal=d.principal,
        on_behalf_of=person_pb(d.on_behalf_of),
        run_id=d.run_id,
        trace_id=d.trace_id,
        request_id=d.request_id,
        details=struct(d.details),
        prev_hash=event.prev_hash,
        hash=event.hash,
    )
    if d.pipeline is not None:
        message.pipeline.CopyFrom(pipeline_pb(d.pipeline))
    return message


def audit_event_bytes(event: AuditEvent) -> bytes:
    """The serialised AuditEvent message of `event`: written straight to wire bytes
    (`eventwire`), or — for what that encoder leaves to protobuf — built as a message, which
    then serialises or raises as it always did. Either way the bytes of deterministic
    serialisation (a Struct's entries sorted by key)."""
    try:
        return eventwire.audit_event(event)
    except (eventwire.Unencodable, TypeError, ValueError, AttributeError, OverflowError):
        return audit_event_pb(event).SerializeToString(deterministic=True)


class EncodedEvents:
    """Audit events encoded once per process for every stream that sends them: N live
    subscribers (and every catch-up) cost one conversion and one serialisation per event, not
    N. Responses are then put together from the encoded events' bytes (`event_message`,
    `page_message`) and sent as they are (the interceptor's serializer passes bytes through).
    Keyed by (sequence, hash), which names one event for good; bounded, oldest first out."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._capacity = capacity
        self._encoded: dict[tuple[int, str], bytes] = {}
        self._lock = threading.Lock()
        self.encodings = 0  # how many events were encoded (each exactly once while cached)

    def of(self, event: AuditEvent) -> bytes:
        """The serialised `AuditEvent` message."""
        key = (event.sequence, event.hash)
        encoded = self._encoded.get(key)
        if encoded is not None:
            return encoded
        with self._lock:  # two streams reaching a new event together encode it once
            encoded = self._encoded.get(key)
            if encoded is None:
                encoded = audit_event_bytes(event)
                self.encodings += 1
                self._encoded[key] = encoded
                if len(self._encoded) > self._capacity:
                    # dicts keep insertion order: drop the oldest tenth at once.
                    for stale in list(itertools.islice(self._encoded, self._capacity // 10)):
                        del self._encoded[stale]
        return encoded


# StreamAuditResponse: `event` is field 1, `page` field 3; AuditEventPage: `events` field 1
# (all length-delimited). Fixed by the contract: fields are never renumbered.
_EVENT_TAG = b"\x0a"
_PAGE_TAG = b"\x1a"


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + eventwire.varint(len(payload)) + payload


def event_message(encoded: bytes) -> bytes:
    """A serialised StreamAuditResponse carrying one encoded event."""
    return _field(_EVENT_TAG, encoded)


def page_message(encoded: Sequence[bytes]) -> bytes:
    """A serialised StreamAuditResponse carrying a page of encoded events."""
    varint = eventwire.varint
    return _field(_PAGE_TAG, b"".join([_EVENT_TAG + varint(len(e)) + e for e in encoded]))


def token_request(request: broker_pb2.IssueTokenRequest) -> TokenRequest:
    ttl = duration_seconds(request.ttl, request.HasField("ttl"), "ttl", DEFAULT_TTL)
    assert ttl is not None
    return TokenRequest(
        run_id=request.run_id,
        audience=request.audience,
        permissions=permissions(request.permissions, "permissions"),
        inherit_from=request.inherit_from_service_account,
        ttl=ttl,
        step=request.step,
        bind_jkt=jkt_of_jwk(request.dpop_jwk, "dpop_jwk"),
        bind_proof_key=request.bind_proof_key,
        bind_certificate=request.bind_client_certificate,
    )


def credential_binding(
    request: broker_pb2.StartRunRequest | broker_pb2.ExecuteOnBehalfOfRequest,
) -> Binding:
    """What a run credential is to be bound to: the runner's key, if it sent one."""
    return Binding(jkt=jkt_of_jwk(request.dpop_jwk, "dpop_jwk"))


def presentation(request: broker_pb2.VerifyTokenRequest) -> Presentation:
    """What came with the token at the API that asks: proof, request, certificate, nonce."""
    return Presentation(
        proof=request.dpop_proof,
        htm=request.http_method,
        htu=request.http_url,
        certificate_thumbprint=request.certificate_thumbprint,
        nonce=request.dpop_nonce or None,
    )


def verification_pb(result: CheckResult) -> broker_pb2.VerifyTokenResponse:
    response = broker_pb2.VerifyTokenResponse(
        active=result.active,
        status=TOKEN_STATUS_TO_PB[result.status],
        reason=limits.shown(result.reason, 200),
        run_id=limits.shown(str(result.claims.get("run_id", ""))),
    )
    if result.active:
        response.claims.CopyFrom(struct(result.claims))
    exp = result.claims.get("exp")
    if isinstance(exp, int | float):
        response.expire_time.CopyFrom(timestamp(float(exp)))
    return response


def jwk_pb(jwk: Mapping[str, Any]) -> broker_pb2.JsonWebKey:
    fields = ("kty", "kid", "use", "alg", "crv", "x", "y", "n", "e")
    return broker_pb2.JsonWebKey(**{f: str(jwk[f]) for f in fields if f in jwk})


_KEY_STATES = {
    SIGNING: broker_pb2.SIGNING_KEY_STATE_SIGNING,
    PREPUBLISHED: broker_pb2.SIGNING_KEY_STATE_PREPUBLISHED,
    RETIRING: broker_pb2.SIGNING_KEY_STATE_RETIRING,
}


def key_status_pb(status: KeyStatus) -> broker_pb2.SigningKeyStatus:
    message = broker_pb2.SigningKeyStatus(
        kid=status.kid,
        alg=status.alg,
        state=_KEY_STATES[status.state],
        publish_time=timestamp(status.publish_time),
        signs_from=timestamp(status.activate_time),
    )
    if status.stop_signing_time is not None:
        message.stops_signing.CopyFrom(timestamp(status.stop_signing_time))
    if status.retire_time is not None:
        message.unpublish_time.CopyFrom(timestamp(status.retire_time))
    return message


def asserted_identity(request: broker_pb2.ExecuteOnBehalfOfRequest) -> AssertedIdentity | None:
    if request.WhichOneof("person") != "asserted":
        return None
    a = request.asserted
    return AssertedIdentity(subject=a.subject, email=a.email, display_name=a.display_name)


def tree_head_pb(head: TreeHead, note: str | None = None) -> broker_pb2.TreeHead:
    """`note`: the checkpoint as served (with witnesses' cosignatures); default the bare one."""
    return broker_pb2.TreeHead(
        origin=head.origin,
        tree_size=head.size,
        root_hash=head.root,
        checkpoint=head.note if note is None else note,
        tree_base=head.base,
    )


def inclusion_pb(proof: InclusionProof) -> broker_pb2.ProveInclusionResponse:
    return broker_pb2.ProveInclusionResponse(
        record=audit.canonical_bytes(proof.event.record).decode(),
        prev_hash=proof.event.prev_hash,
        hash=proof.event.hash,
        leaf_index=proof.leaf_index,
        proof=proof.hashes,
        tree_head=tree_head_pb(proof.head),
    )
