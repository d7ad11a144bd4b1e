"""The store: one small interface, several backends.

Every change is a `Write`: at most one mutation plus the audit drafts that record it,
applied atomically — no change without its event, no event without its change. A mutation
whose precondition no longer holds (the run already ended, the idempotency key is taken)
raises `Conflict` and writes nothing.

Backends: `memory` (ephemeral, for tests) and `sqlite` (embedded default), each one module
opened by URL through `broker.store.factory` (`memory:`, `sqlite:PATH`). The interface is
shaped for a shared SQL database too: preconditions are conditional updates, sequences are
assigned inside the transaction, and readers page by sequence.

Opening refuses a store it must not touch (`StoreRefused`: newer schema, foreign file, lost
history, held by another broker, corrupt, read-only), leaving it exactly as it was.

May import: the value types it stores (broker.runs.model, .permissions, broker.audit.events)
and the shared value modules; nothing above them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

from broker.audit.events import Action, AuditDraft, AuditEvent, Outcome
from broker.runs.model import Run, RunState


@dataclass(frozen=True)
class IdempotencyClaim:
    """Reserve (scope, key) for the run being created; `fingerprint` identifies its parameters."""

    scope: str
    key: str
    fingerprint: str


@dataclass(frozen=True)
class CreateRun:
    """Create a run. A child run (`run.parent_run_id` set) is created only while its parent
    is active and not past its deadline or lease at the child's `create_time`, checked in the
    same transaction (`ParentNotActive` otherwise): a child never outlives a parent that
    ended first, and one created first is found by the parent's `EndRun`."""

    run: Run
    idempotency: IdempotencyClaim | None = None


@dataclass(frozen=True)
class EndRun:
    """End an active run (state ENDED or EXPIRED). Conflict if it is no longer active.

    Every active descendant (the child runs started with its credential, theirs, ...) ends
    in the same transaction, in the same state, each with its own audit event: a copy of
    `descendant_event` located on that run (see `descendant_end`), sealed after the write's
    own events. `Committed.cascaded` lists them.
    """

    run_id: str
    state: RunState
    end_time: float
    reason: str
    ended_by: str
    descendant_event: AuditDraft | None = None


def descendant_end(end: EndRun, run: Run) -> tuple[Run, AuditDraft]:
    """The run `end` ends along with its ancestor, and the event that records it."""
    reason = f"ancestor run {end.run_id} {end.state.value}: {end.reason}"[:512]
    ended = run.ended(end.state, end.end_time, reason, end.ended_by)
    template = end.descendant_event or AuditDraft(
        time=end.end_time,
        action=Action.RUN_ENDED if end.state is RunState.ENDED else Action.RUN_EXPIRED,
        outcome=Outcome.SUCCESS,
        principal=end.ended_by,
    )
    details = {**template.details, "reason": reason, "ended_with": end.run_id}
    event = replace(
        template,
        run_id=run.run_id,
        pipeline=run.pipeline,
        on_behalf_of=run.on_behalf_of,
        details=MappingProxyType(details),
    )
    return ended, event


@dataclass(frozen=True)
class RenewLease:
    """Move an active run's lease expiry. Conflict if it is no longer active."""

    run_id: str
    lease_expire_time: float


@dataclass(frozen=True)
class PublishKey:
    """Publish a signing key's public half (JWK), so every replica's JWKS includes it.

    The key may sign from `activate_time` (None: at once, from `create_time`): a rotated-in
    key is published first, so that verifiers' cached JWKS hold it before it signs."""

    kid: str
    alg: str
    public_jwk: str
    create_time: float
    activate_time: float | None = None


@dataclass(frozen=True)
class RetireKey:
    """Schedule keys to stop signing at `stop_signing_time` and to leave the JWKS at
    `retire_time`, all in one transaction (replicas never see a rotation half done). Times
    only ever move earlier: a key already scheduled changes only if this stops it sooner (an
    emergency after a normal rotation); otherwise it is left as it is."""

    kids: tuple[str, ...]
    retire_time: float
    stop_signing_time: float


@dataclass(frozen=True)
class CheckpointRecord:
    """A signed statement that the chain's event `sequence` has `hash` (see broker.checkpoints).

    `prev_sequence` is the checkpoint before it (0 for the first), so that checkpoints form a
    chain of their own and a deleted one shows. `jws` is authoritative; the other columns are
    what it claims, kept for queries.
    """

    sequence: int
    hash: str
    time: float
    kid: str
    jws: str
    prev_sequence: int


@dataclass(frozen=True)
class RecordCheckpoint:
    """Store a checkpoint. Conflict (nothing written) unless event `sequence` exists with that
    hash and the newest stored checkpoint is `prev_sequence`: replicas racing to checkpoint
    never fork the checkpoint chain; the loser simply skips."""

    checkpoint: CheckpointRecord


@dataclass(frozen=True)
class PruneAudit:
    """Retention: raise `pruned_through` to `through`, then delete every event up to it.

    Conflict unless a checkpoint exists at `through` and `through` lies beyond what is already
    pruned, so only whole, checkpointed ranges go and the retained chain stays verifiable from
    that checkpoint's hash.
    """

    through: int


@dataclass(frozen=True)
class ForgetIdempotencyKeys:
    """Retention: forget the idempotency keys of runs that ended before `ended_before`; a
    retry with such a key starts a new run. Keys of active runs are always kept."""

    ended_before: float


@dataclass(frozen=True)
class RecordProof:
    """Remember a DPoP proof (RFC 9449 §11.1): its key's thumbprint and `jti` until `expires`.
    `ProofReplayed` (nothing written) when the pair is already remembered and unexpired, so
    a proof is accepted once across every process and replica sharing the store. Entries
    expired at `now` are deleted in the same transaction (a few per write, so the table
    holds about the proofs of the last two minutes)."""

    jkt: str
    jti: str
    expires: float
    now: float


@dataclass(frozen=True)
class CosignatureRecord:
    """A witness's accepted cosignature of the signed tree head for `tree_size` leaves with
    root `root`: its C2SP signature line, by the witness whose verifier key is `witness`."""

    tree_size: int
    root: bytes
    witness: str
    line: str


@dataclass(frozen=True)
class RecordCosignature:
    """Keep a witness's cosignature; a second one by the same witness for the same tree size
    is ignored (the first stands: both say the same thing)."""

    cosignature: CosignatureRecord


Mutation = (
    CreateRun
    | EndRun
    | RenewLease
    | PublishKey
    | RetireKey
    | RecordCheckpoint
    | PruneAudit
    | ForgetIdempotencyKeys
    | RecordProof
    | RecordCosignature
)


@dataclass(frozen=True)
class Write:
    events: Sequence[AuditDraft]
    mutation: Mutation | None = None


@dataclass(frozen=True)
class Committed:
    """What a write became: the run it created or changed (if any), the descendants an
    `EndRun` ended with it, and its sealed events."""

    run: Run | None
    events: Sequence[AuditEvent]
    cascaded: Sequence[Run] = ()


class Conflict(Exception):
    """A mutation's precondition failed inside the transaction; nothing was written."""


class RunNotActive(Conflict):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} is not active")
        self.run_id = run_id


class UnknownRun(Conflict):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} does not exist")
        self.run_id = run_id


class ParentNotActive(Conflict):
    """A child run's parent has ended, or is past its deadline or lease."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"parent run {run_id} is not active")
        self.run_id = run_id


class IdempotencyKeyTaken(Conflict):
    def __init__(self, run_id: str, fingerprint: str) -> None:
        super().__init__(f"idempotency key already used for run {run_id}")
        self.run_id = run_id
        self.fingerprint = fingerprint


class ProofReplayed(Conflict):
    """A DPoP proof (key and jti) was presented before."""


class CheckpointConflict(Conflict):
    """Another checkpoint was stored first, or the claimed event does not match the chain."""


class PruneConflict(Conflict):
    """The range is already pruned, or its end is not a checkpointed sequence."""


class StoreUnavailable(Exception):
    """The backend refused or failed the write (read-only file, disk full, I/O error)."""


class StoreRefused(Exception):
    """The store must not be opened: serving from it could lose or corrupt data.

    Nothing was changed. The message is one line naming the store and why, fit to print
    as it is; each case below is a subclass so that callers and tests can tell them apart.
    """


class StoreUrlInvalid(StoreRefused, ValueError):
    """The store URL names no known backend, or is malformed for its backend."""


class NewerSchema(StoreRefused):
    """The store's schema is newer than this broker knows (written by a newer broker)."""


class ForeignStore(StoreRefused):
    """The file is a database of another application, not a token-broker store."""


class HistoryMissing(StoreRefused):
    """The data dir held a store before, but its database is missing or empty."""


class StoreInUse(StoreRefused):
    """Another process holds the store (another broker on the same data dir)."""


class StoreNotFound(StoreRefused):
    """There is no store to read where an offline tool was pointed."""


class CorruptStore(StoreRefused):
    """The database cannot be read as a database."""


class ReadOnlyStore(StoreRefused):
    """The database or its directory cannot be written."""


@dataclass(frozen=True)
class RunQuery:
    org: str = ""
    project: str = ""
    pipeline: str = ""
    state: RunState | None = None
    limit: int = 50
    # Filter by state as it stands at this time: an active run past its deadline or lease
    # counts as EXPIRED (Run.as_of), whether or not its expiry is recorded yet.
    as_of: float | None = None
    # Keyset cursor: runs strictly older than (create_time, run_id).
    before: tuple[float, str] | None = None


@dataclass(frozen=True)
class PublicKeyRecord:
    """A published key's schedule: in the JWKS from `create_time` until `retire_time`
    (None: not scheduled), signing from `activate_time` until `stop_signing_time`."""

    kid: str
    alg: str
    public_jwk: str
    create_time: float
    retire_time: float | None
    activate_time: float
    stop_signing_time: float | None = None

    def published_at(self, now: float) -> bool:
        return self.retire_time is None or self.retire_time > now

    def signs_at(self, now: float) -> bool:
        """Whether the key is scheduled to sign at `now` (activated, not yet stopped)."""
        stopped = self.stop_signing_time is not None and self.stop_signing_time <= now
        return self.activate_time <= now and not stopped and self.published_at(now)


@dataclass(frozen=True)
class StoredEvent:
    """An audit row exactly as stored, for chain verification and export."""

    sequence: int
    record: dict[str, Any]
    prev_hash: str
    hash: str


CommitListener = Callable[[Committed, Mutation | None], None]


class Store(Protocol):
    """The durable truth. Thread-safe; every method may be called from any thread."""

    def commit(self, write: Write) -> Committed:
        """Apply the write atomically and durably; call listeners in commit order, then return.

        Raises `Conflict` (nothing written) or `StoreUnavailable`.
        """
        ...

    def add_listener(self, listener: CommitListener) -> None:
        """Call `listener` after each commit, in commit order, before the writer returns."""
        ...

    def wait_for_events(self, after: int, timeout: float) -> int:
        """Block until an event with sequence > `after` is committed — by this process or,
        for a shared store, by any other — or `timeout` passes; return the newest sequence
        known. May return early; callers read by sequence afterwards either way."""
        ...

    def get_run(self, run_id: str) -> Run | None: ...

    def find_idempotent_run(self, scope: str, key: str) -> tuple[str, str] | None:
        """(run_id, fingerprint) reserved by an earlier CreateRun with this claim."""
        ...

    def list_runs(self, query: RunQuery) -> list[Run]:
        """Runs matching the query, newest first."""
        ...

    def live_runs(self, ended_since: float) -> list[Run]:
        """Active runs, and runs that ended at or after `ended_since` (their tokens may live)."""
        ...

    def read_events(self, after: int, limit: int) -> list[AuditEvent]:
        """Events with sequence > after, in order, at most `limit`."""
        ...

    def stream_events(self, after: int, limit: int) -> list[AuditEvent]:
        """As `read_events`, for sending: events whose drafts may be rebuilt from their
        records only when first used (`RecordedEvent`), so that what is only encoded from
        its record is never decoded twice."""
        ...

    def stored_events(self, after: int, limit: int) -> list[StoredEvent]:
        """Raw rows with sequence > after, for verification."""
        ...

    def head_sequence(self) -> int:
        """Sequence of the newest event (0 when empty)."""
        ...

    def oldest_sequence(self) -> int:
        """Sequence of the oldest retained event (head + 1 when empty)."""
        ...

    def public_keys(self) -> list[PublicKeyRecord]: ...

    def latest_checkpoint(self, at_most: int | None = None) -> CheckpointRecord | None:
        """The newest checkpoint (with sequence <= `at_most` when given)."""
        ...

    def checkpoints(self, after: int, limit: int) -> list[CheckpointRecord]:
        """Checkpoints with sequence > after, oldest first, at most `limit`."""
        ...

    def pruned_through(self) -> int:
        """Every event up to this sequence was deleted by retention (0: nothing pruned)."""
        ...

    def first_sequence_since(self, time: float) -> int | None:
        """The smallest sequence of a retained event with time >= `time` (None if none)."""
        ...

    def tree_nodes(self, ids: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The stored Merkle tree nodes among `ids` ((level, index) of full subtrees; see
        broker.audit.merkle); absent ids are left out."""
        ...

    def cosignatures(self, tree_size: int) -> list[CosignatureRecord]:
        """The witnesses' cosignatures kept for the tree head of `tree_size` leaves."""
        ...

    def tree_base(self) -> int:
        """Leaf i of the tree is the event with sequence tree_base + i + 1 (0 unless events
        were pruned before the store had a tree)."""
        ...

    def close(self) -> None: ...


def all_stored_events(store: Store, after: int = 0, page: int = 2000) -> Iterator[StoredEvent]:
    """Every stored event with sequence > after, in order, read page by page."""
    while True:
        rows = store.stored_events(after, page)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].sequence


def all_checkpoints(store: Store, after: int = -1, page: int = 2000) -> list[CheckpointRecord]:
    """Every checkpoint with sequence > after, oldest first."""
    found: list[CheckpointRecord] = []
    while True:
        rows = store.checkpoints(after, page)
        found.extend(rows)
        if len(rows) < page:
            return found
        after = rows[-1].sequence
