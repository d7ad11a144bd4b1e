"""Copy a whole store to another backend (`token-broker store migrate`): every run,
idempotency key, signing key record, checkpoint and audit event, row for row, so that the
chain, its hashes and its checkpoints are the same on the copy and `audit verify` passes there.

Rows are copied as stored, never re-sealed; the target must be empty (a copy never merges two
histories). Both ends are SQL backends (SQLite, PostgreSQL): the memory store has nothing to
copy from, or to keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.audit import events as audit
from broker.store import Store, StoreRefused
from broker.store.codec import TABLES, Table


class Copyable(Store, Protocol):
    def table_rows(self, table: Table, batch: int = 2000) -> Iterator[list[tuple[Any, ...]]]: ...

    def load_rows(self, table: Table, rows: list[tuple[Any, ...]]) -> None: ...

    def finish_load(self, pruned_through: int, head: tuple[int, str], tree_base: int) -> None: ...


@dataclass
class Copied:
    """How many rows of each table were copied, and the chain's head on the copy."""

    rows: dict[str, int] = field(default_factory=dict)
    head: tuple[int, str] = (0, audit.GENESIS_HASH)


def copyable(store: Store, role: str) -> Copyable:
    if not all(hasattr(store, m) for m in ("table_rows", "load_rows", "finish_load")):
        raise StoreRefused(f"the {role} store cannot be copied (use sqlite: or postgresql://)")
    return store  # type: ignore[return-value]


def copy_store(source: Store, target: Store) -> Copied:
    """Copy `source` into the empty `target`; StoreRefused if the target holds anything."""
    reader, writer = copyable(source, "source"), copyable(target, "target")
    if target.head_sequence() or target.public_keys() or target.latest_checkpoint():
        raise StoreRefused("the target store is not empty: a copy never merges two histories")
    copied = Copied()
    for table in TABLES:
        count = 0
        for rows in reader.table_rows(table):
            writer.load_rows(table, rows)
            count += len(rows)
            if table.name == "audit_events":
                last = rows[-1]
                copied.head = (int(last[0]), str(last[3]))  # sequence, hash
        copied.rows[table.name] = count
    if copied.rows["audit_events"] == 0:
        # Retention may have pruned every event: the chain continues from its checkpoint.
        latest = source.latest_checkpoint()
        if latest is not None:
            copied.head = (latest.sequence, latest.hash)
    writer.finish_load(source.pruned_through(), copied.head, source.tree_base())
    return copied
