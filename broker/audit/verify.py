"""Offline verification of an audit log: the chain, and the signed checkpoints that anchor it.

The chain alone proves that nothing was edited, inserted, deleted or reordered *unless the
editor recomputed every later hash*. Checkpoints close that gap: each is signed with the
broker's key, so the chain up to a checkpoint is authentic when it reproduces the signed hash.
What they cannot cover is the tail after the newest checkpoint, which the report states
(`anchored_through`).

Every problem is reported at the first sequence it makes suspect; the report keeps the
smallest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from broker.audit import events as audit
from broker.audit.checkpoints import (
    CheckpointInvalid,
    PublishedKeys,
    VerifiedCheckpoint,
    verify_record,
)
from broker.audit.events import ChainBreak, ChainWalker
from broker.audit.export import ExportStatement, MalformedLine
from broker.audit.merkle import Frontier, Node, NodeReader
from broker.store import CheckpointRecord, StoredEvent

Progress = Callable[[int], None]
# Stored tree nodes are compared with the events' a page at a time.
_NODE_PAGE = 4096


@dataclass
class Report:
    source: str
    ok: bool = True
    first_bad_sequence: int | None = None
    problem: str = ""
    events: int = 0
    first_sequence: int | None = None
    last_sequence: int | None = None
    pruned_through: int = 0
    checkpoints: int = 0
    checkpoints_verified: int = 0
    # Every event up to here is vouched for by a signed checkpoint; after it, only by the chain.
    anchored_through: int = 0
    # An export: the range its signed statement declares ("" for a database).
    signed_range: str = ""
    # Checkpoints whose Merkle tree root the events reproduced (and, for a database or an
    # export, the tree at the last event).
    tree_roots_verified: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TreeCheck:
    """The Merkle tree to re-build along the walk: its base, its frontier before the first
    event walked, and the root it must reach at the last event (None: no expectation)."""

    base: int
    frontier: Frontier
    final_root: bytes | None
    # A database's own tree: every node it stores must be the one the events give.
    stored: NodeReader | None = None
    pending: list[Node] = field(default_factory=list)


class Unreadable(Exception):
    """The events could not be read past some point (a malformed line)."""


def verify(
    source: str,
    events: Iterable[StoredEvent],
    checkpoints: list[CheckpointRecord],
    keys: PublishedKeys,
    *,
    pruned_through: int | None,
    progress: Progress = lambda done: None,
    statement: ExportStatement | None = None,
    tree: TreeCheck | None = None,
) -> Report:
    """Verify a log. `pruned_through` is known for a database (the whole retained log, 0 when
    nothing was pruned) and None for an export, whose verified, signed `statement` says
    which range it holds. `tree` re-computes the Merkle tree along the way (from a
    statement's frontier, or the stored tree's at the start of a database)."""
    report = Report(source, pruned_through=pruned_through or 0, checkpoints=len(checkpoints))
    verified, problems = _verify_checkpoints(checkpoints, keys, complete=pruned_through is not None)
    report.checkpoints_verified = len(verified)
    if statement is not None:
        report.signed_range = f"{statement.first}..{statement.last}"
        if tree is None and statement.tree_base is not None:
            try:
                tree = TreeCheck(
                    statement.tree_base,
                    Frontier(statement.first - 1 - statement.tree_base, statement.left),
                    statement.tree_root,
                )
            except ValueError:
                problems.append(
                    ChainBreak(statement.first, "the statement's tree frontier is malformed")
                )
    walk = _Walk(report, verified, pruned_through, statement, tree)
    problems.extend(walk.run(events, progress))
    if problems:
        first = min(problems, key=lambda p: p.sequence)
        report.ok = False
        report.first_bad_sequence = first.sequence
        report.problem = first.problem
    return report


def _verify_checkpoints(
    checkpoints: list[CheckpointRecord], keys: PublishedKeys, *, complete: bool
) -> tuple[dict[int, VerifiedCheckpoint], list[ChainBreak]]:
    verified: dict[int, VerifiedCheckpoint] = {}
    problems = []
    previous: int | None = 0 if complete else None
    for record in sorted(checkpoints, key=lambda c: c.sequence):
        try:
            checkpoint = verify_record(keys, record)
        except CheckpointInvalid as exc:
            problems.append(ChainBreak(record.sequence, f"checkpoint at {record.sequence}: {exc}"))
            previous = record.sequence
            continue
        if previous is not None and checkpoint.prev_sequence != previous:
            problems.append(
                ChainBreak(
                    checkpoint.sequence,
                    f"checkpoint at {checkpoint.sequence} follows one at "
                    f"{checkpoint.prev_sequence}, which is missing",
                )
            )
        verified[checkpoint.sequence] = checkpoint
        previous = checkpoint.sequence
    return verified, problems


class _Walk:
    """One pass over the events, checking links, hashes and checkpoints as it goes."""

    def __init__(
        self,
        report: Report,
        verified: dict[int, VerifiedCheckpoint],
        pruned_through: int | None,
        statement: ExportStatement | None = None,
        tree: TreeCheck | None = None,
    ) -> None:
        self._report = report
        self._verified = verified
        self._pruned_through = pruned_through
        self._statement = statement
        self._tree = tree
        self._walker: ChainWalker | None = None
        self._anchor = 0  # the last checkpoint the chain reproduced
        self._last_hash = ""

    def run(self, events: Iterable[StoredEvent], progress: Progress) -> list[ChainBreak]:
        problems: list[ChainBreak] = []
        start = self._start_problem()
        if start is not None:
            return [start]
        try:
            for event in _counted(events, self._report, progress):
                problem = self._step(event)
                if problem is not None:
                    return [problem]
        except Unreadable as exc:
            return [ChainBreak(self._last_good() + 1, str(exc))]
        tail = (
            self._statement_end_problem()
            or self._tail_problem()
            or self._stored_nodes_problem()
            or self._tree_end_problem()
        )
        if tail is not None:
            problems.append(tail)
        return problems

    def _start_problem(self) -> ChainBreak | None:
        pruned = self._pruned_through
        if pruned is None:
            return None  # an export: decided at its first event
        if pruned == 0:
            self._walker = ChainWalker(audit.GENESIS_HASH, 1)
            return None
        boundary = self._verified.get(pruned)
        if boundary is None:
            return ChainBreak(
                pruned + 1,
                f"events through {pruned} were pruned, but no valid signed checkpoint at "
                f"{pruned} vouches for where the retained chain starts",
            )
        self._walker = ChainWalker(boundary.hash, pruned + 1)
        self._anchor = pruned
        return None

    def _step(self, event: StoredEvent) -> ChainBreak | None:
        if self._walker is None:
            start = self._statement_start_problem(event.sequence)
            if start is not None:
                return start
            self._walker = self._export_walker(event.sequence)
        statement = self._statement
        if statement is not None and event.sequence > statement.last:
            return ChainBreak(
                event.sequence,
                f"event {event.sequence} lies beyond the range the export is signed for "
                f"({statement.first}..{statement.last})",
            )
        broken = self._walker.step(event.sequence, event.record, event.prev_hash, event.hash)
        if broken is not None:
            return broken
        self._last_hash = event.hash
        if self._tree is not None:
            nodes = self._tree.frontier.append(audit.canonical_bytes(event.record))
            if self._tree.stored is not None:
                self._tree.pending.extend(nodes)
                if len(self._tree.pending) >= _NODE_PAGE:
                    problem = self._stored_nodes_problem()
                    if problem is not None:
                        return problem
        checkpoint = self._verified.get(event.sequence)
        if checkpoint is None:
            return None
        if checkpoint.hash != event.hash:
            return ChainBreak(
                self._anchor + 1,
                f"events {self._anchor + 1}..{event.sequence} were rewritten: the chain's hash "
                f"at {event.sequence} differs from the signed checkpoint",
            )
        tree_problem = self._tree_at_checkpoint(checkpoint)
        if tree_problem is not None:
            return tree_problem
        self._anchor = self._report.anchored_through = event.sequence
        return None

    def _tree_at_checkpoint(self, checkpoint: VerifiedCheckpoint) -> ChainBreak | None:
        if checkpoint.tree is None or self._tree is None:
            return None
        size, root = checkpoint.tree
        frontier = self._tree.frontier
        if (self._tree.base + frontier.size, frontier.size, frontier.root()) != (
            checkpoint.sequence,
            size,
            root,
        ):
            return ChainBreak(
                self._anchor + 1,
                f"the Merkle tree at {checkpoint.sequence} differs from the signed checkpoint's",
            )
        self._report.tree_roots_verified += 1
        return None

    def _statement_start_problem(self, first_found: int) -> ChainBreak | None:
        statement = self._statement
        if statement is None or first_found == statement.first:
            return None
        if first_found > statement.first:
            return ChainBreak(
                statement.first,
                f"{_events(statement.first, first_found - 1)} missing from the start: the "
                f"export is signed for {statement.first}..{statement.last}",
            )
        return ChainBreak(
            first_found,
            f"event {first_found} lies before the range the export is signed for "
            f"({statement.first}..{statement.last})",
        )

    def _statement_end_problem(self) -> ChainBreak | None:
        statement = self._statement
        if statement is None:
            return None
        last = self._last_good() if self._walker is not None else statement.first - 1
        if last < statement.last:
            return ChainBreak(
                last + 1,
                f"{_events(last + 1, statement.last)} missing from the end: the export is "
                f"signed for {statement.first}..{statement.last}",
            )
        head = self._last_hash or statement.prev_hash
        if head != statement.head_hash:
            return ChainBreak(
                statement.first,
                f"events {statement.first}..{statement.last} do not end at the signed head hash",
            )
        self._report.anchored_through = statement.last
        return None

    def _stored_nodes_problem(self) -> ChainBreak | None:
        tree = self._tree
        if tree is None or tree.stored is None or not tree.pending:
            return None
        expected, tree.pending = tree.pending, []
        stored = tree.stored([(level, index) for level, index, _ in expected])
        for level, index, digest in expected:
            if stored.get((level, index)) != digest:
                first = tree.base + (index << level) + 1
                return ChainBreak(
                    first,
                    f"the stored Merkle tree node ({level}, {index}) over events "
                    f"{first}..{first + (1 << level) - 1} is not the hash of those events",
                )
        return None

    def _tree_end_problem(self) -> ChainBreak | None:
        tree = self._tree
        if tree is None or tree.final_root is None:
            return None
        if tree.frontier.root() != tree.final_root:
            statement = self._statement
            first = statement.first if statement else (self._pruned_through or 0) + 1
            return ChainBreak(
                first,
                f"the Merkle tree of events ..{tree.base + tree.frontier.size} does not have "
                "the root it should (signed in the statement, or stored for the database)",
            )
        self._report.tree_roots_verified += 1
        return None

    def _export_walker(self, first: int) -> ChainWalker:
        if self._statement is not None:
            return ChainWalker(self._statement.prev_hash, first)
        if first == 1:
            return ChainWalker(audit.GENESIS_HASH, 1)
        anchor = self._verified.get(first - 1)
        if anchor is not None:
            self._anchor = anchor.sequence
            return ChainWalker(anchor.hash, first)
        self._anchor = first - 1
        return ChainWalker(None, first)  # an excerpt: its first link is taken as given

    def _last_good(self) -> int:
        if self._walker is not None and self._walker.last_sequence is not None:
            return self._walker.last_sequence
        return self._pruned_through or 0

    def _tail_problem(self) -> ChainBreak | None:
        last = self._last_good()
        beyond = [s for s in self._verified if s > last]
        if not beyond:
            return None
        return ChainBreak(
            last + 1,
            f"events {last + 1}..{max(beyond)} are missing: a signed checkpoint covers "
            f"sequence {max(beyond)}, the log ends at {last}",
        )


def _events(first: int, last: int) -> str:
    return f"event {first} is" if first == last else f"events {first}..{last} are"


def _counted(
    events: Iterable[StoredEvent], report: Report, progress: Progress
) -> Iterator[StoredEvent]:
    try:
        for event in events:
            if report.first_sequence is None:
                report.first_sequence = event.sequence
            report.last_sequence = event.sequence
            report.events += 1
            if report.events % 5000 == 0:
                progress(report.events)
            yield event
    except MalformedLine as exc:  # an exported file can be unreadable from some line on
        raise Unreadable(str(exc)) from exc
