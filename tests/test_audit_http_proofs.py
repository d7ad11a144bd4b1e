"""Merkle proofs over HTTP without a credential: the answers verify with tokenbroker.merkle
against the signed checkpoint they carry, and hostile query values are a 400, never a 500."""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.api.server import BrokerServer, create_server
from broker.audit import events as audit
from broker.audit.events import AuditDraft, Outcome
from broker.store import Write, all_stored_events
from tests.conftest import make_settings, standard_policy
from tokenbroker.merkle import (
    VerifierKey,
    leaf_hash,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[BrokerServer]:
    settings = make_settings(
        tmp_path / "data", http_listen="127.0.0.1:0", policy=standard_policy(tmp_path)
    )
    running = create_server(settings)
    running.start()
    drafts = [AuditDraft(time=1000.0, action="token.issued", outcome=Outcome.SUCCESS)] * 40
    running.broker.store.commit(Write(drafts))
    yield running
    running.stop(grace=0.5)


def _get(server: BrokerServer, path: str) -> tuple[int, bytes]:
    assert server.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _log_key(server: BrokerServer) -> VerifierKey:
    return VerifierKey.parse(_get(server, "/audit/log-key")[1].decode())


def _hashes(document: dict[str, object]) -> list[bytes]:
    hashes = document["hashes"]
    assert isinstance(hashes, list)
    return [base64.b64decode(h) for h in hashes]


def test_a_consistency_proof_over_http_verifies_between_two_signed_heads(
    served: BrokerServer,
) -> None:
    key = _log_key(served)
    status, body = _get(served, "/audit/proof/consistency?first=7")
    assert status == 200
    proof = json.loads(body)
    second = verify_checkpoint(proof["checkpoint"], key)
    first = served.broker.tree_heads.signed(7)
    verify_consistency(7, second.size, _hashes(proof), first.root, second.root)
    assert proof["first"] == 7 and proof["second"] == second.size

    status, body = _get(served, "/audit/proof/consistency?first=3&second=20")
    assert status == 200
    proof = json.loads(body)
    assert verify_checkpoint(proof["checkpoint"], key).size == 20
    verify_consistency(
        3,
        20,
        _hashes(proof),
        served.broker.tree_heads.signed(3).root,
        base64.b64decode(proof["root_hash"]),
    )


def test_an_inclusion_proof_over_http_verifies_the_event_leaf_without_revealing_it(
    served: BrokerServer,
) -> None:
    key = _log_key(served)
    status, body = _get(served, "/audit/proof/inclusion?sequence=5&tree_size=30")
    assert status == 200
    proof = json.loads(body)
    assert "event" not in proof and "record" not in proof
    head = verify_checkpoint(proof["checkpoint"], key)
    assert head.size == 30
    event = list(all_stored_events(served.broker.store))[4]
    leaf = leaf_hash(audit.canonical_bytes(event.record))
    verify_inclusion(leaf, proof["leaf_index"], head.size, _hashes(proof), head.root)


@pytest.mark.parametrize(
    "query",
    [
        "/audit/proof/consistency",
        "/audit/proof/consistency?first=",
        "/audit/proof/consistency?first=-1",
        "/audit/proof/consistency?first=0",
        "/audit/proof/consistency?first=abc",
        "/audit/proof/consistency?first=1&first=2",
        "/audit/proof/consistency?first=5&second=99999999999999999999999",
        "/audit/proof/consistency?first=5&second=9223372036854775807",
        "/audit/proof/consistency?first=50&second=10",
        "/audit/proof/consistency?first=%00",
        "/audit/proof/inclusion",
        "/audit/proof/inclusion?sequence=0",
        "/audit/proof/inclusion?sequence=999999",
        "/audit/proof/inclusion?sequence=5&tree_size=3",
        "/audit/proof/inclusion?sequence=5&tree_size=1e3",
        "/audit/proof/inclusion?sequence=%C3%A9",
    ],
)
def test_hostile_proof_queries_are_a_short_json_400(served: BrokerServer, query: str) -> None:
    status, body = _get(served, query)
    assert status == 400
    answer = json.loads(body)
    assert answer["error"] == "invalid_request"
    assert len(answer["message"]) < 200
