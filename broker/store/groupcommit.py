"""Group commit for the SQL stores, led by the callers themselves.

A caller that finds no commit in progress becomes the *leader*: it takes every write queued
so far (its own first) and applies them as one batch — one transaction, one fsync, each write
in its own savepoint so that one write's conflict does not undo another's — on its own thread.
Callers that arrive meanwhile queue their writes and wait. When the leader's batch is done and
more writes are queued, it hands leadership to the oldest waiting caller, which commits the
next batch (its own write included), and returns.

Why not a writer thread: every write then crossed two thread hand-offs (caller → writer →
caller), each a futex wake-up and a fight for the interpreter lock; an uncontended write led
by its caller crosses none, and under load one hand-off per *batch* remains.
The backends supply `apply_batch`; this module owns the queue and the hand-offs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from broker.store import Committed, StoreUnavailable, Write

MAX_BATCH = 256


class _Lead:
    """The outcome that tells a waiting caller to lead the next batch."""


_LEAD = _Lead()


class Pending:
    """A queued write and, once a leader settled it, its outcome.

    The caller waits on a bare lock that the leader releases: the cheapest hand-off between
    two threads in CPython (a Future's condition variable costs several times as much)."""

    __slots__ = ("_settled", "outcome", "write")

    def __init__(self, write: Write) -> None:
        self.write = write
        self.outcome: Committed | BaseException | _Lead | None = None
        self._settled = threading.Lock()
        self._settled.acquire()

    def settle(self, outcome: Committed | BaseException) -> None:
        self.outcome = outcome
        self._settled.release()

    def _promote(self) -> None:
        self.outcome = _LEAD
        self._settled.release()

    def _wait_turn(self) -> bool:
        """Block until settled (False) or asked to lead (True; the lock is held again)."""
        self._settled.acquire()
        if self.outcome is _LEAD:
            self.outcome = None
            return True
        return False

    def result(self) -> Committed:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert isinstance(self.outcome, Committed)
        return self.outcome

    def wait(self) -> Committed:
        self._settled.acquire()
        return self.result()


class WriteQueue:
    """Writes waiting for a leader, handed to `apply_batch` a batch at a time;
    `apply_batch` settles every write it is given."""

    def __init__(self, apply_batch: Callable[[list[Pending]], None], name: str) -> None:
        self._apply_batch = apply_batch
        self._name = name
        self._lock = threading.Lock()
        self._queue: list[Pending] = []
        self._leading = False
        self._idle = threading.Condition(self._lock)
        self._stopped = False

    def start(self) -> None:
        """Nothing to start: callers lead (kept so that stores read the same as before)."""

    def submit(self, write: Write) -> Committed:
        """Commit `write` with whatever else is queued, leading the batch if nobody is."""
        pending = Pending(write)
        with self._lock:
            if self._stopped:
                raise StoreUnavailable("store is closed")
            self._queue.append(pending)
            lead = not self._leading
            self._leading = True
        if not lead and not pending._wait_turn():
            return pending.result()
        self._lead()
        return pending.wait()

    def _lead(self) -> None:
        with self._lock:
            batch = self._queue[:MAX_BATCH]
            del self._queue[:MAX_BATCH]
        try:
            self._apply_batch(batch)
        except BaseException as exc:  # never leave a caller waiting for a batch that failed
            for pending in batch:
                if pending.outcome is None:
                    pending.settle(exc)
            raise
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._leading = False
                    self._idle.notify_all()
            if successor is not None:
                successor._promote()

    def waiting(self) -> int:
        """Writes queued and not yet taken by a leader (for tests and diagnostics)."""
        with self._lock:
            return len(self._queue)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new writes; wait for those queued or in progress to finish."""
        with self._lock:
            self._stopped = True
            self._idle.wait_for(lambda: not self._leading, timeout)
