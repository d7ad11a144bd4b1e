"""Signed tree heads and proofs of the audit log, answered from the stored tree.

A tree head is a C2SP checkpoint — origin, tree size, base64 root — signed with the log key
(`lognote.LogKey`). It is signed when asked for, for the tree as it stands (a signature is a
commitment whenever it is made; what it commits to cannot be changed afterwards, since every
later head must be consistent with it), and the last one is kept until the log grows.

Leaf `i` of the tree is the event with sequence `base + i + 1`; `base` is 0 except for a
store pruned by retention before it had a tree (see broker.audit.merkle).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from broker.audit import merkle
from broker.audit.lognote import LogKey
from broker.auth.authz import Authorizer, Op
from broker.context import CallContext
from broker.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from broker.runs.model import PipelineRef
from broker.store import Store, StoredEvent
from tokenbroker.merkle import checkpoint_text

# C2SP tlog-tiles: tiles are 2^8 = 256 hashes wide, one tile level per 8 tree levels.
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
TILE_LEVELS = 8  # 8 * 8 = 64 tree levels: any tree of up to 2^63 leaves


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head: the note, and what it says."""

    origin: str
    size: int
    root: bytes
    base: int
    note: str


@dataclass(frozen=True)
class InclusionProof:
    event: StoredEvent
    leaf_index: int
    hashes: list[bytes]
    head: TreeHead


@dataclass(frozen=True)
class ConsistencyProof:
    first: int
    second: int
    hashes: list[bytes]
    head: TreeHead


class TreeHeads:
    def __init__(self, store: Store, key: LogKey, authorizer: Authorizer) -> None:
        self._store = store
        self._key = key
        self._authz = authorizer
        self._lock = threading.Lock()
        self._last: TreeHead | None = None
        self._base: int | None = None

    @property
    def verifier_key(self) -> str:
        return self._key.verifier.text()

    def _tree_base(self) -> int:
        if self._base is None:
            self._base = self._store.tree_base()
        return self._base

    def latest(self) -> TreeHead:
        """A head for the whole tree as it stands, signed (public: it names only a size)."""
        base = self._tree_base()
        size = max(self._store.head_sequence() - base, 0)
        with self._lock:
            if self._last is not None and self._last.size == size:
                return self._last
        head = self.signed(size)
        with self._lock:
            if self._last is None or self._last.size < head.size:
                self._last = head
        return head

    def signed(self, size: int) -> TreeHead:
        """A signed head for the tree of `size` leaves (an older size too: every full
        subtree is kept)."""
        root = merkle.root_at(size, self._store.tree_nodes)
        note = self._key.sign(checkpoint_text(self._key.name, size, root))
        return TreeHead(self._key.name, size, root, self._tree_base(), note)

    def tree_head(self, ctx: CallContext) -> TreeHead:
        self._authz.require(ctx, Op.PROVE_AUDIT)
        return self.latest()

    def prove_inclusion(self, ctx: CallContext, sequence: int, tree_size: int) -> InclusionProof:
        """The event `sequence`, and its audit path in the tree of `tree_size` leaves (0: the
        tree as it stands), with a head signed for that size."""
        found = self._store.stored_events(sequence - 1, 1) if sequence > 0 else []
        event = found[0] if found and found[0].sequence == sequence else None
        # An auditor scoped to some pipelines may prove the events of those pipelines; the
        # refusal never names the pipeline of an event outside them.
        try:
            self._authz.require(ctx, Op.READ_AUDIT, pipeline=_pipeline_of(event))
        except PermissionDenied:
            raise PermissionDenied(
                f"{ctx.principal.name} may not prove event {sequence}: it is not an event "
                "of a pipeline inside its auditor scope"
            ) from None
        index, hashes, head = self.inclusion_path(sequence, tree_size)
        if event is None:
            raise NotFound(f"event {sequence} is no longer retained")
        return InclusionProof(event, index, hashes, head)

    def inclusion_path(self, sequence: int, tree_size: int) -> tuple[int, list[bytes], TreeHead]:
        """(leaf index, audit path, signed head) of event `sequence` in the tree of
        `tree_size` leaves (0: as it stands). Only hashes: public, like the tiles."""
        head = self._head_for(tree_size)
        index = sequence - head.base - 1
        if not 0 <= index < head.size:
            raise InvalidArgument.field(
                "sequence",
                f"event {sequence} is not in the tree of size {head.size} (its leaves are "
                f"events {head.base + 1}..{head.base + head.size})",
            )
        return index, merkle.inclusion_proof(index, head.size, self._store.tree_nodes), head

    def prove_consistency(self, ctx: CallContext, first: int, second: int) -> ConsistencyProof:
        """Proof that the tree of `second` leaves (0: as it stands) extends that of `first`."""
        self._authz.require(ctx, Op.PROVE_AUDIT)
        return self.consistency(first, second)

    def consistency(self, first: int, second: int) -> ConsistencyProof:
        """The consistency proof itself: only hashes, public like the tiles."""
        head = self._head_for(second)
        if not 0 < first <= head.size:
            raise InvalidArgument.field("first", f"must be between 1 and {head.size}")
        hashes = merkle.consistency_proof(first, head.size, self._store.tree_nodes)
        return ConsistencyProof(first, head.size, hashes, head)

    def tile(self, level: int, index: int, width: int) -> bytes | None:
        """A C2SP tlog-tiles hash tile (https://c2sp.org/tlog-tiles): the hashes of the
        `width` nodes from `index * 256` at tree level `8 * level`, concatenated; None while
        the log does not hold them all. Every stored full subtree is such a node, and none
        ever changes, so a tile once served is served the same forever."""
        if not (0 <= level < TILE_LEVELS and 1 <= width <= TILE_WIDTH and index >= 0):
            return None
        height = TILE_HEIGHT * level
        size = max(self._store.head_sequence() - self._tree_base(), 0)
        first = index * TILE_WIDTH
        if first + width > size >> height:
            return None
        ids = [(height, first + i) for i in range(width)]
        nodes = self._store.tree_nodes(ids)
        if len(nodes) != width:
            return None
        return b"".join(nodes[i] for i in ids)

    def _head_for(self, tree_size: int) -> TreeHead:
        latest = self.latest()
        if tree_size == 0 or tree_size == latest.size:
            return latest
        if not 0 < tree_size <= latest.size:
            raise InvalidArgument.field(
                "tree_size", f"tree size {tree_size} is beyond the log's {latest.size}"
            )
        try:
            return self.signed(tree_size)
        except merkle.MissingNodes:
            raise FailedPrecondition(f"the tree of size {tree_size} is not stored") from None


def _pipeline_of(event: StoredEvent | None) -> PipelineRef | None:
    pipeline = None if event is None else event.record.get("pipeline")
    if not isinstance(pipeline, dict):
        return None  # not located on a pipeline: only an auditor of everything
    try:
        return PipelineRef(
            str(pipeline["org"]), str(pipeline["project"]), str(pipeline["pipeline"])
        )
    except KeyError:
        return None
