"""Audit events: every decision the broker makes, as an append-only hash chain.

A draft becomes an event when the store seals it inside the transaction that makes the
change it records: the store assigns the next sequence and computes

    hash = SHA-256(prev_hash || canonical_bytes(event))

so that editing, deleting, inserting or reordering any stored row breaks the chain at
that row.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from broker.context import CallContext
from broker.identity import Person
from broker.runs.model import PipelineRef, Run

GENESIS_HASH = "0" * 64


class Outcome(enum.Enum):
    SUCCESS = "success"
    DENIED = "denied"
    FAILURE = "failure"


class Action:
    """Action names. Stored and streamed; add new ones, never rename."""

    RUN_STARTED = "run.started"
    RUN_EXECUTED_ON_BEHALF = "run.executed_on_behalf"
    RUN_REFUSED = "run.refused"
    RUN_RENEWED = "run.renewed"
    RUN_ENDED = "run.ended"
    RUN_EXPIRED = "run.expired"
    TOKEN_ISSUED = "token.issued"
    TOKEN_REFUSED = "token.refused"
    TOKEN_VERIFY_FAILED = "token.verify_failed"
    AUTHN_DENIED = "authn.denied"
    AUTHZ_DENIED = "authz.denied"
    CALL_THROTTLED = "call.throttled"
    KEY_CREATED = "key.created"
    KEY_ROTATED = "key.rotated"
    KEY_RETIRED = "key.retired"
    # A rotation that skipped pre-publishing: the new key signed at once, the old stopped.
    KEY_ROTATED_EMERGENCY = "key.rotated_emergency"
    POLICY_LOADED = "policy.loaded"
    POLICY_RELOAD_FAILED = "policy.reload_failed"
    AUDIT_PRUNED = "audit.pruned"
    IDEMPOTENCY_FORGOTTEN = "idempotency.forgotten"
    # A witness cosignature POSTed to the broker that it did not keep (broker.audit.quorum).
    COSIGNATURE_REFUSED = "audit.cosignature_refused"


@dataclass(frozen=True)
class AuditDraft:
    """What happened, before the store gives it a place in the chain."""

    time: float
    action: str
    outcome: Outcome
    principal: str = ""
    on_behalf_of: Person | None = None
    run_id: str = ""
    pipeline: PipelineRef | None = None
    trace_id: str = ""
    request_id: str = ""
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class AuditEvent:
    """A sealed event: a draft with its sequence and chain hashes."""

    sequence: int
    draft: AuditDraft
    prev_hash: str
    hash: str


def draft(
    ctx: CallContext,
    now: float,
    action: str,
    outcome: Outcome,
    run: Run | None = None,
    details: Mapping[str, Any] | None = None,
) -> AuditDraft:
    """A draft stamped with the call's principal and correlation ids, located on `run`."""
    return AuditDraft(
        time=now,
        action=action,
        outcome=outcome,
        principal=ctx.principal.name,
        on_behalf_of=None if run is None else run.on_behalf_of,
        run_id="" if run is None else run.run_id,
        pipeline=None if run is None else run.pipeline,
        trace_id=ctx.trace_id,
        request_id=ctx.request_id,
        details=MappingProxyType(dict(details or {})),
    )


def time_us(time: float) -> int:
    """An event time as stored and hashed: integer microseconds."""
    return round(time * 1_000_000)


def to_record(sequence: int, draft: AuditDraft) -> dict[str, Any]:
    """The event as a JSON-ready dict; the canonical form hashed and exported."""
    pipeline = draft.pipeline
    return {
        "sequence": sequence,
        # Integer microseconds: floats must not reach the hash (their text form varies).
        "time_us": time_us(draft.time),
        "action": draft.action,
        "outcome": draft.outcome.value,
        "principal": draft.principal,
        "on_behalf_of": None if draft.on_behalf_of is None else draft.on_behalf_of.as_record(),
        "run_id": draft.run_id,
        "pipeline": None
        if pipeline is None
        else {"org": pipeline.org, "project": pipeline.project, "pipeline": pipeline.pipeline},
        "trace_id": draft.trace_id,
        "request_id": draft.request_id,
        "details": dict(draft.details),
    }


def _not_json(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _canonical_encoder() -> Callable[[Mapping[str, Any]], str]:
    """`json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`, with
    the C encoder built once: `dumps` builds a `JSONEncoder` and a C encoder per call, about
    a third of an event's encoding on the write path. The same bytes (the same C encoder,
    the same options); a record is never circular, so the C encoder need not check for it."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator
        return lambda record: json.dumps(
            record, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    encode: Callable[[object, int], Iterator[str]] = make(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", True, False, True
    )
    return lambda record: "".join(encode(record, 0))


_canonical = _canonical_encoder()


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """Deterministic bytes of a record: sorted keys, no spaces, UTF-8 (RFC 8785 for our types)."""
    return _canonical(record).encode()


def chain_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    return _link(prev_hash, canonical_bytes(record))


def _link(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


def seal(draft: AuditDraft, sequence: int, prev_hash: str) -> AuditEvent:
    return seal_with_record(draft, sequence, prev_hash)[0]


def seal_with_record(draft: AuditDraft, sequence: int, prev_hash: str) -> tuple[AuditEvent, bytes]:
    """The sealed event and the canonical bytes its hash covers (what a store keeps), encoded
    once: on the write path the JSON encoding is a large part of an event's cost."""
    body = canonical_bytes(to_record(sequence, draft))
    return AuditEvent(sequence, draft, prev_hash, _link(prev_hash, body)), body


_OUTCOMES = {outcome.value: outcome for outcome in Outcome}
# Pipelines read back, by their three names: a log names few pipelines over and over, and
# reading (catch-up streams, the change feed) rebuilds one per event. Bounded.
_pipelines: dict[tuple[tuple[str, Any], ...], PipelineRef] = {}


def _pipeline_of(record: Mapping[str, Any]) -> PipelineRef:
    if not all(type(name) is str for name in record.values()):
        return PipelineRef(**record)  # as it always did, malformed or not
    key = tuple(record.items())
    known = _pipelines.get(key)
    if known is None:
        known = PipelineRef(**record)  # raises for a malformed record, as it always did
        if len(_pipelines) >= 4096:
            _pipelines.clear()
        _pipelines[key] = known
    return known


def _outcome_of(value: Any) -> Outcome:
    try:
        return _OUTCOMES[value]
    except (KeyError, TypeError):
        return Outcome(value)  # raises for a value that is none


def from_record(record: Mapping[str, Any]) -> AuditDraft:
    """Rebuild a draft from its canonical record (the inverse of `to_record`)."""
    person = record.get("on_behalf_of")
    pipeline = record.get("pipeline")
    return AuditDraft(
        time=record["time_us"] / 1_000_000,
        action=record["action"],
        outcome=_outcome_of(record["outcome"]),
        principal=record["principal"],
        on_behalf_of=None if person is None else Person.from_record(person),
        run_id=record["run_id"],
        pipeline=None if pipeline is None else _pipeline_of(pipeline),
        trace_id=record["trace_id"],
        request_id=record["request_id"],
        details=MappingProxyType(dict(record["details"])),
    )


class RecordedEvent(AuditEvent):
    """An event read back from its stored record, whose draft is rebuilt only when first used:
    StreamAudit's catch-up encodes most events straight from the record
    (`broker.api.eventwire`), so following the log unfiltered never builds one. Equal to the
    `AuditEvent` of the same sequence, draft and hashes."""

    def __init__(self, record: Mapping[str, Any], prev_hash: str, hash_: str) -> None:
        object.__setattr__(self, "sequence", record["sequence"])
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "prev_hash", prev_hash)
        object.__setattr__(self, "hash", hash_)

    record: Mapping[str, Any]

    @functools.cached_property
    def draft(self) -> AuditDraft:  # the field, computed when first read
        return from_record(self.record)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuditEvent):
            return NotImplemented
        mine = (self.sequence, self.draft, self.prev_hash, self.hash)
        return mine == (other.sequence, other.draft, other.prev_hash, other.hash)

    __hash__ = AuditEvent.__hash__


@dataclass(frozen=True)
class ChainBreak:
    """The first place a stored chain stops verifying."""

    sequence: int
    problem: str


class ChainWalker:
    """Re-walks stored rows one at a time, in order; remembers the first break.

    `start_prev_hash` is the hash the first row must link to (GENESIS for a full log, the
    checkpoint hash at the boundary for a log pruned by retention, None to take the first
    row's link as given); `start_sequence` the sequence the first row must have (None: any).
    """

    def __init__(self, start_prev_hash: str | None, start_sequence: int | None = None) -> None:
        self.expected_sequence = start_sequence
        self.expected_prev = start_prev_hash
        self.last_sequence: int | None = None
        self.broken: ChainBreak | None = None

    def step(
        self, sequence: int, record: Mapping[str, Any], prev_hash: str, stored_hash: str
    ) -> ChainBreak | None:
        """Check the next row; the break it reveals (once broken, stays broken)."""
        if self.broken is None:
            self.broken = self._check(sequence, record, prev_hash, stored_hash)
            if self.broken is None:
                self.expected_sequence = sequence + 1
                self.expected_prev = stored_hash
                self.last_sequence = sequence
        return self.broken

    def _check(
        self, sequence: int, record: Mapping[str, Any], prev_hash: str, stored_hash: str
    ) -> ChainBreak | None:
        expected = self.expected_sequence
        if expected is not None and sequence > expected + 1:
            return ChainBreak(
                expected, f"sequences {expected}..{sequence - 1} missing (found {sequence})"
            )
        if expected is not None and sequence != expected:
            return ChainBreak(expected, f"sequence {expected} missing (found {sequence})")
        if not record:
            return ChainBreak(sequence, "record is empty or unreadable")
        if record.get("sequence") != sequence:
            return ChainBreak(sequence, "row sequence differs from the sealed sequence")
        if self.expected_prev is not None and prev_hash != self.expected_prev:
            return ChainBreak(sequence, "prev_hash does not link to the previous event")
        try:
            computed = chain_hash(prev_hash, record)
        except (ValueError, TypeError):
            return ChainBreak(sequence, "row is malformed (hash or record unreadable)")
        if computed != stored_hash:
            return ChainBreak(sequence, "content does not match its hash")
        return None


def verify_chain(
    rows: Iterable[tuple[int, Mapping[str, Any], str, str]],
    *,
    start_prev_hash: str | None = None,
) -> ChainBreak | None:
    """Re-walk (sequence, record, prev_hash, hash) rows in order; None when intact.

    `start_prev_hash` is the hash the first row must link to (GENESIS for a full log, the
    checkpoint hash for a log whose head was pruned by retention).
    """
    walker = ChainWalker(start_prev_hash)
    for row in rows:
        if walker.step(*row) is not None:
            return walker.broken
    return None
