"""The audit tree's rows (`audit_tree`), in the SQL both SQL stores speak.

A writer keeps the tree's `Frontier` beside the chain's head: read inside each writing
transaction (from the nodes, unless the head is the one this process last wrote, when the
frontier it kept is still the right one), advanced as each event is sealed, its new nodes
inserted in the same transaction. `catch_up` appends the events the tree lacks (a store
from before the tree existed), a page per transaction, when the store is opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from broker.audit.merkle import Frontier, Node, NodeId
from broker.store.codec import Dialect

log = logging.getLogger(__name__)

Execute = Callable[[str, tuple[Any, ...]], list[Any]]
# Chunks of a node read: far below both databases' limits on bound parameters.
_READ_CHUNK = 200


def read_nodes(execute: Execute, dialect: Dialect, ids: Sequence[NodeId]) -> dict[NodeId, bytes]:
    found: dict[NodeId, bytes] = {}
    m = dialect.mark
    for at in range(0, len(ids), _READ_CHUNK):
        chunk = ids[at : at + _READ_CHUNK]
        where = " OR ".join([f"(level={m} AND idx={m})"] * len(chunk))
        params = tuple(value for node in chunk for value in node)
        rows = execute(f"SELECT level, idx, hash FROM audit_tree WHERE {where}", params)  # noqa: S608
        found.update({(int(r[0]), int(r[1])): bytes(r[2]) for r in rows})
    return found


def insert_sql(dialect: Dialect) -> str:
    m = dialect.mark
    return f"INSERT INTO audit_tree (level, idx, hash) VALUES ({m}, {m}, {m})"  # noqa: S608


def tree_base(execute: Execute) -> int:
    return int(execute("SELECT tree_base FROM audit_retention WHERE id=1", ())[0][0])


def tree_size(execute: Execute) -> int:
    """How many leaves the tree holds (its level-0 nodes are written in order)."""
    row = execute("SELECT MAX(idx) FROM audit_tree WHERE level=0", ())[0]
    return 0 if row[0] is None else int(row[0]) + 1


class FrontierCache:
    """The frontier a writer last left, keyed by the chain head it belongs to."""

    def __init__(self) -> None:
        self._head: tuple[int, str] | None = None
        self._frontier: Frontier | None = None

    def frontier(
        self, head: tuple[int, str], base: int, execute: Execute, dialect: Dialect
    ) -> Frontier:
        if self._head == head and self._frontier is not None:
            return self._frontier.copy()
        size = head[0] - base
        return Frontier.read(size, lambda ids: read_nodes(execute, dialect, ids))

    def keep(self, head: tuple[int, str], frontier: Frontier) -> None:
        self._head, self._frontier = head, frontier.copy()

    def forget(self) -> None:
        self._head, self._frontier = None, None


def missing_events(execute: Execute, dialect: Dialect, limit: int) -> tuple[Frontier, list[Any]]:
    """The tree's frontier and up to `limit` (sequence, record) rows of events it lacks."""
    base, size = tree_base(execute), tree_size(execute)
    frontier = Frontier.read(size, lambda ids: read_nodes(execute, dialect, ids))
    m = dialect.mark
    rows = execute(
        f"SELECT sequence, record FROM audit_events WHERE sequence>{m} "  # noqa: S608
        f"ORDER BY sequence LIMIT {m}",
        (base + size, limit),
    )
    if rows and int(rows[0][0]) != base + size + 1:
        raise ValueError(
            f"the audit tree ends at sequence {base + size} but the next retained event is "
            f"{rows[0][0]}: events were pruned before the tree could include them"
        )
    return frontier, rows


def append_rows(frontier: Frontier, rows: Sequence[Any]) -> list[Node]:
    """Advance the frontier over (sequence, record) rows; the nodes to insert."""
    nodes: list[Node] = []
    for _, record in rows:
        nodes.extend(frontier.append(str(record).encode()))
    return nodes


def log_progress(built: int, total: int) -> None:
    log.info("building the audit tree", extra={"events": built, "of": total})
