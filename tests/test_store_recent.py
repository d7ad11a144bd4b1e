"""SQLite answers reads of the events it just committed from memory (broker.store.recent):
the same events a read of the file gives, value for value and in the same key order; never
an event pruned, refused or written by someone else; and a write that fails to seal does
not stop the next."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from broker.audit import events as audit
from broker.audit import merkle
from broker.audit.events import AuditDraft, AuditEvent, Outcome
from broker.identity import Person, VerificationMethod
from broker.runs.model import PipelineRef, RunState
from broker.store import Conflict, EndRun, PruneAudit, RecordCheckpoint, Write, treerows
from broker.store.codec import SQLITE
from broker.store.sqlite import SqliteStore
from broker.store.sqlreads import SqlReads
from tests.test_store_contract import checkpoint_of, event


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path, create=True)
    yield store
    store.close()


def from_file(store: SqliteStore, after: int = 0) -> list[AuditEvent]:
    return SqlReads.read_events(store, after, 1000)


def without_queries(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        raise AssertionError(f"queried the file: {sql}")

    monkeypatch.setattr(store, "_query", refuse)


def detailed(details: dict[str, Any]) -> AuditDraft:
    return AuditDraft(
        time=1733030400.1234567,  # not a whole microsecond: stored as one
        action="token.issued",
        outcome=Outcome.SUCCESS,
        principal="run:r-1",
        on_behalf_of=Person(
            "u-1", "https://idp.example.com", VerificationMethod.IDP_VERIFIED, "cd" * 32
        ),
        run_id="r-1",
        pipeline=PipelineRef("acme", "shop", "deploy"),
        trace_id="ab" * 16,
        request_id="req-1",
        details=MappingProxyType(details),
    )


PLAIN = {"zeta": 1, "jti": "t-1", "perm": {"repo": ["read", "write"], "b": None}, "x": 2.5}
# What the JSON round trip changes (a tuple comes back a list) comes back changed from memory too.
CHANGED_BY_JSON = {"tuple": (1, 2), "nested": {"t": ("a",)}, "inf": float("inf")}


def test_events_just_committed_are_read_without_a_query_and_equal_the_files(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.commit(Write([detailed(PLAIN), detailed({"é": "ü\u2028", "big": 2**70, "f": -0.0})]))
    store.commit(Write([event("run.renewed", "r-1")]))
    expected = from_file(store)
    without_queries(store, monkeypatch)
    read = store.read_events(0, 1000)
    assert read == expected
    assert [list(e.draft.details) for e in read] == [list(e.draft.details) for e in expected]
    assert store.read_events(1, 1) == expected[1:2]
    assert store.read_events(3, 1000) == []  # the last commit here: nothing after it


def test_details_json_would_change_are_read_as_the_file_gives_them(store: SqliteStore) -> None:
    store.commit(Write([detailed(CHANGED_BY_JSON)]))
    (read,) = store.read_events(0, 10)
    assert read == from_file(store)[0]
    assert read.draft.details["tuple"] == [1, 2]
    assert read.draft.details["nested"] == {"t": ["a"]}
    assert list(read.draft.details) == ["inf", "nested", "tuple"]  # keys sorted, as stored


def test_a_refused_write_leaves_nothing_to_read_from_memory(store: SqliteStore) -> None:
    store.commit(Write([event("x")]))
    with pytest.raises(Conflict):
        store.commit(
            Write([event("run.ended", "nope")], EndRun("nope", RunState.ENDED, 1.0, "x", "y"))
        )
    store.commit(Write([event("y")]))
    assert [e.sequence for e in store.read_events(0, 10)] == [1, 2]
    assert store.read_events(0, 10) == from_file(store)


def test_events_pruned_are_no_longer_read_from_memory(store: SqliteStore) -> None:
    store.commit(Write([event("x") for _ in range(6)]))
    store.commit(Write([], RecordCheckpoint(checkpoint_of(store, 4))))
    store.commit(Write([event("audit.pruned")], PruneAudit(4)))
    assert [e.sequence for e in store.read_events(0, 10)] == [5, 6, 7]
    assert store.read_events(0, 10) == from_file(store)


def test_events_another_connection_wrote_are_read_from_the_file_once_the_head_is_read(
    store: SqliteStore,
) -> None:
    store.commit(Write([event("x")]))
    (first,) = store.read_events(0, 1)
    # Another writer on the same file (not a broker: a repair by hand) continues the chain.
    body = audit.canonical_bytes(audit.to_record(2, event("by-hand")))
    sealed, _ = audit.seal_with_record(event("by-hand"), 2, first.hash)
    leaf_nodes = merkle.Frontier.read(1, store.tree_nodes).append(body)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute(
            "INSERT INTO audit_events (sequence, record, prev_hash, hash, action, run_id, "
            "principal, time_us) VALUES (2, ?, ?, ?, 'by-hand', '', '', ?)",
            (body.decode(), first.hash, sealed.hash, audit.time_us(sealed.draft.time)),
        )
        other.executemany(treerows.insert_sql(SQLITE), leaf_nodes)
        other.execute("COMMIT")
    finally:
        other.close()
    # Like a wait for events, reads take the writer's last commit for the head until the
    # head is read again.
    assert store.read_events(1, 10) == []
    assert store.head_sequence() == 2
    assert [e.sequence for e in store.read_events(1, 10)] == [2]
    store.commit(Write([event("y")]))  # continues the chain after the event written by hand
    assert [e.draft.action for e in store.read_events(0, 10)] == ["x", "by-hand", "y"]
    assert store.read_events(0, 10) == from_file(store)


def test_a_write_that_cannot_be_sealed_fails_and_the_next_one_commits(
    store: SqliteStore,
) -> None:
    with pytest.raises(TypeError):
        store.commit(Write([detailed({"not json": object()})]))
    committed = store.commit(Write([event("x")]))
    assert [e.sequence for e in committed.events] == [1]
    assert store.read_events(0, 10) == from_file(store)
