"""The Merkle tree over the audit events (RFC 9162 hashing), as the stores keep it.

Every event is also a leaf: leaf `i` is the event with sequence `base + i + 1` (`base` is 0,
except for a store pruned by retention before it had a tree), its hash
SHA-256(0x00 || the event's canonical bytes). The stores keep every *full* subtree's hash as
a node `(level, index)` — the subtree of the 2^level leaves from `index * 2^level` — written
in the transaction that appends the leaf completing it: an append writes the leaf and, when it
closes subtrees, one node per closed level (two rows per event on average, at most log n).
The tree of any size n is made of stored nodes only: its right edge (the *frontier*) is the
nodes of n's set bits, and every subtree a proof names is a stored node or a few of them.

Checking is `tokenbroker.merkle`'s (the auditor's module); this module builds and proves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenbroker.merkle import (
    EMPTY_ROOT,
    frontier_root,
    leaf_hash,
    node_hash,
    split_point,
)

NodeId = tuple[int, int]  # (level, index)
Node = tuple[int, int, bytes]
NodeReader = Callable[[Sequence[NodeId]], dict[NodeId, bytes]]

__all__ = [
    "EMPTY_ROOT",
    "Frontier",
    "consistency_proof",
    "frontier_ids",
    "inclusion_proof",
    "leaf_hash",
    "root_at",
]


class MissingNodes(Exception):
    """The store lacks tree nodes the request needs (a size beyond the tree, or a tree
    still being built)."""


def frontier_ids(size: int) -> list[NodeId]:
    """The nodes that make up the right edge of the tree of `size` leaves, largest first."""
    return [
        (level, (size >> level) - 1)
        for level in reversed(range(size.bit_length()))
        if size >> level & 1
    ]


class Frontier:
    """The right edge of the tree: what an append needs, kept beside the chain's head."""

    def __init__(self, size: int, hashes: Sequence[bytes]) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a tree of {size} leaves has {bin(size).count('1')} edge nodes")
        self.size = size
        self.hashes = list(hashes)

    @classmethod
    def read(cls, size: int, reader: NodeReader) -> Frontier:
        ids = frontier_ids(size)
        found = reader(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise MissingNodes(f"tree nodes {missing[:3]} of the tree of {size} are missing")
        return cls(size, [found[i] for i in ids])

    def append(self, data: bytes) -> list[Node]:
        """Add the leaf of `data`; the nodes to store (the leaf, then each subtree it closes)."""
        carry = leaf_hash(data)
        index, level = self.size, 0
        written = [(0, index, carry)]
        while index & 1:
            carry = node_hash(self.hashes.pop(), carry)
            index >>= 1
            level += 1
            written.append((level, index, carry))
        self.hashes.append(carry)
        self.size += 1
        return written

    def root(self) -> bytes:
        return frontier_root(self.hashes)

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)


# -- proofs -------------------------------------------------------------------------------------

Span = tuple[int, int]  # leaves [start, end)


def _inclusion_spans(index: int, start: int, end: int) -> list[Span]:
    """RFC 9162 §2.1.3.1 PATH(m, D[start:end]) as the spans whose hashes form it."""
    if end - start == 1:
        return []
    k = split_point(end - start)
    if index - start < k:
        return [*_inclusion_spans(index, start, start + k), (start + k, end)]
    return [*_inclusion_spans(index, start + k, end), (start, start + k)]


def _consistency_spans(m: int, start: int, end: int, whole: bool) -> list[Span]:
    """RFC 9162 §2.1.4.1 SUBPROOF(m, D[start:end], b) as spans."""
    if m == end - start:
        return [] if whole else [(start, end)]
    k = split_point(end - start)
    if m <= k:
        return [*_consistency_spans(m, start, start + k, whole), (start + k, end)]
    return [*_consistency_spans(m - k, start + k, end, False), (start, start + k)]


def _span_nodes(start: int, end: int) -> list[NodeId]:
    """The stored full subtrees whose combination (RFC 9162's split) is MTH(D[start:end])."""
    n = end - start
    if n & (n - 1) == 0 and start % n == 0:
        level = n.bit_length() - 1
        return [(level, start >> level)]
    k = split_point(n)
    return [*_span_nodes(start, start + k), *_span_nodes(start + k, end)]


def _span_hash(start: int, end: int, nodes: dict[NodeId, bytes]) -> bytes:
    n = end - start
    if n & (n - 1) == 0 and start % n == 0:
        level = n.bit_length() - 1
        return nodes[(level, start >> level)]
    k = split_point(n)
    return node_hash(_span_hash(start, start + k, nodes), _span_hash(start + k, end, nodes))


def _hashes(spans: list[Span], reader: NodeReader) -> list[bytes]:
    needed = sorted({node for span in spans for node in _span_nodes(*span)})
    nodes = reader(needed)
    if len(nodes) < len(needed):
        missing = [n for n in needed if n not in nodes]
        raise MissingNodes(f"tree nodes {missing[:3]} are missing")
    return [_span_hash(start, end, nodes) for start, end in spans]


def inclusion_proof(index: int, size: int, reader: NodeReader) -> list[bytes]:
    """The audit path of leaf `index` in the tree of `size` leaves (0 <= index < size)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not inside a tree of {size} leaves")
    return _hashes(_inclusion_spans(index, 0, size), reader)


def consistency_proof(first: int, second: int, reader: NodeReader) -> list[bytes]:
    """The proof that the tree of `second` leaves extends the tree of `first` leaves."""
    if not 0 <= first <= second:
        raise ValueError(f"sizes {first} and {second} are not an old and a new tree size")
    if first in (0, second):
        return []
    return _hashes(_consistency_spans(first, 0, second, True), reader)


def root_at(size: int, reader: NodeReader) -> bytes:
    """The root of the tree of `size` leaves, from its stored frontier."""
    return Frontier.read(size, reader).root() if size else EMPTY_ROOT
