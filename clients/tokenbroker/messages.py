"""Request builders: plain Python values in, tokenbroker.v1 request messages out.

Shared by the sync and asyncio clients, so that both send exactly the same requests. The
broker validates everything again; these functions only translate (and refuse arguments
that cannot be translated, with `TypeError`/`ValueError`, as Python functions do).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta

from google.protobuf import duration_pb2

from tokenbroker.v1 import broker_pb2, types_pb2

# Audit events per StreamAudit message the clients ask for (the broker allows up to 1000).
EVENTS_PER_MESSAGE = 500

# Permissions as `{"artifacts": "write"}`, or as Permission messages (e.g. a run's ceiling).
Permissions = Mapping[str, str] | Iterable[types_pb2.Permission]
# A duration as a timedelta or as seconds.
Seconds = timedelta | float | int
# A person the caller vouches for: the message, or {"subject": ..., "email": ..., ...}.
Asserted = broker_pb2.AssertedPerson | Mapping[str, str]

RUN_STATES: Mapping[str, types_pb2.RunState.ValueType] = {
    "active": types_pb2.RUN_STATE_ACTIVE,
    "ended": types_pb2.RUN_STATE_ENDED,
    "expired": types_pb2.RUN_STATE_EXPIRED,
}


def new_idempotency_key() -> str:
    """A fresh key for one logical call; its retries reuse it so the broker answers once."""
    return f"tb-{uuid.uuid4().hex}"


def new_request_id() -> str:
    """A request id for one logical call, sent as `x-request-id` with every attempt."""
    return f"c-{uuid.uuid4().hex}"


def duration(value: Seconds) -> duration_pb2.Duration:
    """A protobuf Duration from a timedelta or a number of seconds."""
    message = duration_pb2.Duration()
    if isinstance(value, timedelta):
        message.FromTimedelta(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        message.FromNanoseconds(round(value * 1e9))
    else:
        raise TypeError(f"a duration is a timedelta or seconds, not {type(value).__name__}")
    return message


def permission_list(value: Permissions | None) -> list[types_pb2.Permission]:
    """Permission messages from `{"resource": "level"}` (or from Permission messages)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [types_pb2.Permission(resource=r, level=lvl) for r, lvl in value.items()]
    result = list(value)
    if not all(isinstance(p, types_pb2.Permission) for p in result):
        raise TypeError("permissions are {'resource': 'level'} or Permission messages")
    return result


def pipeline_ref(org: str, project: str, pipeline: str) -> types_pb2.PipelineRef:
    """The pipeline a run belongs to."""
    return types_pb2.PipelineRef(org=org, project=project, pipeline=pipeline)


def start_run(
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
) -> broker_pb2.StartRunRequest:
    """A StartRunRequest; unset deadline and lease keep the broker's defaults.
    `pipeline_ids`: any of org_id, project_id, pipeline_id (immutable ids)."""
    request = broker_pb2.StartRunRequest(
        pipeline=pipeline_ref(org, project, pipeline),
        permission_ceiling=permission_list(ceiling),
        inputs=dict(inputs or {}),
        idempotency_key=idempotency_key or "",
        environment=environment,
    )
    if pipeline_ids:
        request.pipeline_ids.CopyFrom(types_pb2.PipelineIds(**dict(pipeline_ids)))
    if deadline is not None:
        request.deadline.CopyFrom(duration(deadline))
    if lease is not None:
        request.lease.CopyFrom(duration(lease))
    return request


def execute_on_behalf_of(
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
    idempotency_key: str,
    pipeline_ids: Mapping[str, str] | None = None,
    environment: str = "",
) -> broker_pb2.ExecuteOnBehalfOfRequest:
    """An ExecuteOnBehalfOfRequest for the person proven by `id_token` or `asserted`."""
    if (id_token is None) == (asserted is None):
        raise ValueError("give exactly one of id_token (verified) or asserted (vouched for)")
    request = broker_pb2.ExecuteOnBehalfOfRequest(
        pipeline=pipeline_ref(org, project, pipeline),
        permission_ceiling=permission_list(ceiling),
        inputs=dict(inputs or {}),
        idempotency_key=idempotency_key,
        environment=environment,
    )
    if pipeline_ids:
        request.pipeline_ids.CopyFrom(types_pb2.PipelineIds(**dict(pipeline_ids)))
    if id_token is not None:
        request.id_token = id_token
    elif isinstance(asserted, broker_pb2.AssertedPerson):
        request.asserted.CopyFrom(asserted)
    elif asserted is not None:
        request.asserted.CopyFrom(broker_pb2.AssertedPerson(**dict(asserted)))
    if deadline is not None:
        request.deadline.CopyFrom(duration(deadline))
    if lease is not None:
        request.lease.CopyFrom(duration(lease))
    return request


def renew_run(run_id: str = "") -> broker_pb2.RenewRunRequest:
    """A RenewRunRequest; an empty run id means the caller's own run (run credential)."""
    return broker_pb2.RenewRunRequest(run_id=run_id)


def issue_token(
    audience: str,
    permissions: Permissions | None = None,
    *,
    run_id: str = "",
    ttl: Seconds | None = None,
    step: str = "",
    inherit_from: str = "",
    dpop_jwk: str = "",
    bind_proof_key: bool = False,
    bind_client_certificate: bool = False,
) -> broker_pb2.IssueTokenRequest:
    """An IssueTokenRequest for one step of a run (bound to a key or certificate if asked)."""
    request = broker_pb2.IssueTokenRequest(
        run_id=run_id,
        audience=audience,
        permissions=permission_list(permissions),
        inherit_from_service_account=inherit_from,
        step=step,
        dpop_jwk=dpop_jwk,
        bind_proof_key=bind_proof_key,
        bind_client_certificate=bind_client_certificate,
    )
    if ttl is not None:
        request.ttl.CopyFrom(duration(ttl))
    return request


def verify_token(
    token: str,
    audience: str = "",
    *,
    proof: str = "",
    method: str = "",
    url: str = "",
    certificate_thumbprint: str = "",
    nonce: str = "",
) -> broker_pb2.VerifyTokenRequest:
    """A VerifyTokenRequest; with an audience, a token for another API is WRONG_AUDIENCE. For
    a bound token: the DPoP `proof` that came with it, the request's `method` and `url`, the
    client certificate's thumbprint, the nonce the API requires."""
    return broker_pb2.VerifyTokenRequest(
        token=token,
        audience=audience,
        dpop_proof=proof,
        http_method=method,
        http_url=url,
        certificate_thumbprint=certificate_thumbprint,
        dpop_nonce=nonce,
    )


def revoke_run(run_id: str = "", reason: str = "") -> broker_pb2.RevokeRunRequest:
    """A RevokeRunRequest; an empty run id means the caller's own run (run credential)."""
    return broker_pb2.RevokeRunRequest(run_id=run_id, reason=reason)


def get_run(run_id: str) -> broker_pb2.GetRunRequest:
    """A GetRunRequest."""
    return broker_pb2.GetRunRequest(run_id=run_id)


def run_state(state: str | types_pb2.RunState.ValueType | None) -> types_pb2.RunState.ValueType:
    """A RunState from "active"/"ended"/"expired" (or the enum value); None matches all."""
    if state is None:
        return types_pb2.RUN_STATE_UNSPECIFIED
    if isinstance(state, str):
        try:
            return RUN_STATES[state.lower()]
        except KeyError:
            raise ValueError(f"state is one of {', '.join(RUN_STATES)}, not {state!r}") from None
    return state


def list_runs(
    *,
    org: str = "",
    project: str = "",
    pipeline: str = "",
    state: str | types_pb2.RunState.ValueType | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> broker_pb2.ListRunsRequest:
    """A ListRunsRequest for one page; empty filters match everything."""
    return broker_pb2.ListRunsRequest(
        org=org,
        project=project,
        pipeline=pipeline,
        state=run_state(state),
        page_size=page_size,
        page_token=page_token,
    )


def stream_audit(
    after: int = 0,
    *,
    run_id: str = "",
    principal: str = "",
    person: str = "",
    actions: Iterable[str] = (),
    org: str = "",
    project: str = "",
    follow: bool = True,
    per_message: int = EVENTS_PER_MESSAGE,
) -> broker_pb2.StreamAuditRequest:
    """A StreamAuditRequest: events after sequence `after`, live unless `follow` is False,
    up to `per_message` events in each message."""
    return broker_pb2.StreamAuditRequest(
        after_sequence=after,
        filter=broker_pb2.AuditFilter(
            run_id=run_id,
            principal=principal,
            person=person,
            actions=list(actions),
            org=org,
            project=project,
        ),
        stop_at_head=not follow,
        max_events_per_message=per_message,
    )


def events_of(response: broker_pb2.StreamAuditResponse) -> Sequence[types_pb2.AuditEvent]:
    """The events one StreamAudit message carries: one, a page, or none (a heartbeat).
    A broker that predates pages always sends one event per message."""
    item = response.WhichOneof("item")
    if item == "event":
        return (response.event,)
    if item == "page":
        return response.page.events
    return ()
