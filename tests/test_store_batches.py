"""One SQLite group commit holding writes of events alone (no savepoint: they cannot conflict)
beside writes with a mutation (each in its savepoint), the tree's nodes inserted once for the
batch: a refused write leaves no trace, its neighbours commit gaplessly, chain and tree intact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit import events as audit
from broker.audit import merkle
from broker.runs.model import RunState
from broker.store import Committed, Conflict, CreateRun, EndRun, Write
from broker.store.groupcommit import Pending
from broker.store.sqlite import SqliteStore
from broker.store.sqlreads import SqlReads
from tests.test_store_contract import event, make_run
from tokenbroker.merkle import root_of_leaves


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path, create=True)
    yield store
    store.close()


def commit_as_one_batch(store: SqliteStore, writes: list[Write]) -> list[object]:
    batch = [Pending(write) for write in writes]
    store._apply_batch(batch)  # what a leader does with the writes it found queued
    return [pending.outcome for pending in batch]


def test_event_writes_around_a_refused_write_commit_gaplessly_with_chain_and_tree(
    store: SqliteStore,
) -> None:
    store.commit(Write([event("run.started", "r-1")], CreateRun(make_run("r-1"))))
    outcomes = commit_as_one_batch(
        store,
        [
            Write([event("token.issued", "r-1")]),
            Write([event("run.ended", "nope")], EndRun("nope", RunState.ENDED, 1001.0, "x", "y")),
            Write([event("token.issued", "r-1"), event("token.issued", "r-1")]),
            Write([event("run.renewed", "r-1")], CreateRun(make_run("r-1"))),  # taken: refused
            Write([event("token.issued", "r-1")]),
        ],
    )
    committed = [isinstance(o, Committed) for o in outcomes]
    assert committed == [True, False, True, False, True]
    assert all(isinstance(o, Conflict) for o, ok in zip(outcomes, committed, strict=True) if not ok)
    sequences = [[e.sequence for e in o.events] for o in outcomes if isinstance(o, Committed)]
    assert sequences == [[2], [3, 4], [5]]
    assert store.head_sequence() == 5
    rows = [(s.sequence, s.record, s.prev_hash, s.hash) for s in store.stored_events(0, 100)]
    assert audit.verify_chain(rows, start_prev_hash=audit.GENESIS_HASH) is None
    leaves = [
        merkle.leaf_hash(audit.canonical_bytes(s.record)) for s in store.stored_events(0, 100)
    ]
    assert merkle.root_at(5, store.tree_nodes) == root_of_leaves(leaves)
    assert store.tree_nodes([(0, 5)]) == {}  # no node of a refused write
    assert store.read_events(0, 100) == SqlReads.read_events(store, 0, 100)


def test_the_next_batch_continues_the_tree_the_batch_before_left(store: SqliteStore) -> None:
    for size in (3, 1, 4):
        commit_as_one_batch(store, [Write([event("token.issued")]) for _ in range(size)])
    leaves = [
        merkle.leaf_hash(audit.canonical_bytes(s.record)) for s in store.stored_events(0, 100)
    ]
    assert merkle.root_at(8, store.tree_nodes) == root_of_leaves(leaves)
