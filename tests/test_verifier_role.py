"""Role verifier: what an API that verifies tokens offline needs — which runs ended — and not
the audit trail's people and inputs. (Every other RPC: tests/test_auth_matrix.py.)"""

from __future__ import annotations

import grpc
import pytest

from tests.accounts import Callers, Stub, standard_accounts
from tests.support import details, perms, pipeline, rpc_error, start_run_request
from tokenbroker.credentials import assertion_credentials
from tokenbroker.v1 import broker_pb2, types_pb2
from tokenbroker.verification import TokenStatus
from tokenbroker.verifier import RevocationFollower

ENDINGS = ["run.ended", "run.expired"]
REASON = "rollback of change OPS-1234"


@pytest.fixture
def verifier_stub(callers: Callers) -> Stub:
    """orders-api: role verifier, scoped to acme/*/*."""
    return callers.stub(standard_accounts()["verifier"])


def _ended_delegated_run(delegator_stub: Stub, stub: Stub) -> str:
    """A run on behalf of alice, ended with a reason: its end carries a person and an input."""
    run = delegator_stub.ExecuteOnBehalfOf(
        broker_pb2.ExecuteOnBehalfOfRequest(
            pipeline=pipeline(),
            permission_ceiling=perms(artifacts="read"),
            idempotency_key="verifier-role-1",
            asserted=broker_pb2.AssertedPerson(subject="alice", email="alice@example.com"),
        ),
        timeout=10,
    ).run
    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id, reason=REASON), timeout=5)
    return str(run.run_id)


def _endings(caller: Stub, **filters: object) -> list[types_pb2.AuditEvent]:
    request = broker_pb2.StreamAuditRequest(
        filter=broker_pb2.AuditFilter(**filters),  # type: ignore[arg-type]
        stop_at_head=True,
    )
    return [item.event for item in caller.StreamAudit(request, timeout=10)]


def test_verifier_follows_run_endings_without_people_or_inputs(
    verifier_stub: Stub, auditor_stub: Stub, delegator_stub: Stub, stub: Stub
) -> None:
    run_id = _ended_delegated_run(delegator_stub, stub)

    (full,) = _endings(auditor_stub, actions=ENDINGS, org="acme")
    assert full.on_behalf_of.email == "alice@example.com"  # there is something to withhold
    assert full.details.fields["reason"].string_value == REASON
    assert full.principal == "ci-orchestrator" and full.hash

    (seen,) = _endings(verifier_stub, actions=ENDINGS, org="acme")
    assert (seen.sequence, seen.action, seen.run_id) == (full.sequence, "run.ended", run_id)
    assert seen.time == full.time
    assert seen.outcome == types_pb2.AUDIT_OUTCOME_SUCCESS
    assert seen.pipeline == full.pipeline
    assert not seen.HasField("on_behalf_of")
    assert not seen.details.fields
    assert (seen.principal, seen.trace_id, seen.request_id) == ("", "", "")
    assert (seen.prev_hash, seen.hash) == ("", "")
    assert b"alice" not in seen.SerializeToString()


@pytest.mark.parametrize(
    "filters",
    [
        {"org": "acme"},
        {"org": "acme", "actions": ["token.issued"]},
        {"org": "acme", "actions": ["run.ended", "run.started"]},
        {"org": "acme", "actions": ENDINGS, "person": "alice@example.com"},
        {"org": "acme", "actions": ENDINGS, "principal": "deploy-portal"},
    ],
    ids=["everything", "other-actions", "endings-and-more", "by-person", "by-principal"],
)
def test_verifier_cannot_read_the_audit_log(
    verifier_stub: Stub, filters: dict[str, object]
) -> None:
    error = rpc_error(lambda: _endings(verifier_stub, **filters))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "orders-api may not read the audit log: that needs role auditor" in details(error)


def test_verifier_follows_endings_only_within_its_scope(verifier_stub: Stub) -> None:
    error = rpc_error(lambda: _endings(verifier_stub, actions=ENDINGS))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "follow run endings across all pipelines: outside its scope (acme/*/*)" in details(error)


def test_revocation_follower_works_with_the_verifier_role(callers: Callers, stub: Stub) -> None:
    orders_api = standard_accounts()["verifier"]
    channel = callers.channel(
        assertion_credentials(
            orders_api.name, orders_api.private_pem, callers.audience, key_id=orders_api.kid
        )
    )
    ended = stub.StartRun(start_run_request(), timeout=5).run.run_id
    stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=ended), timeout=5)
    running = stub.StartRun(start_run_request(), timeout=5).run.run_id
    follower = RevocationFollower(channel, org="acme").start()
    try:
        assert follower.status_of(ended) is TokenStatus.RUN_ENDED
        assert follower.status_of(running) is None
    finally:
        follower.stop()
