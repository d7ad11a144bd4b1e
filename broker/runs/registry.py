"""Hot run state: every run whose tokens may still be alive, in memory.

The store is the truth; the registry is rebuilt from it at start and then follows every
commit (the store calls `on_commit` in commit order, before acknowledging the write), so a
run is ended in memory before `RevokeRun` returns. Ended runs are pruned once no token of
theirs can still be unexpired, which keeps memory bounded by live work, not history.

A child run never outlives its parent: `get` answers with a run whose ancestor has ended, or
is past its deadline or lease, as ended with it — before the reaper has recorded it (its
commit then ends the whole subtree in one transaction; see `broker.store.EndRun`).
"""

from __future__ import annotations

import threading

from broker.clock import Clock
from broker.runs.model import Run, RunState
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
        changed = list(committed.cascaded)
        if committed.run is not None:
            changed.insert(0, committed.run)
        with self._lock:
            for run in changed:
                known = self._runs.get(run.run_id)
                # Never let a late or replayed update resurrect an ended run.
                if known is not None and not known.is_active and run.is_active:
                    continue
                self._runs[run.run_id] = run

    def get(self, run_id: str) -> Run | None:
        """The run from memory, or from the store for runs pruned from memory; a child run
        reads as ended once an ancestor has ended or lapsed."""
        run = self._recorded(run_id)
        if run is None or not run.is_active or not run.parent_run_id:
            return run
        return self._within_ancestors(run, self._clock())

    def _recorded(self, run_id: str) -> Run | None:
        with self._lock:
            run = self._runs.get(run_id)
        return run if run is not None else self._store.get_run(run_id)

    def _within_ancestors(self, run: Run, now: float) -> Run:
        for ancestor in self._ancestors(run):
            if ancestor.is_active and ancestor.lapsed_at() > now:
                continue
            state = ancestor.state if not ancestor.is_active else RunState.EXPIRED
            at = ancestor.end_time if ancestor.end_time is not None else ancestor.lapsed_at()
            reason = ancestor.end_reason or (
                "lease lapsed" if ancestor.lapsed_at() < ancestor.deadline else "deadline passed"
            )
            why = f"ancestor run {ancestor.run_id} {state.value}: {reason}"
            return run.ended(state, at, why[:512], ancestor.ended_by)
        return run

    def _ancestors(self, run: Run) -> list[Run]:
        """Parent first, root last; an unknown ancestor ends the walk."""
        found: list[Run] = []
        seen = {run.run_id}
        parent_id = run.parent_run_id
        while parent_id and parent_id not in seen:
            seen.add(parent_id)
            parent = self._recorded(parent_id)
            if parent is None:
                break
            found.append(parent)
            parent_id = parent.parent_run_id
        return found

    def lapsed_at(self, run: Run) -> float:
        """When `run` stops being usable: its own deadline or lease, an ancestor's, or the
        time an ancestor ended, whichever comes first."""
        lapse = run.lapsed_at() if run.is_active else (run.end_time or run.create_time)
        for ancestor in self._ancestors(run):
            own = ancestor.lapsed_at() if ancestor.is_active else (ancestor.end_time or 0.0)
            lapse = min(lapse, own)
        return lapse

    def active(self) -> list[Run]:
        with self._lock:
            return [run for run in self._runs.values() if run.is_active]

    def due(self, now: float) -> list[Run]:
        """Active runs past their deadline or lease, parents before their children (a
        parent's expiry ends its descendants with it)."""
        due = [run for run in self.active() if self.lapsed_at(run) <= now]
        return sorted(due, key=lambda run: (len(run.actor_chain), run.create_time))

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
