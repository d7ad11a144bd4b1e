"""Keeping the audit log: signed checkpoints, and retention that never breaks the chain.

A background thread checkpoints the chain's head every `every_events` events or every
`interval` seconds (whichever comes first, and only when the head moved), and once more at
shutdown. When retention is on, it then deletes the oldest whole checkpointed range whose
events are all older than the retention period, together with an `audit.pruned` event, in
one transaction.

Checkpoints are not audit events themselves: a checkpoint is a signed statement *about* the
chain, verifiable on its own; recording it as an event would move the head it just signed
and make an idle broker checkpoint its own checkpoints forever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from broker.audit import checkpoints, merkle
from broker.audit.checkpoints import CheckpointSigner
from broker.audit.events import Action, AuditDraft, AuditEvent, Outcome
from broker.clock import Clock
from broker.identity import BROKER
from broker.store import (
    CheckpointRecord,
    Committed,
    Conflict,
    Mutation,
    PruneAudit,
    RecordCheckpoint,
    Store,
    StoreUnavailable,
    Write,
)
from broker.store.changes import ChangeFeed

log = logging.getLogger(__name__)

DAY = 86400.0


@dataclass(frozen=True)
class KeeperSettings:
    every_events: int = 1000
    interval: float = 60.0
    # 0 keeps every event forever.
    retention_seconds: float = 0.0
    issuer: str = ""
    # At most this many events deleted per transaction, so pruning a large backlog never
    # holds the single writer for long; each step still removes whole checkpointed ranges.
    prune_batch: int = 50_000


class AuditKeeper:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        signer: CheckpointSigner | None,
        settings: KeeperSettings,
        changes: ChangeFeed | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._signer = signer
        self._settings = settings
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        latest = store.latest_checkpoint()
        self._checkpointed = 0 if latest is None else latest.sequence
        self._head = store.head_sequence()
        if signer is None:
            log.warning("no checkpoint signer: the audit chain is not being checkpointed")
            if settings.retention_seconds > 0:
                log.warning("audit retention needs checkpoints; nothing will be pruned")
        # Every committed event, any replica's, is learned from the change feed.
        changes = changes if changes is not None else ChangeFeed(store)
        changes.subscribe(pages=self._on_events, local=self._on_commit)

    def _on_commit(self, committed: Committed, mutation: Mutation | None) -> None:
        # Called by the commit in progress: only note that work is due, never write from here
        # (a write would wait for the very commit that calls it).
        if committed.events:
            self._note_head(committed.events[-1].sequence)

    def _on_events(self, events: Sequence[AuditEvent]) -> None:
        self._note_head(events[-1].sequence)

    def _note_head(self, sequence: int) -> None:
        if self._signer is None:
            return
        with self._wake:
            self._head = max(self._head, sequence)
            if self._head - self._checkpointed >= self._settings.every_events:
                self._wake.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="audit-keeper", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, then checkpoint the head once more so the tail is covered."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._tick(prune=False)

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(self._due_or_stopping, timeout=self._settings.interval)
                if self._stopping:
                    return
            self._tick(prune=True)

    def _due_or_stopping(self) -> bool:
        backlog = self._head - self._checkpointed
        return self._stopping or backlog >= self._settings.every_events

    def _tick(self, *, prune: bool) -> None:
        try:
            self.checkpoint()
            if prune:
                self.prune()
        except StoreUnavailable as exc:
            log.error("audit keeping failed; will retry", extra={"error": str(exc)})
        except Exception:
            log.exception("audit keeping failed; will retry")

    def checkpoint(self) -> CheckpointRecord | None:
        """Sign and store a checkpoint of the current head, if it moved since the last one."""
        if self._signer is None:
            return None
        latest = self._store.latest_checkpoint()
        prev = 0 if latest is None else latest.sequence
        head = self._store.head_sequence()
        if head <= prev:
            return None
        found = self._store.read_events(head - 1, 1)
        if not found:
            return None
        event = found[0]
        now = self._clock()
        claims = checkpoints.claims_for(
            event.sequence, event.hash, prev, now, self._settings.issuer, self._tree_at(event)
        )
        jws = self._signer.sign(claims, typ=checkpoints.CHECKPOINT_TYP)
        record = CheckpointRecord(
            event.sequence, event.hash, now, checkpoints.key_id(jws), jws, prev
        )
        try:
            self._store.commit(Write([], RecordCheckpoint(record)))
        except Conflict:
            # Another replica checkpointed first; its checkpoint serves as well.
            return None
        self._checkpointed = record.sequence
        log.info("audit checkpoint", extra={"sequence": record.sequence, "kid": record.kid})
        return record

    def _tree_at(self, event: AuditEvent) -> tuple[int, bytes] | None:
        """The Merkle tree's (size, root) with `event` as its last leaf."""
        size = event.sequence - self._store.tree_base()
        try:
            return size, merkle.root_at(size, self._store.tree_nodes)
        except merkle.MissingNodes:
            log.warning("the audit tree lacks nodes; checkpoint signed without its root")
            return None

    def prune(self) -> int | None:
        """Delete every whole checkpointed range older than retention, in bounded steps.

        Returns the new `pruned_through`, or None when nothing was pruned.
        """
        target = self._prune_target()
        pruned = None
        while target is not None:
            current = self._store.pruned_through()
            if target <= current:
                break
            step = self._store.latest_checkpoint(
                at_most=min(target, current + self._settings.prune_batch)
            )
            if step is None or step.sequence <= current:
                # One range longer than a batch: it still goes whole, or not at all.
                step = self._store.checkpoints(current, 1)[0]
            if not self._prune_through(step):
                break
            pruned = step.sequence
        return pruned

    def _prune_target(self) -> int | None:
        """The newest checkpoint whose range and every range before it are all too old."""
        if self._settings.retention_seconds <= 0:
            return None
        cutoff = self._clock() - self._settings.retention_seconds
        young = self._store.first_sequence_since(cutoff)
        # Every event before the first young one is old; the target is the last checkpoint there.
        limit = self._store.head_sequence() if young is None else young - 1
        boundary = self._store.latest_checkpoint(at_most=limit)
        if boundary is None or boundary.sequence <= self._store.pruned_through():
            return None
        return boundary.sequence

    def _prune_through(self, boundary: CheckpointRecord) -> bool:
        event = AuditDraft(
            time=self._clock(),
            action=Action.AUDIT_PRUNED,
            outcome=Outcome.SUCCESS,
            principal=BROKER.name,
            details={
                "pruned_through": boundary.sequence,
                "checkpoint_hash": boundary.hash,
                "retention_seconds": self._settings.retention_seconds,
            },
        )
        try:
            self._store.commit(Write([event], PruneAudit(boundary.sequence)))
        except Conflict:
            return False  # another replica pruned first
        log.info("audit events pruned", extra={"pruned_through": boundary.sequence})
        return True
