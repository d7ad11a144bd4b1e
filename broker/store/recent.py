"""The events a store's writer committed last, kept to answer the reads that follow them.

After every commit this process's change feed reads the new events back (`read_events` from
its cursor, usually just behind the head): rows sealed a moment ago by this very process. A
writer that is the file's only one keeps what it committed — each event's canonical bytes
and hashes, as its row holds them — and answers such reads from memory: no query (each of
a query's SQLite calls lets go of the interpreter lock, and a busy broker's other threads
take it). The events are parsed from the same bytes as a read of the rows parses.

What is kept is always a gapless run of committed, unpruned events ending at the writer's
last commit: added after the transaction commits, dropped when pruning or when another
connection is found to have written to the file (the head read inside the next transaction,
or by `head_sequence`, is not the last event kept). Until then, as for
`Store.wait_for_events`, the writer takes its last commit for the head: a commit by another
process on the file (a foreign tool — brokers and `serve --workers` take the store's lock or
read the file) is seen at the next read of the head.
"""

from __future__ import annotations

import threading

from broker.audit.events import AuditEvent
from broker.store.codec import event_from_row

# Enough for the change feed, which reads a few milliseconds behind the head, to find what
# it reads here even when a burst commits a thousand events in between; at most twice as
# many are kept (~1.5 MB of canonical bytes for token events).
CAPACITY = 2048


class _Kept:
    __slots__ = ("body", "hash", "prev_hash", "sequence")

    def __init__(self, sequence: int, body: bytes, prev_hash: str, hash_: str) -> None:
        self.sequence = sequence
        self.body = body
        self.prev_hash = prev_hash
        self.hash = hash_

    def event(self) -> AuditEvent:
        # Parsed as a read of the row parses it: the C JSON parser is also the cheapest way
        # (rebuilding the event from the sealed record in Python measured slower).
        return event_from_row(self.body.decode(), self.prev_hash, self.hash)


class RecentCommits:
    """Filled by the writer's thread after each commit; read from any thread."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._kept: list[_Kept] = []
        self._lock = threading.Lock()  # writers to `_kept`: the committing thread, pruning

    def keep(self, sealed: list[tuple[AuditEvent, bytes]]) -> None:
        """Remember events just committed (each with its canonical bytes), in sequence order."""
        if not sealed:
            return
        added = [_Kept(event.sequence, body, event.prev_hash, event.hash) for event, body in sealed]
        with self._lock:
            kept = self._kept
            if kept and added[0].sequence != kept[-1].sequence + 1:
                kept = []  # not the continuation of what is kept: start again from here
            if len(kept) + len(added) > 2 * self._capacity:
                kept = kept[-self._capacity :]
            # A new list when restarted or trimmed; readers holding the old one are unaffected
            # (an append to the one they hold only adds events after theirs).
            kept.extend(added)
            self._kept = kept

    def forget(self) -> None:
        with self._lock:
            self._kept = []

    def last(self) -> int | None:
        kept = self._kept
        return kept[-1].sequence if kept else None

    def saw_head(self, head: int) -> None:
        """The file's head as just read: beyond what is kept, someone else wrote to the file
        and what is kept no longer ends at the head."""
        with self._lock:
            kept = self._kept
            if kept and head > kept[-1].sequence:
                self._kept = []

    def read(self, after: int, limit: int) -> list[AuditEvent] | None:
        """Up to `limit` events after `after`, ending at the last one committed here (none
        after that one: as the file's only writer knows, it is the head); None when what
        follows `after` is not kept (read the store)."""
        kept = self._kept
        if not kept or limit <= 0:
            return None
        start = after + 1 - kept[0].sequence
        if start < 0 or start > len(kept):
            return None
        return [entry.event() for entry in kept[start : start + limit]]
