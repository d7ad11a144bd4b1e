"""The committed audit log as this process's one change feed.

Every change the broker makes is committed with its audit event, and the events carry a
gapless global sequence: following them in order from the store is how every component learns
of every change, whichever process or replica made it. `ChangeFeed` runs one thread that waits
for the store's head to move (`Store.wait_for_events`: LISTEN/NOTIFY on PostgreSQL, the local
writer elsewhere), reads the new events by sequence, and hands each page, in order and exactly
once, to its subscribers (the run registry, the audit keeper, the key ring, StreamAudit's
waiters).

Local commits also take a fast path: the store calls `on_local_commit` before it acknowledges
a write, so `RevokeRun` returns only after this process's registry knows the run ended. The
fast path is the same update the log brings a moment later, never a different one; subscribers
must therefore accept an update twice (they do: each re-reads or overwrites state).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from broker.audit.events import AuditEvent
from broker.store import Committed, Mutation, Store, StoreUnavailable

log = logging.getLogger(__name__)

PAGE = 500
# Recent events kept decoded for live StreamAudit subscribers: read and decoded once per
# process, not once per subscriber.
RECENT = 20_000
# How long one wait for the store lasts; also the slowest a lost wake-up can delay a change.
WAIT = 1.0
# After a wake-up, gather what else commits for this long before reading: under load one read
# then covers many commits instead of one read (and two thread hand-offs) per commit. Bounds
# the extra delay of page subscribers (other replicas' revocations, live audit streams).
GATHER = 0.005

PageSubscriber = Callable[[Sequence[AuditEvent]], None]
LocalSubscriber = Callable[[Committed, Mutation | None], None]


class ChangeFeed:
    def __init__(self, store: Store, *, start_after: int | None = None) -> None:
        self._store = store
        self._cursor = store.head_sequence() if start_after is None else start_after
        self._head = self._cursor
        self._changed = threading.Condition()
        self._page_subscribers: list[PageSubscriber] = []
        self._local_subscribers: list[LocalSubscriber] = []
        self._stopping = threading.Event()
        self._dispatching = threading.Lock()
        self._recent: list[AuditEvent] = []
        self._thread: threading.Thread | None = None
        store.add_listener(self._on_local_commit)

    @property
    def head(self) -> int:
        """The newest sequence this process knows to be committed."""
        return self._head

    @property
    def running(self) -> bool:
        """Whether the feed's thread follows the log (started and not closed)."""
        return self._thread is not None and not self._stopping.is_set()

    @property
    def cursor(self) -> int:
        """Every event up to here has been handed to the page subscribers."""
        return self._cursor

    def subscribe(
        self, pages: PageSubscriber | None = None, local: LocalSubscriber | None = None
    ) -> None:
        """`pages` gets every committed event, in order, once, on the feed's thread; `local`
        gets this process's commits on the committing thread, before the commit returns; it
        must not write (the write would wait for the commit that calls it)."""
        if pages is not None:
            self._page_subscribers.append(pages)
        if local is not None:
            self._local_subscribers.append(local)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="change-feed", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wake(self) -> None:
        """Wake every `wait_beyond` at once (they re-check their own reasons to stop)."""
        with self._changed:
            self._changed.notify_all()

    def wait_beyond(self, sequence: int, timeout: float) -> bool:
        """Wait until an event after `sequence` is known to be committed (or `timeout`)."""
        with self._changed:
            if self._head <= sequence and not self._stopping.is_set():
                self._changed.wait(timeout)
            return self._head > sequence

    def recent(self, after: int, limit: int) -> list[AuditEvent] | None:
        """Up to `limit` events after `after` from memory, or None when memory does not hold
        the next one (older than it keeps, or not read yet: read the store then)."""
        recent = self._recent  # one reference: the feed's thread may swap in a trimmed list
        if not recent:
            return None
        start = after + 1 - recent[0].sequence  # events in memory are gapless
        if start < 0 or start >= len(recent):
            return None
        return recent[start : start + limit]

    def catch_up(self) -> int:
        """Read and dispatch everything committed so far, on the caller's thread (tests and
        start-up); return the cursor."""
        while self._dispatch_page():
            pass
        return self._cursor

    # -- internals -------------------------------------------------------------------------

    def _on_local_commit(self, committed: Committed, mutation: Mutation | None) -> None:
        for subscriber in self._local_subscribers:
            try:
                subscriber(committed, mutation)
            except Exception:
                log.exception("change subscriber failed (local commit)")
        if committed.events:
            self._advance_head(committed.events[-1].sequence)

    def _advance_head(self, sequence: int) -> None:
        with self._changed:
            if sequence > self._head:
                self._head = sequence
                self._changed.notify_all()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._dispatch_page():
                    self._advance_head(self._store.wait_for_events(self._cursor, WAIT))
                    self._stopping.wait(GATHER)
            except StoreUnavailable as exc:
                log.warning(
                    "change feed cannot read the store; retrying", extra={"error": str(exc)}
                )
                self._stopping.wait(WAIT)
            except Exception:
                log.exception("change feed failed; retrying")
                self._stopping.wait(WAIT)

    def _remember(self, page: Sequence[AuditEvent]) -> None:
        recent = self._recent
        if recent and page[0].sequence != recent[-1].sequence + 1:
            recent = []  # retention pruned past us: memory stays gapless
        if len(recent) + len(page) > 2 * RECENT:
            recent = recent[-RECENT:]  # a new list: readers holding the old one are unaffected
        recent.extend(page)
        self._recent = recent

    def _dispatch_page(self) -> bool:
        """Hand the next page to the subscribers; False when there was nothing new."""
        with self._dispatching:
            page = self._store.read_events(self._cursor, PAGE)
            if not page:
                return False
            for subscriber in self._page_subscribers:
                try:
                    subscriber(page)
                except Exception:
                    log.exception("change subscriber failed")
            self._remember(page)
            self._cursor = page[-1].sequence
        self._advance_head(self._cursor)
        return True
