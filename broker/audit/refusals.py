"""Refusals stay auditable without letting a caller fill the disk.

Every refused authentication (and every throttled call) is worth recording, but one event
per refusal lets an anonymous client write — and fsync — as fast as it can call. The ledger
records the *first* refusal of each (action, source, reason) in an interval as an ordinary
event at once; repeats within the interval are only counted, and when the interval closes
one more event of the same action records how many there were (`details.repeated`, with the
first and last time and request id). So N identical refusals cost at most two events per
interval, and an auditor still sees every source, every reason and every count.

Memory is bounded: beyond `max_sources` open (source, reason) windows, new ones are counted
together under source "*" (reason "other").
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from types import MappingProxyType

from broker.audit.events import AuditDraft
from broker.clock import Clock
from broker.store import Store, StoreUnavailable, Write

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0
DEFAULT_MAX_SOURCES = 1024
OVERFLOW = ("*", "other")


@dataclass
class _Window:
    opened: float
    repeated: int = 0
    last: AuditDraft | None = None


class RefusalLedger:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        interval: float = DEFAULT_INTERVAL,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        self._store = store
        self._clock = clock
        self.interval = interval
        self._max_sources = max_sources
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._lock = threading.Lock()
        self._next_scan = 0.0

    def __len__(self) -> int:
        return len(self._windows)

    def record(self, event: AuditDraft, *, source: str, reason: str) -> None:
        """Write `event` if it is the first of its kind in the interval, else count it."""
        if event.time >= self._next_scan:  # look for closed intervals at most once a second
            self._next_scan = event.time + min(1.0, self.interval)
            self.flush()
        with self._lock:
            key = (event.action, source, reason)
            if key not in self._windows and len(self._windows) >= self._max_sources:
                key = (event.action, *OVERFLOW)
            window = self._windows.get(key)
            if window is not None:
                window.repeated += 1
                window.last = event
                return
            self._windows[key] = _Window(opened=event.time)
        self._write(event)

    def flush(self, *, everything: bool = False) -> None:
        """Write the count of every closed interval (all of them at shutdown)."""
        now = self._clock()
        with self._lock:
            closed = [
                (key, window)
                for key, window in self._windows.items()
                if everything or now - window.opened >= self.interval
            ]
            for key, _ in closed:
                del self._windows[key]
        for key, window in closed:
            if window.repeated and window.last is not None:
                self._write(_summary(window, key, now))

    def _write(self, event: AuditDraft) -> None:
        try:
            self._store.commit(Write([event]))
        except StoreUnavailable:
            # The caller is refused either way; the log keeps what the audit could not.
            log.exception("could not record a refusal", extra={"action": event.action})


def _summary(window: _Window, key: tuple[str, str, str], now: float) -> AuditDraft:
    last = window.last
    assert last is not None
    details = dict(last.details)
    if (key[1], key[2]) == OVERFLOW:
        details = {"reason": "refusals from more sources than the ledger tracks"}
    details.update(
        repeated=window.repeated,
        first_time_us=round(window.opened * 1e6),
        last_time_us=round(last.time * 1e6),
        interval_seconds=round(now - window.opened, 3),
    )
    return dataclasses.replace(last, time=now, details=MappingProxyType(details))
