"""Signed tree heads and proofs from a live broker, checked with nothing but the log's key.

The broker publishes its tree head over HTTP (no credential) and gRPC; every proof it hands
out is checked here by `tokenbroker.merkle` alone, as an external auditor would."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.audit.events import AuditDraft, Outcome
from broker.store import Write
from tests.accounts import Callers, Stub, standard_accounts
from tests.conftest import make_settings, standard_policy
from tokenbroker.merkle import (
    ProofError,
    VerifierKey,
    leaf_hash,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from tokenbroker.v1 import broker_pb2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[BrokerServer]:
    settings = make_settings(
        tmp_path / "data", http_listen="127.0.0.1:0", policy=standard_policy(tmp_path)
    )
    running = create_server(settings)
    running.start()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def auditor(served: BrokerServer) -> Iterator[Stub]:
    """siem, an auditor of acme/*/*."""
    callers = Callers(served)
    try:
        yield callers.stub(standard_accounts()["auditor"])
    finally:
        callers.close()


def _get(server: BrokerServer, path: str) -> tuple[int, str]:
    assert server.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _append(server: BrokerServer, count: int, org: str = "acme") -> None:
    from broker.runs.model import PipelineRef

    drafts = [
        AuditDraft(
            time=1000.0,
            action="run.started",
            outcome=Outcome.SUCCESS,
            principal="orchestrator",
            run_id=f"r-{i}",
            pipeline=PipelineRef(org, "web", "deploy"),
        )
        for i in range(count)
    ]
    server.broker.store.commit(Write(drafts))


def test_the_http_checkpoint_verifies_with_the_published_log_key(served: BrokerServer) -> None:
    _append(served, 5)
    status, vkey_text = _get(served, "/audit/log-key")
    assert status == 200
    key = VerifierKey.parse(vkey_text)
    status, note = _get(served, "/audit/checkpoint")
    assert status == 200
    head = verify_checkpoint(note, key)
    assert head.origin == key.name and head.size == served.broker.store.head_sequence()
    # One flipped character anywhere in the note, and it no longer verifies.
    for position in range(0, len(note) - 1, 7):
        flipped = note[:position] + chr(ord(note[position]) ^ 1) + note[position + 1 :]
        with pytest.raises(ProofError):
            verify_checkpoint(flipped, key)


def test_an_auditor_proves_an_event_and_the_log_growing_with_the_key_alone(
    served: BrokerServer, auditor: Stub
) -> None:
    stub = auditor
    _append(served, 30)
    first = stub.GetTreeHead(broker_pb2.GetTreeHeadRequest(), timeout=10)
    key = VerifierKey.parse(first.verifier_key)
    old = verify_checkpoint(first.tree_head.checkpoint, key)
    _append(served, 17)
    sequence = old.size - 3
    proved = stub.ProveInclusion(broker_pb2.ProveInclusionRequest(sequence=sequence), timeout=10)
    new = verify_checkpoint(proved.tree_head.checkpoint, key)
    assert new.size == old.size + 17 and proved.leaf_index == sequence - 1
    leaf = leaf_hash(proved.record.encode())
    verify_inclusion(leaf, proved.leaf_index, new.size, list(proved.proof), new.root)
    assert f'"sequence":{sequence}' in proved.record
    # The same event against the older head.
    older = stub.ProveInclusion(
        broker_pb2.ProveInclusionRequest(sequence=sequence, tree_size=old.size), timeout=10
    )
    verify_inclusion(leaf, older.leaf_index, old.size, list(older.proof), old.root)
    consistency = stub.ProveConsistency(
        broker_pb2.ProveConsistencyRequest(first=old.size), timeout=10
    )
    head = verify_checkpoint(consistency.tree_head.checkpoint, key)
    verify_consistency(old.size, head.size, list(consistency.proof), old.root, head.root)


def test_proofs_beyond_the_log_or_of_nothing_are_invalid_argument(
    served: BrokerServer, auditor: Stub
) -> None:
    _append(served, 3)
    head = served.broker.store.head_sequence()
    callers = Callers(served)
    try:
        everything = callers.stub(standard_accounts()["root"])  # an auditor of */*/*
        for request, method in (
            (broker_pb2.ProveInclusionRequest(sequence=head + 1), "ProveInclusion"),
            (broker_pb2.ProveInclusionRequest(sequence=head, tree_size=head + 5), "ProveInclusion"),
            (broker_pb2.ProveConsistencyRequest(first=head + 1), "ProveConsistency"),
            (broker_pb2.ProveInclusionRequest(sequence=0), "ProveInclusion"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                getattr(everything, method)(request, timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    finally:
        callers.close()
    # An auditor of acme only cannot tell an event outside its scope from no event at all.
    with pytest.raises(grpc.RpcError) as refused:
        auditor.ProveInclusion(broker_pb2.ProveInclusionRequest(sequence=head + 1), timeout=10)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.skipif(
    not os.environ.get("TOKEN_BROKER_LONG_TESTS"), reason="set TOKEN_BROKER_LONG_TESTS=1"
)
def test_every_event_of_a_hundred_thousand_event_log_has_a_verifying_proof(
    tmp_path: Path,
) -> None:
    _every_event_proves(tmp_path, 100_000)


def test_every_event_of_a_ten_thousand_event_log_has_a_verifying_proof(tmp_path: Path) -> None:
    _every_event_proves(tmp_path, 10_000)


def _every_event_proves(tmp_path: Path, count: int) -> None:
    """Store-level (no RPC per event, to stay fast): the stored tree proves every event."""
    from broker.audit import events as audit
    from broker.audit import merkle
    from broker.store import all_stored_events
    from broker.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path)
    try:
        for _ in range(count // 5000):
            store.commit(Write([_draft(i) for i in range(5000)]))
        size = store.head_sequence()
        assert size == count
        root = merkle.root_at(size, store.tree_nodes)
        for event in all_stored_events(store):
            leaf = leaf_hash(audit.canonical_bytes(event.record))
            proof = merkle.inclusion_proof(event.sequence - 1, size, store.tree_nodes)
            verify_inclusion(leaf, event.sequence - 1, size, proof, root)
    finally:
        store.close()


def _draft(i: int) -> AuditDraft:
    return AuditDraft(time=1000.0 + i, action="token.issued", outcome=Outcome.SUCCESS)
