"""Several brokers on one PostgreSQL database, at the store level: one gapless chain however
the replicas' writes interleave, and each replica hears the others' commits at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from broker.audit import events as audit
from broker.audit import merkle
from broker.bench.pgcluster import Cluster
from broker.runs.model import RunState
from broker.store import (
    CreateRun,
    EndRun,
    IdempotencyClaim,
    IdempotencyKeyTaken,
    RunNotActive,
    Write,
    all_stored_events,
)
from broker.store.changes import ChangeFeed
from broker.store.factory import OpenOptions
from broker.store.postgres import PostgresStore
from tests.test_store_contract import event, make_run
from tokenbroker.merkle import root_of_leaves


@pytest.fixture
def replicas(pg_dsn: str) -> Iterator[tuple[PostgresStore, PostgresStore, PostgresStore]]:
    stores = (PostgresStore(pg_dsn), PostgresStore(pg_dsn), PostgresStore(pg_dsn))
    yield stores
    for store in stores:
        store.close()


def test_concurrent_writes_from_three_replicas_form_one_gapless_chain(
    replicas: tuple[PostgresStore, ...],
) -> None:
    def write(store: PostgresStore, prefix: str) -> None:
        for i in range(40):
            store.commit(
                Write([event("run.started", f"{prefix}-{i}")], CreateRun(make_run(f"{prefix}-{i}")))
            )

    threads = [threading.Thread(target=write, args=(s, f"r{n}")) for n, s in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = replicas[0].stored_events(0, 1000)
    assert [s.sequence for s in stored] == list(range(1, 121))
    rows = [(s.sequence, s.record, s.prev_hash, s.hash) for s in stored]
    assert audit.verify_chain(rows, start_prev_hash=audit.GENESIS_HASH) is None
    # One Merkle tree too, whichever replica closed which subtree.
    leaves = [merkle.leaf_hash(audit.canonical_bytes(s.record)) for s in stored]
    for store in replicas:
        assert merkle.root_at(120, store.tree_nodes) == root_of_leaves(leaves)


def test_opening_a_database_from_before_the_tree_builds_it_once(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    store.commit(Write([event("run.started") for _ in range(6001)]))
    store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # back to before the tree (migration 6)
        conn.execute("DROP TABLE audit_cosignatures")  # and what came after it
        conn.execute("DELETE FROM schema_migrations WHERE version = 7")
        conn.execute("DROP TABLE audit_tree")
        conn.execute("ALTER TABLE audit_retention DROP COLUMN tree_base")
        conn.execute("DELETE FROM schema_migrations WHERE version = 6")
    opened = [PostgresStore(pg_dsn), PostgresStore(pg_dsn)]  # the second finds it built
    try:
        opened[1].commit(Write([event("run.ended")]))
        stored = list(all_stored_events(opened[0]))
        leaves = [merkle.leaf_hash(audit.canonical_bytes(s.record)) for s in stored]
        assert len(leaves) == 6002
        assert merkle.root_at(6002, opened[0].tree_nodes) == root_of_leaves(leaves)
    finally:
        for store in opened:
            store.close()


def test_an_idempotency_key_holds_across_replicas(replicas: tuple[PostgresStore, ...]) -> None:
    claim = IdempotencyClaim("ci-orchestrator", "key-1", "fp")
    outcomes: list[str] = []

    def start(store: PostgresStore, run_id: str) -> None:
        try:
            store.commit(Write([event("run.started", run_id)], CreateRun(make_run(run_id), claim)))
            outcomes.append("created")
        except IdempotencyKeyTaken:
            outcomes.append("taken")

    threads = [threading.Thread(target=start, args=(replicas[n % 3], f"r-{n}")) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] + ["taken"] * 19
    assert replicas[1].head_sequence() == 1


def test_a_run_ends_exactly_once_when_replicas_race_to_end_it(
    replicas: tuple[PostgresStore, ...],
) -> None:
    replicas[0].commit(Write([event("run.started", "r-1")], CreateRun(make_run("r-1"))))
    ended: list[int] = []

    def end(store: PostgresStore) -> None:
        try:
            store.commit(
                Write(
                    [event("run.expired", "r-1")],
                    EndRun("r-1", RunState.EXPIRED, 2000.0, "deadline", "broker"),
                )
            )
            ended.append(1)
        except RunNotActive:  # every loser
            pass

    threads = [threading.Thread(target=end, args=(s,)) for s in replicas for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ended == [1]
    assert [e.draft.action for e in replicas[2].read_events(0, 10)] == [
        "run.started",
        "run.expired",
    ]


def test_a_replica_hears_another_replicas_commit_within_milliseconds(
    replicas: tuple[PostgresStore, ...],
) -> None:
    writer, follower = replicas[0], replicas[1]
    feed = ChangeFeed(follower)
    seen: list[tuple[int, float]] = []
    feed.subscribe(pages=lambda page: seen.extend((e.sequence, time.monotonic()) for e in page))
    feed.start()
    try:
        latencies = []
        for i in range(20):
            committed_at = time.monotonic()
            writer.commit(Write([event("a", f"r-{i}")]))
            deadline = committed_at + 5
            while len(seen) <= i and time.monotonic() < deadline:
                feed.wait_beyond(i, timeout=0.05)
            assert len(seen) > i, f"event {i + 1} never reached the other replica"
            latencies.append(seen[i][1] - committed_at)
    finally:
        feed.close()
    assert [s for s, _ in seen] == list(range(1, 21))
    latencies.sort()
    # Woken by NOTIFY, not by the follower's 1 s safety poll.
    assert latencies[len(latencies) // 2] < 0.5, latencies


def test_replicas_racing_to_checkpoint_never_fork_the_checkpoint_chain(
    replicas: tuple[PostgresStore, ...],
) -> None:
    from tests.audit_support import FakeClock, keeper, make_signer, publish

    signer = make_signer()
    publish(replicas[0], signer)
    keepers = [keeper(store, signer, FakeClock(), every_events=5) for store in replicas]

    def write_and_checkpoint(n: int) -> None:
        for i in range(30):
            replicas[n].commit(Write([event("a", f"r{n}-{i}")]))
            keepers[n].checkpoint()

    threads = [threading.Thread(target=write_and_checkpoint, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = replicas[0].checkpoints(0, 1000)
    assert stored, "no checkpoint was made"
    previous = 0
    for checkpoint in stored:
        assert checkpoint.prev_sequence == previous  # one chain: each names the one before
        previous = checkpoint.sequence


def test_a_database_with_a_newer_schema_is_refused_naming_both_versions(pg_dsn: str) -> None:
    import psycopg

    from broker.store import NewerSchema
    from broker.store.factory import open_store
    from broker.store.postgres import migrations

    PostgresStore(pg_dsn).close()
    newest = migrations()[-1][0]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (newest + 1,))
    with pytest.raises(NewerSchema, match=f"version {newest + 1}.*knows \\({newest}\\)"):
        open_store(pg_dsn)
    with pytest.raises(NewerSchema):
        open_store(pg_dsn, OpenOptions(read_only=True))


def test_offline_tools_open_postgresql_read_only_and_refuse_an_empty_database(
    pg_dsn: str, pg_cluster: Cluster
) -> None:
    from broker.store import StoreRefused, StoreUnavailable
    from broker.store.factory import open_store

    with pytest.raises(StoreRefused, match="holds no token-broker store"):
        open_store(pg_dsn, OpenOptions(read_only=True))
    writer = open_store(pg_dsn)
    writer.commit(Write([event("a")]))
    writer.close()
    reader = open_store(pg_dsn, OpenOptions(read_only=True))
    try:
        assert reader.head_sequence() == 1
        with pytest.raises(StoreUnavailable, match="read-only"):
            reader.commit(Write([event("b")]))
    finally:
        reader.close()
    with pytest.raises(StoreRefused):
        open_store(f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/no_such_database")
