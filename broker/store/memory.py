"""In-memory backend: the same contract as SQLite, nothing durable. For tests and
throw-away brokers (`--store memory:`)."""

from __future__ import annotations

import dataclasses
import threading
from bisect import bisect_right
from collections.abc import Sequence

from broker.audit import events as audit
from broker.audit.events import AuditEvent
from broker.audit.merkle import Frontier, NodeId
from broker.runs.model import Run
from broker.store import (
    CheckpointConflict,
    CheckpointRecord,
    CommitListener,
    Committed,
    Conflict,
    CosignatureRecord,
    CreateRun,
    EndRun,
    ForgetIdempotencyKeys,
    IdempotencyKeyTaken,
    Mutation,
    ParentNotActive,
    ProofReplayed,
    PruneAudit,
    PruneConflict,
    PublicKeyRecord,
    PublishKey,
    RecordCheckpoint,
    RecordCosignature,
    RecordProof,
    RenewLease,
    RetireKey,
    RunNotActive,
    RunQuery,
    StoredEvent,
    StoreUrlInvalid,
    UnknownRun,
    Write,
    descendant_end,
)
from broker.store.factory import OpenOptions, StoreUrl

PROOF_PRUNE_AT = 10_000  # remembered proofs before the expired ones are swept


def check_url(url: StoreUrl) -> None:
    if url.location or url.options:
        raise StoreUrlInvalid(f"store {str(url)!r}: a memory store takes no path or options")


def open_url(url: StoreUrl, options: OpenOptions) -> MemoryStore:
    if options.read_only:
        raise StoreUrlInvalid(
            "a memory: store lives only inside its broker; there is nothing to read offline"
        )
    return MemoryStore()


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._runs: dict[str, Run] = {}
        self._idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        self._proofs: dict[tuple[str, str], float] = {}  # (jkt, jti) -> expires
        self._events: list[AuditEvent] = []
        self._keys: dict[str, PublicKeyRecord] = {}
        self._checkpoints: list[CheckpointRecord] = []
        self._cosignatures: dict[tuple[int, str], CosignatureRecord] = {}
        self._pruned_through = 0
        # The chain's head survives pruning even when every event is gone.
        self._head = (0, audit.GENESIS_HASH)
        self._tree: dict[NodeId, bytes] = {}
        self._frontier = Frontier(0, [])
        self._listeners: list[CommitListener] = []
        self._committed = threading.Condition(self._lock)

    def add_listener(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def commit(self, write: Write) -> Committed:
        with self._lock:
            run = self._check_and_apply(write.mutation) if write.mutation else None
            cascaded, cascade_events = [], []
            if isinstance(write.mutation, EndRun):
                for descendant in self._active_descendants(write.mutation.run_id):
                    ended, draft = descendant_end(write.mutation, descendant)
                    self._runs[ended.run_id] = ended
                    cascaded.append(ended)
                    cascade_events.append(draft)
            events = []
            for draft in [*write.events, *cascade_events]:
                event, body = audit.seal_with_record(draft, self._head[0] + 1, self._head[1])
                for level, index, digest in self._frontier.append(body):
                    self._tree[(level, index)] = digest
                self._events.append(event)
                self._head = (event.sequence, event.hash)
                events.append(event)
            committed = Committed(run, events, tuple(cascaded))
            for listener in self._listeners:
                listener(committed, write.mutation)
            if events:
                self._committed.notify_all()
            return committed

    def wait_for_events(self, after: int, timeout: float) -> int:
        with self._committed:
            self._committed.wait_for(lambda: self._head[0] > after, timeout=timeout)
            return self._head[0]

    def _check_and_apply(self, mutation: Mutation) -> Run | None:
        # Check every precondition before changing anything, so a Conflict writes nothing.
        match mutation:
            case CreateRun(run=run, idempotency=claim):
                if run.run_id in self._runs:
                    raise Conflict(f"run {run.run_id} exists")
                if run.parent_run_id:
                    parent = self._runs.get(run.parent_run_id)
                    if parent is None or not parent.is_active:
                        raise ParentNotActive(run.parent_run_id)
                    if parent.lapsed_at() <= run.create_time:
                        raise ParentNotActive(run.parent_run_id)
                if claim is not None:
                    taken = self._idempotency.get((claim.scope, claim.key))
                    if taken is not None:
                        raise IdempotencyKeyTaken(*taken)
                    self._idempotency[(claim.scope, claim.key)] = (run.run_id, claim.fingerprint)
                self._runs[run.run_id] = run
                return run
            case EndRun():
                current = self._active(mutation.run_id)
                ended = current.ended(
                    mutation.state, mutation.end_time, mutation.reason, mutation.ended_by
                )
                self._runs[mutation.run_id] = ended
                return ended
            case RenewLease():
                current = self._active(mutation.run_id)
                renewed = dataclasses.replace(current, lease_expire_time=mutation.lease_expire_time)
                self._runs[mutation.run_id] = renewed
                return renewed
            case PublishKey():
                activate = mutation.activate_time
                self._keys[mutation.kid] = PublicKeyRecord(
                    mutation.kid,
                    mutation.alg,
                    mutation.public_jwk,
                    mutation.create_time,
                    None,
                    mutation.create_time if activate is None else activate,
                )
                return None
            case RetireKey():
                for kid in mutation.kids:
                    key = self._keys.get(kid)
                    stop = key.stop_signing_time if key is not None else None
                    if key is not None and (stop is None or mutation.stop_signing_time < stop):
                        self._keys[kid] = dataclasses.replace(
                            key,
                            retire_time=mutation.retire_time,
                            stop_signing_time=mutation.stop_signing_time,
                        )
                return None
            case RecordCheckpoint(checkpoint=checkpoint):
                self._check_checkpoint(checkpoint)
                self._checkpoints.append(checkpoint)
                return None
            case PruneAudit(through=through):
                self._check_prune(through)
                self._pruned_through = through
                self._events = [e for e in self._events if e.sequence > through]
                return None
            case RecordProof():
                seen = self._proofs.get((mutation.jkt, mutation.jti))
                if seen is not None and seen >= mutation.now:
                    raise ProofReplayed(mutation.jti)
                if len(self._proofs) > PROOF_PRUNE_AT:
                    self._proofs = {k: v for k, v in self._proofs.items() if v >= mutation.now}
                self._proofs[(mutation.jkt, mutation.jti)] = mutation.expires
                return None
            case RecordCosignature(cosignature=c):
                self._cosignatures.setdefault((c.tree_size, c.witness), c)
                return None
            case ForgetIdempotencyKeys(ended_before=cutoff):
                self._idempotency = {
                    claim: taken
                    for claim, taken in self._idempotency.items()
                    if not self._ended_before(taken[0], cutoff)
                }
                return None
        raise TypeError(f"unknown mutation {mutation!r}")

    def _ended_before(self, run_id: str, cutoff: float) -> bool:
        run = self._runs.get(run_id)
        return run is not None and run.end_time is not None and run.end_time < cutoff

    def _check_checkpoint(self, checkpoint: CheckpointRecord) -> None:
        latest = self._checkpoints[-1].sequence if self._checkpoints else 0
        if latest != checkpoint.prev_sequence or checkpoint.sequence <= latest:
            raise CheckpointConflict(
                f"the newest checkpoint is at {latest}, not {checkpoint.prev_sequence}"
            )
        found = self.read_events(checkpoint.sequence - 1, 1)
        if (
            not found
            or found[0].sequence != checkpoint.sequence
            or found[0].hash != checkpoint.hash
        ):
            raise CheckpointConflict(f"event {checkpoint.sequence} does not have the claimed hash")

    def _check_prune(self, through: int) -> None:
        if through <= self._pruned_through:
            raise PruneConflict(f"events through {self._pruned_through} are already pruned")
        if all(c.sequence != through for c in self._checkpoints):
            raise PruneConflict(f"sequence {through} is not checkpointed")

    def _active_descendants(self, run_id: str) -> list[Run]:
        """Active runs below `run_id`, parents before children (through ended ones too)."""
        found: list[Run] = []
        frontier = [run_id]
        while frontier:
            below = sorted(
                (r for r in self._runs.values() if r.parent_run_id in frontier),
                key=lambda r: (r.create_time, r.run_id),
            )
            found.extend(r for r in below if r.is_active)
            frontier = [r.run_id for r in below]
        return found

    def _active(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRun(run_id)
        if not run.is_active:
            raise RunNotActive(run_id)
        return run

    def get_run(self, run_id: str) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def find_idempotent_run(self, scope: str, key: str) -> tuple[str, str] | None:
        with self._lock:
            return self._idempotency.get((scope, key))

    def list_runs(self, query: RunQuery) -> list[Run]:
        with self._lock:
            runs = [r for r in self._runs.values() if _matches(r, query)]
        runs.sort(key=lambda r: (r.create_time, r.run_id), reverse=True)
        return runs[: query.limit]

    def live_runs(self, ended_since: float) -> list[Run]:
        with self._lock:
            return [
                r
                for r in self._runs.values()
                if r.is_active or (r.end_time is not None and r.end_time >= ended_since)
            ]

    def read_events(self, after: int, limit: int) -> list[AuditEvent]:
        with self._lock:
            start = bisect_right(self._events, after, key=lambda e: e.sequence)
            return self._events[start : start + limit]

    def stream_events(self, after: int, limit: int) -> list[AuditEvent]:
        return self.read_events(after, limit)  # kept as events: nothing to decode

    def stored_events(self, after: int, limit: int) -> list[StoredEvent]:
        return [
            StoredEvent(e.sequence, audit.to_record(e.sequence, e.draft), e.prev_hash, e.hash)
            for e in self.read_events(after, limit)
        ]

    def head_sequence(self) -> int:
        with self._lock:
            return self._head[0]

    def oldest_sequence(self) -> int:
        with self._lock:
            return self._events[0].sequence if self._events else self._head[0] + 1

    def latest_checkpoint(self, at_most: int | None = None) -> CheckpointRecord | None:
        with self._lock:
            eligible = [c for c in self._checkpoints if at_most is None or c.sequence <= at_most]
            return eligible[-1] if eligible else None

    def checkpoints(self, after: int, limit: int) -> list[CheckpointRecord]:
        with self._lock:
            return [c for c in self._checkpoints if c.sequence > after][:limit]

    def pruned_through(self) -> int:
        with self._lock:
            return self._pruned_through

    def first_sequence_since(self, time: float) -> int | None:
        # Compare in integer microseconds, as the SQL backends do.
        bound = round(time * 1_000_000)
        with self._lock:
            found = [e.sequence for e in self._events if round(e.draft.time * 1_000_000) >= bound]
            return min(found, default=None)

    def tree_nodes(self, ids: Sequence[NodeId]) -> dict[NodeId, bytes]:
        with self._lock:
            return {i: self._tree[i] for i in ids if i in self._tree}

    def cosignatures(self, tree_size: int) -> list[CosignatureRecord]:
        with self._lock:
            kept = [c for (size, _), c in self._cosignatures.items() if size == tree_size]
        return sorted(kept, key=lambda c: c.witness)

    def tree_base(self) -> int:
        return 0

    def public_keys(self) -> list[PublicKeyRecord]:
        with self._lock:
            return sorted(self._keys.values(), key=lambda k: k.create_time, reverse=True)

    def close(self) -> None:
        pass


def _matches(run: Run, query: RunQuery) -> bool:
    if query.org and run.pipeline.org != query.org:
        return False
    if query.project and run.pipeline.project != query.project:
        return False
    if query.pipeline and run.pipeline.pipeline != query.pipeline:
        return False
    if query.state is not None:
        state = run.state if query.as_of is None else run.as_of(query.as_of).state
        if state is not query.state:
            return False
    return query.before is None or (run.create_time, run.run_id) < query.before
