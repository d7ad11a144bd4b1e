"""The `merkle` bench section: the audit tree's cost as the log grows, in-process.

On the two pre-filled stores (10^3 and 10^6 events, before the brokers start): appends
through the store as the broker makes them (one event per commit, each fsynced, and 100
events per commit, where the tree's share shows), then inclusion and consistency proofs from
the stored nodes (what ProveInclusion / ProveConsistency do besides signing), at random
leaves and sizes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from broker.audit import merkle
from broker.audit.events import AuditDraft, Outcome
from broker.bench.report import Figure
from broker.store import Write
from broker.store.sqlite import SqliteStore

APPENDS = 200
BATCHES = 40
PER_BATCH = 100
PROOFS = 2000


def _draft() -> AuditDraft:
    return AuditDraft(time=time.time(), action="token.issued", outcome=Outcome.SUCCESS)


def measure(stores: dict[str, Path], quick: bool) -> list[Figure]:
    figures: list[Figure] = []
    per_event: dict[str, float] = {}
    for name, data_dir in stores.items():
        store = SqliteStore(data_dir)
        try:
            figures += _appends(store, name, quick, per_event)
            figures += _proofs(store, name, quick)
        finally:
            store.close()
    small, large = per_event.get("small"), per_event.get("large")
    if small and large:
        flat = Figure(name="append, 100/commit: large / small cost per event", unit="")
        flat.ratio = large / small
        flat.judge("≤1.10×", flat.ratio <= 1.10)
        flat.note = "the tree's cost per event does not grow with the log"
        figures.append(flat)
    return figures


def _appends(
    store: SqliteStore, name: str, quick: bool, per_event: dict[str, float]
) -> list[Figure]:
    stored = store.head_sequence()
    for _ in range(5):  # warm the page cache and the writer's frontier
        store.commit(Write([_draft() for _ in range(PER_BATCH)]))
    singles = []
    for _ in range(APPENDS // (4 if quick else 1)):
        began = time.perf_counter()
        store.commit(Write([_draft()]))
        singles.append(time.perf_counter() - began)
    one = Figure.measured(
        f"append 1 event/commit, {stored:,} stored", [len(singles) / sum(singles)], singles
    )
    one.unit = "commits/s"
    batches, rounds = [], []
    for _ in range(BATCHES // (4 if quick else 1)):
        began = time.perf_counter()
        store.commit(Write([_draft() for _ in range(PER_BATCH)]))
        seconds = time.perf_counter() - began
        batches.append(seconds)
        rounds.append(PER_BATCH / seconds)
    many = Figure.measured(f"append {PER_BATCH} events/commit, {stored:,} stored", rounds, batches)
    many.unit = "events/s"
    per_event[name] = 1 / many.rate
    return [one, many]


def _proofs(store: SqliteStore, name: str, quick: bool) -> list[Figure]:
    rng = random.Random(18)  # noqa: S311 (which leaves to prove, not a secret)
    size = store.head_sequence() - store.tree_base()
    for index in range(0, size, max(size // 500, 1)):  # warm the page cache first
        merkle.inclusion_proof(index, size, store.tree_nodes)
    inclusion, consistency = [], []
    cpu = {"inclusion": 0.0, "consistency": 0.0}
    for _ in range(PROOFS // (4 if quick else 1)):
        index = rng.randrange(size)
        began, began_cpu = time.perf_counter(), time.thread_time()
        store.stored_events(index, 1)  # the event itself, as ProveInclusion reads it
        merkle.inclusion_proof(index, size, store.tree_nodes)
        inclusion.append(time.perf_counter() - began)
        cpu["inclusion"] += time.thread_time() - began_cpu
        first = rng.randrange(1, size + 1)
        began, began_cpu = time.perf_counter(), time.thread_time()
        merkle.root_at(first, store.tree_nodes)  # the old head a caller would compare
        merkle.consistency_proof(first, size, store.tree_nodes)
        consistency.append(time.perf_counter() - began)
        cpu["consistency"] += time.thread_time() - began_cpu
    figures = []
    for kind, samples in (("inclusion", inclusion), ("consistency", consistency)):
        figure = Figure.measured(
            f"{kind} proof, tree of {size:,}", [len(samples) / sum(samples)], samples
        )
        figure.unit = "proofs/s"
        figure.cpu_us = cpu[kind] / len(samples) * 1e6
        if name == "large":
            figure.judge("p99 ≤5 ms", figure.p99_ms <= 5.0)
        figures.append(figure)
    return figures
