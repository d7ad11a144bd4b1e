"""Group commit for the SQL stores: one writer thread per store applies queued writes in
batches — every write queued while the previous transaction was committing shares the next
transaction and its single fsync (each in its own savepoint, so one write's conflict does not
undo another's). The backends supply `apply_batch`; this module owns the queue and the hand-off.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from broker.store import Committed, Write

MAX_BATCH = 256
_STOP = object()


class Pending:
    """A queued write and, once the writer settled it, its outcome.

    The caller waits on a bare lock that the writer releases: the cheapest hand-off between
    two threads in CPython (a Future's condition variable costs the single writer several
    times as much per write, and every write in a group commit passes through it)."""

    __slots__ = ("_settled", "outcome", "write")

    def __init__(self, write: Write) -> None:
        self.write = write
        self.outcome: Committed | BaseException | None = None
        self._settled = threading.Lock()
        self._settled.acquire()

    def settle(self, outcome: Committed | BaseException) -> None:
        self.outcome = outcome
        self._settled.release()

    def wait(self) -> Committed:
        self._settled.acquire()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert self.outcome is not None
        return self.outcome


class WriteQueue:
    """Writes waiting for the one writer thread, handed to `apply_batch` a batch at a time;
    `apply_batch` settles every write it is given."""

    def __init__(self, apply_batch: Callable[[list[Pending]], None], name: str) -> None:
        self._apply_batch = apply_batch
        self._queue: queue.SimpleQueue[Pending | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, write: Write) -> Committed:
        """Queue `write` and wait until the writer settled it."""
        pending = Pending(write)
        self._queue.put(pending)
        return pending.wait()

    def waiting(self) -> int:
        """Writes queued and not yet taken by the writer (for tests and diagnostics)."""
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then end the thread."""
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # finish this batch, then stop
                    break
                batch.append(item)
            self._apply_batch([p for p in batch if isinstance(p, Pending)])
