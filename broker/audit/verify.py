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
from dataclasses import asdict, dataclass
from typing import Any

from broker.audit import events as audit
from broker.audit.checkpoints import (
    CheckpointInvalid,
    PublishedKeys,
    VerifiedCheckpoint,
    verify_record,
)
from broker.audit.events import ChainBreak, ChainWalker
from broker.audit.export import MalformedLine
from broker.store import CheckpointRecord, StoredEvent

Progress = Callable[[int], None]


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
) -> Report:
    """Verify a log. `pruned_through` is known for a database (the whole retained log, 0 when
    nothing was pruned) and None for an export, which may start anywhere."""
    report = Report(source, pruned_through=pruned_through or 0, checkpoints=len(checkpoints))
    verified, problems = _verify_checkpoints(checkpoints, keys, complete=pruned_through is not None)
    report.checkpoints_verified = len(verified)
    walk = _Walk(report, verified, pruned_through)
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
    ) -> None:
        self._report = report
        self._verified = verified
        self._pruned_through = pruned_through
        self._walker: ChainWalker | None = None
        self._anchor = 0  # the last checkpoint the chain reproduced

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
        tail = self._tail_problem()
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
            self._walker = self._export_walker(event.sequence)
        broken = self._walker.step(event.sequence, event.record, event.prev_hash, event.hash)
        if broken is not None:
            return broken
        checkpoint = self._verified.get(event.sequence)
        if checkpoint is None:
            return None
        if checkpoint.hash != event.hash:
            return ChainBreak(
                self._anchor + 1,
                f"events {self._anchor + 1}..{event.sequence} were rewritten: the chain's hash "
                f"at {event.sequence} differs from the signed checkpoint",
            )
        self._anchor = self._report.anchored_through = event.sequence
        return None

    def _export_walker(self, first: int) -> ChainWalker:
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
