"""One contract, every backend: what the domain relies on from a store.

Every backend is opened the way the broker opens it, by URL through the store factory; what
only SQLite does (triggers, group commit, its file checks) is in test_store_sqlite.py."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit import events as audit
from broker.audit import merkle
from broker.audit.events import AuditDraft, Outcome
from broker.runs.model import PipelineIds, PipelineRef, Run, RunState
from broker.runs.permissions import PermissionSet
from broker.store import (
    CheckpointConflict,
    CheckpointRecord,
    Committed,
    Conflict,
    CosignatureRecord,
    CreateRun,
    EndRun,
    ForgetIdempotencyKeys,
    IdempotencyClaim,
    IdempotencyKeyTaken,
    Mutation,
    ParentNotActive,
    ProofReplayed,
    PruneAudit,
    PruneConflict,
    PublishKey,
    RecordCheckpoint,
    RecordCosignature,
    RecordProof,
    RenewLease,
    RetireKey,
    RunNotActive,
    RunQuery,
    Store,
    UnknownRun,
    Write,
    all_stored_events,
)
from broker.store.factory import OpenOptions, open_store
from tokenbroker.merkle import root_of_leaves, verify_consistency, verify_inclusion


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[Store]:
    backend = open_store(store_url, OpenOptions(data_dir=tmp_path / "data"))
    yield backend
    backend.close()


def make_run(run_id: str, created: float = 1000.0, org: str = "acme", parent: str = "") -> Run:
    return Run(
        parent_run_id=parent,
        run_id=run_id,
        pipeline=PipelineRef(org, "web", "ci"),
        state=RunState.ACTIVE,
        create_time=created,
        deadline=created + 600,
        triggered_via="orchestrator",
        permission_ceiling=PermissionSet.of({"artifacts": "write"}),
        lease_seconds=30.0,
        lease_expire_time=created + 30,
    )


def event(action: str, run_id: str = "") -> AuditDraft:
    return AuditDraft(time=1000.5, action=action, outcome=Outcome.SUCCESS, run_id=run_id)


def test_created_run_reads_back_identically(store: Store) -> None:
    run = make_run("r-1")
    committed = store.commit(Write([event("run.started", "r-1")], CreateRun(run)))
    assert committed.run == run
    assert store.get_run("r-1") == run
    assert store.get_run("r-unknown") is None


def test_a_runs_immutable_ids_and_environment_read_back_in_every_read(store: Store) -> None:
    run = dataclasses.replace(
        make_run("r-ids"),
        ids=PipelineIds("91824", "5f0c9a3e-7c1d-4a57-9e39-0c8f8d1f2b6a", "p_77"),
        environment="production",
    )
    without = make_run("r-none", created=999.0)
    store.commit(Write([event("run.started", "r-ids")], CreateRun(run)))
    store.commit(Write([event("run.started", "r-none")], CreateRun(without)))
    assert store.get_run("r-ids") == run
    assert store.get_run("r-none") == without
    assert store.list_runs(RunQuery(org="acme", limit=10)) == [run, without]
    ended = store.commit(
        Write([event("run.ended", "r-ids")], EndRun("r-ids", RunState.ENDED, 1001.0, "done", "x"))
    )
    assert ended.run is not None
    assert (ended.run.ids, ended.run.environment) == (run.ids, "production")


def test_events_get_gapless_sequences_and_a_verifiable_chain(store: Store) -> None:
    for i in range(5):
        store.commit(Write([event("a"), event("b")], CreateRun(make_run(f"r-{i}"))))
    events = store.read_events(0, 100)
    assert [e.sequence for e in events] == list(range(1, 11))
    assert events[0].prev_hash == audit.GENESIS_HASH
    rows = [(s.sequence, s.record, s.prev_hash, s.hash) for s in store.stored_events(0, 100)]
    assert audit.verify_chain(rows, start_prev_hash=audit.GENESIS_HASH) is None
    assert store.head_sequence() == 10
    assert store.oldest_sequence() == 1
    assert [e.sequence for e in store.read_events(7, 2)] == [8, 9]


def test_events_read_for_streaming_are_the_events_read(store: Store) -> None:
    for i in range(3):
        store.commit(Write([event("a"), event("b")], CreateRun(make_run(f"r-{i}"))))
    streamed = store.stream_events(2, 100)
    assert [e.sequence for e in streamed] == [3, 4, 5, 6]
    assert streamed == store.read_events(2, 100)
    assert [e.draft for e in streamed] == [e.draft for e in store.read_events(2, 100)]
    assert [e.sequence for e in store.stream_events(4, 1)] == [5]


def test_ending_an_ended_run_conflicts_and_writes_no_event(store: Store) -> None:
    store.commit(Write([event("run.started")], CreateRun(make_run("r-1"))))
    end = EndRun("r-1", RunState.ENDED, 1001.0, "done", "orchestrator")
    ended = store.commit(Write([event("run.ended")], end)).run
    assert ended is not None and ended.state is RunState.ENDED and ended.end_reason == "done"
    with pytest.raises(RunNotActive):
        store.commit(Write([event("run.ended")], end))
    with pytest.raises(RunNotActive):
        store.commit(Write([event("run.renewed")], RenewLease("r-1", 2000.0)))
    assert store.head_sequence() == 2
    with pytest.raises(UnknownRun):
        store.commit(Write([event("run.ended")], EndRun("r-x", RunState.ENDED, 1.0, "", "")))


def make_tree(store: Store) -> None:
    """p ─┬─ c1 ── g1        u (unrelated)
    └─ c2"""
    for run_id, parent in (("p", ""), ("c1", "p"), ("c2", "p"), ("g1", "c1"), ("u", "")):
        store.commit(
            Write([event("run.started", run_id)], CreateRun(make_run(run_id, parent=parent)))
        )


def test_ending_a_run_ends_every_active_descendant_in_the_same_transaction(store: Store) -> None:
    make_tree(store)
    store.commit(Write([event("run.ended", "c2")], EndRun("c2", RunState.ENDED, 1001.0, "", "")))
    head = store.head_sequence()
    seen: list[Committed] = []
    store.add_listener(lambda committed, mutation: seen.append(committed))
    template = AuditDraft(time=1002.0, action="run.expired", outcome=Outcome.SUCCESS, principal="")
    end = EndRun("p", RunState.EXPIRED, 1002.0, "lease lapsed", "", descendant_event=template)
    committed = store.commit(Write([event("run.expired", "p")], end))

    # c2 had ended already; the rest of the tree ends now, parents before children.
    assert [r.run_id for r in committed.cascaded] == ["c1", "g1"]
    for run_id in ("p", "c1", "g1"):
        run = store.get_run(run_id)
        assert run is not None and run.state is RunState.EXPIRED and run.end_time == 1002.0
    assert store.get_run("c1").end_reason == "ancestor run p expired: lease lapsed"  # type: ignore[union-attr]
    assert store.get_run("u").is_active  # type: ignore[union-attr]
    # One event per run, sealed in the same write, each located on its own run.
    assert [(e.draft.action, e.draft.run_id) for e in committed.events] == [
        ("run.expired", "p"),
        ("run.expired", "c1"),
        ("run.expired", "g1"),
    ]
    assert committed.events[1].draft.details["ended_with"] == "p"
    assert [e.sequence for e in committed.events] == [head + 1, head + 2, head + 3]
    assert seen == [committed]
    rows = [(s.sequence, s.record, s.prev_hash, s.hash) for s in store.stored_events(0, 100)]
    assert audit.verify_chain(rows, start_prev_hash=audit.GENESIS_HASH) is None


def test_a_child_is_created_only_while_its_parent_is_active(store: Store) -> None:
    store.commit(Write([], CreateRun(make_run("p"))))  # lease until 1030
    for parent, created in (("unknown", 1001.0), ("p", 1030.0)):
        with pytest.raises(ParentNotActive):
            child = make_run(f"child-of-{parent}", created=created, parent=parent)
            store.commit(Write([event("run.started")], CreateRun(child)))
    store.commit(Write([], EndRun("p", RunState.ENDED, 1001.0, "", "")))
    with pytest.raises(ParentNotActive):
        store.commit(Write([event("run.started")], CreateRun(make_run("late", parent="p"))))
    assert store.head_sequence() == 0
    assert store.get_run("late") is None and store.get_run("child-of-p") is None


def test_a_child_created_concurrently_with_its_parents_end_ends_with_it_or_is_refused(
    store: Store,
) -> None:
    store.commit(Write([], CreateRun(make_run("p"))))
    created: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(17)

    def create(i: int) -> None:
        start.wait()
        try:
            store.commit(Write([event("run.started")], CreateRun(make_run(f"c{i}", parent="p"))))
        except ParentNotActive:
            return
        with lock:
            created.append(f"c{i}")

    def end() -> None:
        start.wait()
        store.commit(Write([event("run.ended", "p")], EndRun("p", RunState.ENDED, 1001.0, "", "")))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    threads.append(threading.Thread(target=end))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    children = [store.get_run(f"c{i}") for i in range(16)]
    assert sorted(r.run_id for r in children if r is not None) == sorted(created)
    assert all(not r.is_active for r in children if r is not None)
    ended_events = [
        e.draft.run_id for e in store.read_events(0, 100) if e.draft.action == "run.ended"
    ]
    assert sorted(ended_events) == sorted(["p", *created])


def test_renewing_moves_the_lease_of_an_active_run(store: Store) -> None:
    store.commit(Write([], CreateRun(make_run("r-1"))))
    renewed = store.commit(Write([event("run.renewed")], RenewLease("r-1", 1050.0))).run
    assert renewed is not None and renewed.lease_expire_time == 1050.0
    assert store.get_run("r-1") == renewed


def test_idempotency_key_is_claimed_once(store: Store) -> None:
    claim = IdempotencyClaim("portal", "key-1", "fp-a")
    store.commit(Write([event("run.started")], CreateRun(make_run("r-1"), claim)))
    with pytest.raises(IdempotencyKeyTaken) as taken:
        store.commit(Write([event("run.started")], CreateRun(make_run("r-2"), claim)))
    assert (taken.value.run_id, taken.value.fingerprint) == ("r-1", "fp-a")
    assert store.get_run("r-2") is None
    assert store.head_sequence() == 1
    assert store.find_idempotent_run("portal", "key-1") == ("r-1", "fp-a")
    assert store.find_idempotent_run("other", "key-1") is None


def test_idempotency_keys_of_runs_ended_before_the_cutoff_are_forgotten(store: Store) -> None:
    for run_id in ("r-1", "r-2"):
        claim = IdempotencyClaim("portal", f"key-{run_id}", "fp")
        store.commit(Write([event("run.started")], CreateRun(make_run(run_id), claim)))
    store.commit(Write([event("run.ended")], EndRun("r-1", RunState.ENDED, 1100.0, "", "")))
    store.commit(Write([event("idempotency.forgotten")], ForgetIdempotencyKeys(1100.0)))
    assert store.find_idempotent_run("portal", "key-r-1") == ("r-1", "fp")  # not before
    store.commit(Write([event("idempotency.forgotten")], ForgetIdempotencyKeys(5000.0)))
    assert store.find_idempotent_run("portal", "key-r-1") is None
    assert store.find_idempotent_run("portal", "key-r-2") == ("r-2", "fp")  # still active
    assert store.get_run("r-1") is not None  # the run itself stays


def test_a_dpop_proof_is_accepted_once_until_it_expires(store: Store) -> None:
    store.commit(Write([], RecordProof("jkt-a", "jti-1", expires=1060.0, now=1000.0)))
    with pytest.raises(ProofReplayed):
        store.commit(Write([], RecordProof("jkt-a", "jti-1", expires=1061.0, now=1001.0)))
    # Another key may use the same jti; the same key another jti.
    store.commit(Write([], RecordProof("jkt-b", "jti-1", expires=1060.0, now=1001.0)))
    store.commit(Write([], RecordProof("jkt-a", "jti-2", expires=1060.0, now=1001.0)))
    # Once expired it is forgotten (the proof's iat window has closed by then anyway).
    store.commit(Write([], RecordProof("jkt-a", "jti-1", expires=1200.0, now=1100.0)))
    with pytest.raises(ProofReplayed):
        store.commit(Write([], RecordProof("jkt-a", "jti-1", expires=1201.0, now=1101.0)))


def test_witness_cosignatures_are_kept_once_per_witness_and_tree_size(store: Store) -> None:
    first = CosignatureRecord(5, b"r" * 32, "w1+0011+AQ", "\u2014 w1 AAAA")
    store.commit(Write([], RecordCosignature(first)))
    store.commit(Write([], RecordCosignature(CosignatureRecord(5, b"r" * 32, "w1+0011+AQ", "x"))))
    second = CosignatureRecord(5, b"r" * 32, "w2+0022+AQ", "\u2014 w2 BBBB")
    store.commit(Write([], RecordCosignature(second)))
    store.commit(Write([], RecordCosignature(CosignatureRecord(6, b"s" * 32, "w1+0011+AQ", "y"))))
    assert store.cosignatures(5) == [first, second]
    assert [c.line for c in store.cosignatures(6)] == ["y"]
    assert store.cosignatures(7) == []


def test_one_proof_presented_concurrently_is_accepted_exactly_once(store: Store) -> None:
    outcomes: list[bool] = []
    lock = threading.Lock()

    def present() -> None:
        try:
            store.commit(Write([], RecordProof("jkt-race", "jti-race", 1060.0, 1000.0)))
            accepted = True
        except ProofReplayed:
            accepted = False
        with lock:
            outcomes.append(accepted)

    threads = [threading.Thread(target=present) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 7 + [True]


def test_a_key_is_stored_with_its_schedule_and_retirement_only_ever_moves_earlier(
    store: Store,
) -> None:
    store.commit(Write([event("key.created")], PublishKey("k-1", "ES256", "{}", 1000.0)))
    store.commit(Write([event("key.rotated")], PublishKey("k-2", "RS256", "{}", 1001.0, 4601.0)))
    first, second = sorted(store.public_keys(), key=lambda k: k.kid)
    assert (first.activate_time, first.stop_signing_time, first.retire_time) == (1000.0, None, None)
    assert second.activate_time == 4601.0  # pre-published: signs only from then
    assert not second.signs_at(4600.0) and second.signs_at(4601.0) and second.published_at(1001.0)

    store.commit(Write([event("key.retired")], RetireKey(("k-1",), 94601.0, 4601.0)))
    # A later, normal rotation would stop it later: the earlier schedule stands.
    store.commit(Write([event("key.retired")], RetireKey(("k-1", "k-2"), 99000.0, 9000.0)))
    first, second = sorted(store.public_keys(), key=lambda k: k.kid)
    assert (first.stop_signing_time, first.retire_time) == (4601.0, 94601.0)
    assert (second.stop_signing_time, second.retire_time) == (9000.0, 99000.0)  # one write
    # An emergency stops it sooner.
    store.commit(Write([event("key.retired")], RetireKey(("k-1",), 91002.0, 1002.0)))
    [first] = [k for k in store.public_keys() if k.kid == "k-1"]
    assert (first.stop_signing_time, first.retire_time) == (1002.0, 91002.0)
    assert first.signs_at(1001.0) and not first.signs_at(1002.0)
    assert first.published_at(91001.0) and not first.published_at(91002.0)


def test_concurrent_writers_each_get_their_own_result(store: Store) -> None:
    store.commit(Write([], CreateRun(make_run("r-shared"))))
    results: list[str] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        try:
            store.commit(Write([event("x")], EndRun("r-shared", RunState.ENDED, 1.0, "", f"w{i}")))
            outcome = "ended"
        except RunNotActive:
            outcome = "conflict"
        store.commit(Write([event("run.started")], CreateRun(make_run(f"r-{i}"))))
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count("ended") == 1
    assert store.head_sequence() == 17
    assert [e.sequence for e in store.read_events(0, 100)] == list(range(1, 18))


def test_listeners_see_commits_in_order_before_the_writer_returns(store: Store) -> None:
    seen: list[int] = []

    def listener(committed: Committed, mutation: Mutation | None) -> None:
        seen.extend(e.sequence for e in committed.events)

    store.add_listener(listener)
    for i in range(5):
        store.commit(Write([event("x")]))
        assert seen[-1] == i + 1
    assert seen == [1, 2, 3, 4, 5]


def test_list_runs_pages_newest_first_with_filters(store: Store) -> None:
    for i in range(7):
        org = "acme" if i % 2 == 0 else "globex"
        store.commit(Write([], CreateRun(make_run(f"r-{i}", created=1000.0 + i, org=org))))
    first = store.list_runs(RunQuery(limit=3))
    assert [r.run_id for r in first] == ["r-6", "r-5", "r-4"]
    after = store.list_runs(RunQuery(limit=3, before=(first[-1].create_time, first[-1].run_id)))
    assert [r.run_id for r in after] == ["r-3", "r-2", "r-1"]
    acme = store.list_runs(RunQuery(org="acme", limit=10))
    assert [r.run_id for r in acme] == ["r-6", "r-4", "r-2", "r-0"]


def test_listing_by_state_as_of_a_time_counts_a_lapsed_active_run_as_expired(
    store: Store,
) -> None:
    # make_run: lease until created + 30, deadline created + 600.
    store.commit(Write([], CreateRun(make_run("r-lapsed", created=1000.0))))
    store.commit(Write([], CreateRun(make_run("r-live", created=1020.0))))
    store.commit(Write([], CreateRun(make_run("r-ended", created=1010.0))))
    store.commit(Write([], EndRun("r-ended", RunState.ENDED, 1015.0, "", "")))
    store.commit(Write([], RenewLease("r-live", 1500.0)))

    def listed(state: RunState, as_of: float | None) -> list[str]:
        return [r.run_id for r in store.list_runs(RunQuery(state=state, as_of=as_of))]

    assert listed(RunState.ACTIVE, 1030.0) == ["r-live"]
    assert listed(RunState.EXPIRED, 1030.0) == ["r-lapsed"]
    assert listed(RunState.ENDED, 1030.0) == ["r-ended"]
    assert listed(RunState.EXPIRED, 1029.9) == []
    assert listed(RunState.ACTIVE, 1600.0) == []  # past the renewed lease too
    assert listed(RunState.ACTIVE, None) == ["r-live", "r-lapsed"]  # as recorded


def test_live_runs_are_active_ones_and_recently_ended_ones(store: Store) -> None:
    for i in range(3):
        store.commit(Write([], CreateRun(make_run(f"r-{i}"))))
    store.commit(Write([], EndRun("r-0", RunState.ENDED, 500.0, "", "")))
    store.commit(Write([], EndRun("r-1", RunState.EXPIRED, 1500.0, "", "")))
    assert sorted(r.run_id for r in store.live_runs(ended_since=1000.0)) == ["r-1", "r-2"]


def checkpoint_of(store: Store, sequence: int, prev: int = 0) -> CheckpointRecord:
    event = store.read_events(sequence - 1, 1)[0]
    return CheckpointRecord(sequence, event.hash, 1001.0, "k1", f"jws-{sequence}", prev)


def test_a_checkpoint_is_stored_only_for_the_chain_it_claims(store: Store) -> None:
    store.commit(Write([event("x") for _ in range(6)]))
    good = checkpoint_of(store, 3)
    with pytest.raises(CheckpointConflict):
        store.commit(Write([], RecordCheckpoint(CheckpointRecord(3, "ab" * 32, 1.0, "k1", "j", 0))))
    beyond_head = CheckpointRecord(9, good.hash, 1.0, "k1", "j", 0)
    with pytest.raises(CheckpointConflict):
        store.commit(Write([], RecordCheckpoint(beyond_head)))
    assert store.latest_checkpoint() is None
    store.commit(Write([], RecordCheckpoint(good)))
    assert store.latest_checkpoint() == good
    # A racing replica still thinking "no checkpoint yet" loses, and nothing forks.
    with pytest.raises(CheckpointConflict):
        store.commit(Write([], RecordCheckpoint(checkpoint_of(store, 5, prev=0))))
    later = checkpoint_of(store, 5, prev=3)
    store.commit(Write([], RecordCheckpoint(later)))
    assert store.checkpoints(0, 10) == [good, later]
    assert store.checkpoints(3, 10) == [later]
    assert store.latest_checkpoint(at_most=4) == good
    assert store.head_sequence() == 6


def test_pruning_deletes_only_a_whole_checkpointed_range_with_its_event(store: Store) -> None:
    store.commit(Write([event("x") for _ in range(8)]))
    with pytest.raises(PruneConflict):
        store.commit(Write([event("audit.pruned")], PruneAudit(4)))
    assert (store.oldest_sequence(), store.head_sequence(), store.pruned_through()) == (1, 8, 0)
    boundary = checkpoint_of(store, 4)
    store.commit(Write([], RecordCheckpoint(boundary)))
    store.commit(Write([event("audit.pruned")], PruneAudit(4)))
    assert store.pruned_through() == 4
    assert (store.oldest_sequence(), store.head_sequence()) == (5, 9)
    assert store.read_events(0, 100)[0].sequence == 5
    rows = [(s.sequence, s.record, s.prev_hash, s.hash) for s in store.stored_events(0, 100)]
    assert audit.verify_chain(rows, start_prev_hash=boundary.hash) is None
    with pytest.raises(PruneConflict):
        store.commit(Write([event("audit.pruned")], PruneAudit(4)))
    assert store.head_sequence() == 9


def test_first_sequence_since_finds_the_oldest_event_not_older_than_a_time(store: Store) -> None:
    for i in range(5):
        store.commit(Write([AuditDraft(time=100.0 + i, action="x", outcome=Outcome.SUCCESS)]))
    assert store.first_sequence_since(102.0) == 3
    assert store.first_sequence_since(50.0) == 1
    assert store.first_sequence_since(200.0) is None


def test_a_waiting_follower_wakes_when_an_event_is_committed(store: Store) -> None:
    head = store.head_sequence()
    writer = threading.Timer(0.05, lambda: store.commit(Write([event("a")])))
    writer.start()
    try:
        seen = store.wait_for_events(head, timeout=10)
        # Woken by the commit (or, at worst, early): reading by sequence finds the event.
        while seen <= head:
            seen = store.wait_for_events(head, timeout=10)
    finally:
        writer.join()
    assert seen == head + 1
    assert [e.sequence for e in store.read_events(head, 10)] == [head + 1]


def test_waiting_without_commits_returns_the_unchanged_head(store: Store) -> None:
    store.commit(Write([event("a")]))
    assert store.wait_for_events(1, timeout=0.05) == 1
    assert store.wait_for_events(0, timeout=5) == 1  # already beyond: no wait


def test_the_change_feed_remembers_recent_events_gaplessly_and_says_when_it_cannot(
    store: Store,
) -> None:
    from broker.store.changes import ChangeFeed

    feed = ChangeFeed(store, start_after=0)
    for i in range(7):
        store.commit(Write([event("a", f"r-{i}")]))
    assert feed.recent(0, 10) is None  # nothing read from the store yet
    assert feed.catch_up() == 7
    assert [e.sequence for e in feed.recent(0, 10) or []] == list(range(1, 8))
    assert [e.sequence for e in feed.recent(3, 2) or []] == [4, 5]
    assert feed.recent(7, 10) is None  # beyond what was read: ask the store


def _root(store: Store, size: int) -> bytes:
    return merkle.root_at(size, store.tree_nodes)


def _expected_root(store: Store) -> bytes:
    leaves = [merkle.leaf_hash(audit.canonical_bytes(e.record)) for e in all_stored_events(store)]
    return root_of_leaves(leaves)


def test_every_event_is_a_leaf_of_the_merkle_tree_written_with_it(store: Store) -> None:
    assert store.tree_base() == 0
    assert _root(store, 0) == merkle.EMPTY_ROOT
    roots = []
    for batch in (1, 2, 5, 1, 13):
        store.commit(Write([event("run.started") for _ in range(batch)]))
        roots.append(_root(store, store.head_sequence()))
    assert store.head_sequence() == 22
    assert roots[-1] == _expected_root(store)
    # Every older tree is still there, whole: its root is the same as when it was the head.
    assert _root(store, 3) == roots[1] and _root(store, 8) == roots[2]


def test_a_refused_write_adds_no_leaf_and_its_neighbours_in_the_batch_do(store: Store) -> None:
    store.commit(Write([event("run.started", "r-1")], CreateRun(make_run("r-1"))))
    results: list[object] = []

    def write(w: Write) -> None:
        try:
            results.append(store.commit(w))
        except Conflict as exc:
            results.append(exc)

    writes = [
        Write([event("run.renewed", "r-1")]),
        Write([event("run.ended", "nope")], EndRun("nope", RunState.ENDED, 1001.0, "x", "y")),
        Write([event("run.renewed", "r-1")]),
    ]
    threads = [threading.Thread(target=write, args=(w,)) for w in writes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(r, Conflict) for r in results) == 1
    assert store.head_sequence() == 3
    assert store.tree_nodes([(0, 3)]) == {}
    assert _root(store, 3) == _expected_root(store)


def test_inclusion_and_consistency_proofs_come_from_the_stored_nodes(store: Store) -> None:
    store.commit(Write([event("run.started") for _ in range(37)]))
    events = list(all_stored_events(store))
    root, old_root = _root(store, 37), _root(store, 20)
    for index in (0, 19, 36):
        leaf = merkle.leaf_hash(audit.canonical_bytes(events[index].record))
        verify_inclusion(leaf, index, 37, merkle.inclusion_proof(index, 37, store.tree_nodes), root)
    verify_consistency(20, 37, merkle.consistency_proof(20, 37, store.tree_nodes), old_root, root)
