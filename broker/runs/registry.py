"""Hot run state: every run whose tokens may still be alive, in memory.

The store is the truth; the registry is rebuilt from it at start and then follows every
commit (the store calls `on_commit` in commit order, before acknowledging the write), so a
run is ended in memory before `RevokeRun` returns. Ended runs are pruned once no token of
theirs can still be unexpired, which keeps memory bounded by live work, not history.

`get` answers with the run as it stands now (`Run.as_of`): a run past its deadline or lease
reads as expired before the reaper has committed it, so every caller agrees with the clock.
"""

from __future__ import annotations

import threading

from broker.clock import Clock
from broker.runs.model import Run
from broker.store import Committed, Mutation, Store


class RunRegistry:
    def __init__(self, store: Store, *, clock: Clock, token_horizon: float) -> None:
        """`token_horizon`: the longest a token may outlive the end of its run (max TTL)."""
        self._store = store
        self._clock = clock
        self._horizon = token_horizon
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        for run in store.live_runs(ended_since=clock() - token_horizon):
            self._runs[run.run_id] = run
        store.add_listener(self.on_commit)

    def on_commit(self, committed: Committed, mutation: Mutation | None) -> None:
        run = committed.run
        if run is None:
            return
        with self._lock:
            known = self._runs.get(run.run_id)
            # Never let a late or replayed update resurrect an ended run.
            if known is not None and not known.is_active and run.is_active:
                return
            self._runs[run.run_id] = run

    def get(self, run_id: str, now: float | None = None) -> Run | None:
        """The run as it stands at `now` (default: the clock's now), from memory, or from
        the store for runs pruned from memory."""
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            run = self._store.get_run(run_id)
        if run is None:
            return None
        return run.as_of(self._clock() if now is None else now)

    def active(self) -> list[Run]:
        with self._lock:
            return [run for run in self._runs.values() if run.is_active]

    def due(self, now: float) -> list[Run]:
        """Runs recorded as active that are past their deadline or lease (for the reaper)."""
        return [run for run in self.active() if run.lapsed_at() <= now]

    def prune(self, now: float) -> int:
        """Forget ended runs whose every token has expired; return how many."""
        cutoff = now - self._horizon
        with self._lock:
            stale = [
                run_id
                for run_id, run in self._runs.items()
                if not run.is_active and run.end_time is not None and run.end_time < cutoff
            ]
            for run_id in stale:
                del self._runs[run_id]
        return len(stale)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)
