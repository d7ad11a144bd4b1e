"""Following the audit log: replay from a cursor, then live, with no gap and no duplicate.

A subscriber first catches up by reading the log by sequence, page by page (from the change
feed's memory of recent events, else from the store). Once it has read everything the change
feed has handed out, it joins the *live* subscribers: the change feed's thread reads each new
page once, and hands every live subscriber the events its filter matches (decoded once, shared
by all; the transport encodes each once too). A live subscriber thus costs a filter check per
event and one wake-up per page, not a read and a decode.

A live subscriber that cannot keep up (its stream is not read fast enough) does not slow the
others or the writers: once `max_backlog` events wait for it, it is dropped with UNAVAILABLE
naming the sequence to resume after — resuming catches up from the store in pages, then joins
the live subscribers again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from broker.audit.events import Action, AuditDraft, AuditEvent
from broker.auth.authz import Authorizer, Op
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import DataLoss, OutOfRange, ResourceExhausted, Unavailable
from broker.runs.model import PipelineRef, Run
from broker.store import Store
from broker.store.changes import ChangeFeed
from broker.telemetry.observer import NULL_OBSERVER, Observer

PAGE_SIZE = 500
RUN_ENDINGS = frozenset({Action.RUN_ENDED, Action.RUN_EXPIRED})
# Events that may wait for one live subscriber before it is dropped (references to events
# shared by all subscribers: ~10k is a few seconds of a busy broker, a little memory).
MAX_BACKLOG = 10_000
# A live subscriber sends at most one message per this long: what commits meanwhile goes out
# in the next one. Sending is the cost of fan-out (~60 µs of broker CPU per message on the
# sync server), so under load 64 subscribers cost 64 messages per interval, not per commit.
LIVE_INTERVAL = 0.015


@dataclass(frozen=True)
class AuditFilter:
    """Empty fields match everything; set fields must all match."""

    run_id: str = ""
    principal: str = ""
    person: str = ""
    actions: frozenset[str] = frozenset()
    org: str = ""
    project: str = ""

    def matches(self, event: AuditEvent) -> bool:
        d = event.draft
        if self.run_id and d.run_id != self.run_id:
            return False
        if self.principal and d.principal != self.principal:
            return False
        if self.actions and d.action not in self.actions:
            return False
        if self.person:
            p = d.on_behalf_of
            if p is None or self.person not in (p.subject, p.email):
                return False
        if self.org or self.project:
            ref = d.pipeline
            if ref is None:
                return False
            if self.org and ref.org != self.org:
                return False
            if self.project and ref.project != self.project:
                return False
        return True

    def select(self, events: Iterable[AuditEvent]) -> list[AuditEvent]:
        """The events this filter matches, in order."""
        if self == _EVERYTHING:
            return list(events)
        return [event for event in events if self.matches(event)]

    @property
    def run_endings_only(self) -> bool:
        """Asks for run endings and nothing about people: what a verifier may follow.
        (A person or principal filter would tell whose runs ended: that is reading the log.)"""
        about_people = self.person or self.principal
        return bool(self.actions) and self.actions <= RUN_ENDINGS and not about_people


_EVERYTHING = AuditFilter()


def run_ending_view(event: AuditEvent) -> AuditEvent:
    """What a verifier sees of an event: which run ended, how and when — not who ended it,
    for whom it ran, the reason given, the call's ids, nor the chain hashes (which would
    let a guess about the withheld fields be confirmed)."""
    d = event.draft
    kept = AuditDraft(
        time=d.time, action=d.action, outcome=d.outcome, run_id=d.run_id, pipeline=d.pipeline
    )
    return AuditEvent(sequence=event.sequence, draft=kept, prev_hash="", hash="")


class _Live:
    """A live subscriber: what the change feed's thread handed it and it has not taken."""

    __slots__ = ("cursor", "dropped", "filter", "pending", "scanned", "wake")

    def __init__(self, cursor: int, event_filter: AuditFilter) -> None:
        self.filter = event_filter
        self.cursor = cursor  # every event up to here was considered for it
        self.scanned = cursor
        self.pending: list[AuditEvent] = []
        self.dropped = 0  # the backlog it was dropped at (0: not dropped)
        self.wake = threading.Event()


@dataclass(frozen=True)
class Heartbeat:
    """Every event up to `scanned_through` has been considered for this subscriber."""

    scanned_through: int
    time: float


class AuditFeed:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        authorizer: Authorizer,
        find_run: Callable[[str], Run | None],
        observer: Observer = NULL_OBSERVER,
        max_subscribers: int = 32,
        max_per_principal: int = 4,
        changes: ChangeFeed | None = None,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self._store = store
        self._observer = observer
        # Each stream holds a server worker thread while it follows: cap them, so that
        # subscribers can never take every worker from the writers.
        self._max_subscribers = max_subscribers
        # ... and per principal, so that one auditor cannot hold every slot.
        self._max_per_principal = max_per_principal
        self._per_principal: dict[str, int] = {}
        self._clock = clock
        self._authz = authorizer
        self._find_run = find_run
        # What is committed, by this process or any replica, is learned from the change feed.
        self._changes = changes if changes is not None else ChangeFeed(store)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._subscribers = 0
        self._max_backlog = max_backlog
        self._live: list[_Live] = []
        self._live_lock = threading.Lock()
        # The last sequence handed to live subscribers: one who has read this far may join.
        self._dispatched = self._changes.cursor
        self._changes.subscribe(pages=self._on_page)

    @property
    def subscribers(self) -> int:
        return self._subscribers

    @property
    def head(self) -> int:
        return self._changes.head

    def close(self) -> None:
        """End every follower (shutdown)."""
        self._closed.set()
        self._changes.wake()
        with self._live_lock:
            for live in self._live:
                live.wake.set()

    @property
    def live_subscribers(self) -> int:
        return len(self._live)

    def _on_page(self, page: Sequence[AuditEvent]) -> None:
        """On the change feed's thread: hand each live subscriber what its filter matches.
        Subscribers with equal filters (most follow everything) share one evaluation."""
        first, last = page[0].sequence, page[-1].sequence
        shared: dict[AuditFilter, list[AuditEvent]] = {}
        with self._live_lock:
            self._dispatched = last
            for live in self._live:
                if live.dropped:
                    continue
                if live.cursor < first:  # the whole page is new to it: as to its peers
                    matched = shared.get(live.filter)
                    if matched is None:
                        matched = shared[live.filter] = live.filter.select(page)
                else:
                    matched = live.filter.select(e for e in page if e.sequence > live.cursor)
                live.cursor = max(live.cursor, last)
                if not matched:
                    continue
                live.pending.extend(matched)
                if len(live.pending) > self._max_backlog:
                    live.dropped = len(live.pending)
                    live.pending = []  # it resumes from the store; keep nothing for it
                live.wake.set()

    def follow(
        self,
        ctx: CallContext,
        after: int,
        event_filter: AuditFilter,
        *,
        stop_at_head: bool = False,
        heartbeat_every: float = 5.0,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Generator[AuditEvent | Heartbeat]:
        """Events after `after` matching the filter, then live ones. close() ends every
        follower with Unavailable (naming the sequence to resume after)."""
        for item in self.follow_pages(
            ctx,
            after,
            event_filter,
            stop_at_head=stop_at_head,
            heartbeat_every=heartbeat_every,
            cancelled=cancelled,
        ):
            if isinstance(item, Heartbeat):
                yield item
            else:
                yield from item

    def follow_pages(
        self,
        ctx: CallContext,
        after: int,
        event_filter: AuditFilter,
        *,
        stop_at_head: bool = False,
        heartbeat_every: float = 5.0,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Generator[list[AuditEvent] | Heartbeat]:
        """As `follow`, but the matching events of each page read from the store come
        together, never empty: catching up costs one hand-off per page, not per event.

        A caller who may not read the log but may follow run endings (role verifier) gets
        them, when that is all it asks for, as `run_ending_view`s."""
        run = self._find_run(event_filter.run_id) if event_filter.run_id else None
        # Events the filter may let through; "*" where it does not filter.
        selection = PipelineRef(event_filter.org or "*", event_filter.project or "*", "*")
        if run is not None:
            selection = run.pipeline
        redact = False
        if event_filter.run_endings_only and not self._authz.allows(
            ctx, Op.READ_AUDIT, pipeline=selection, run=run
        ):
            self._authz.require(ctx, Op.FOLLOW_RUN_ENDINGS, pipeline=selection, run=run)
            redact = True
        else:
            self._authz.require(ctx, Op.READ_AUDIT, pipeline=selection, run=run)
        if run is not None:
            self._observer.call_touched_run(run)
        oldest = self._store.oldest_sequence()
        if after == 0:
            after = oldest - 1  # 0 means "from the oldest retained event" (the contract)
        if after < oldest - 1:
            raise _pruned(after, oldest)
        head = self._store.head_sequence()
        if after > head:
            raise OutOfRange(
                f"after_sequence {after} is beyond the newest event ({head}); "
                "was the cursor taken from another broker?"
            )
        who = ctx.principal.name
        self._subscribe(who)
        try:
            pages = self._follow_pages(
                after, event_filter, stop_at_head, heartbeat_every, cancelled
            )
            if not redact:
                yield from pages
            else:
                for item in pages:
                    if isinstance(item, Heartbeat):
                        yield item
                    else:
                        yield [run_ending_view(event) for event in item]
        finally:
            with self._lock:
                self._subscribers -= 1
                self._per_principal[who] -= 1
                if not self._per_principal[who]:
                    del self._per_principal[who]

    def _subscribe(self, who: str) -> None:
        with self._lock:
            if self._per_principal.get(who, 0) >= self._max_per_principal:
                raise ResourceExhausted(
                    f"{who} already has {self._max_per_principal} audit streams open, the limit "
                    "per principal; close one (or resume it) before opening another",
                    retry_after=1.0,
                )
            if self._subscribers >= self._max_subscribers:
                raise Unavailable(
                    f"this broker already serves {self._subscribers} audit streams, its limit; "
                    "retry later or resume from another replica"
                )
            self._subscribers += 1
            self._per_principal[who] = self._per_principal.get(who, 0) + 1

    def _follow_pages(
        self,
        cursor: int,
        event_filter: AuditFilter,
        stop_at_head: bool,
        heartbeat_every: float,
        cancelled: Callable[[], bool],
    ) -> Iterator[list[AuditEvent] | Heartbeat]:
        last_beat = self._clock()
        while not self._closed.is_set() and not cancelled():
            # Live subscribers read what the change feed already decoded, shared by all. The
            # feed's memory may lag the store: only a short read *from the store* means the
            # subscriber has caught up with the log.
            remembered = self._changes.recent(cursor, PAGE_SIZE)
            page = remembered or self._store.stream_events(cursor, PAGE_SIZE)
            for event in page:
                if event.sequence != cursor + 1:  # sequences are gapless: never skip one
                    self._gap(cursor, event.sequence)
                cursor = event.sequence
            matching = event_filter.select(page)
            if matching:
                self._observer.audit_delivered(self._changes.head - matching[-1].sequence)
                yield matching
            if len(page) == PAGE_SIZE or remembered:
                continue
            if stop_at_head:
                return
            if self._changes.running:
                live = self._join_live(cursor, event_filter)
                if live is not None:
                    yield from self._follow_live(live, heartbeat_every, cancelled)
                    return
                continue  # the feed handed out more meanwhile: read on, then join
            if self._clock() - last_beat >= heartbeat_every:
                last_beat = self._clock()
                yield Heartbeat(cursor, last_beat)
            self._wait_beyond(cursor, timeout=min(0.5, heartbeat_every))
        if self._closed.is_set() and not cancelled():
            # Not the end of the log: the broker is stopping. Say so, so the subscriber
            # resumes (from another replica or after the restart) instead of taking it as done.
            raise Unavailable(f"the broker is shutting down; resume with after_sequence={cursor}")

    def _join_live(self, cursor: int, event_filter: AuditFilter) -> _Live | None:
        with self._live_lock:
            if cursor < self._dispatched:
                return None
            live = _Live(cursor, event_filter)
            self._live.append(live)
            return live

    def _follow_live(
        self, live: _Live, heartbeat_every: float, cancelled: Callable[[], bool]
    ) -> Iterator[list[AuditEvent] | Heartbeat]:
        # Where a resumed stream may start: nothing after it was delivered.
        delivered = live.cursor
        last_beat = self._clock()
        sent = 0.0
        try:
            while not self._closed.is_set() and not cancelled():
                # At most one message per LIVE_INTERVAL; the rest of it is slept on this
                # thread's own timer (not a lock every stream shares), and what was handed
                # out meanwhile is taken then: under load a stream wakes once per message,
                # not once per page the change feed hands out.
                since = time.monotonic() - sent
                if since < LIVE_INTERVAL:
                    time.sleep(LIVE_INTERVAL - since)
                with self._live_lock:
                    batch, live.pending = live.pending, []
                    dropped, scanned = live.dropped, live.cursor
                    if not batch:
                        live.wake.clear()  # under the lock: the next page handed out sets it
                if dropped:
                    raise Unavailable(
                        f"this stream fell {dropped} events behind the live log (the limit is "
                        f"{self._max_backlog}): it is read too slowly; resume with "
                        f"after_sequence={delivered}"
                    )
                if batch:
                    self._observer.audit_delivered(self._changes.head - batch[-1].sequence)
                    delivered = batch[-1].sequence
                    sent = time.monotonic()
                    yield batch
                    continue
                if self._clock() - last_beat >= heartbeat_every:
                    last_beat = self._clock()
                    delivered = max(delivered, scanned)
                    yield Heartbeat(scanned, last_beat)
                live.wake.wait(timeout=min(0.5, heartbeat_every))  # idle: the next page wakes it
            if self._closed.is_set() and not cancelled():
                raise Unavailable(
                    f"the broker is shutting down; resume with after_sequence={delivered}"
                )
        finally:
            with self._live_lock:
                self._live.remove(live)

    def _gap(self, cursor: int, found: int) -> NoReturn:
        oldest = self._store.oldest_sequence()
        if cursor < oldest - 1:
            # Retention pruned past a slow subscriber: say so, never skip silently.
            raise _pruned(cursor, oldest)
        raise DataLoss(
            f"the audit log has no event {cursor + 1} (next stored: {found}); "
            "run `token-broker audit verify`"
        )

    def _wait_beyond(self, sequence: int, timeout: float) -> None:
        # Short waits, so that a cancelled subscriber is noticed even when nothing is written.
        self._changes.wait_beyond(sequence, timeout=timeout)


def _pruned(after: int, oldest: int) -> OutOfRange:
    return OutOfRange(
        f"events after sequence {after} are no longer retained; "
        f"the oldest available sequence is {oldest} "
        f"(resume with after_sequence={oldest - 1})"
    )
