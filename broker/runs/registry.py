"""Hot run state: every run whose tokens may still be alive, in memory.

The store is the truth; the registry is rebuilt from it at start and then follows the
committed audit log (`follow`): every event that changes a run's state, whichever process or
replica committed it, makes the registry re-read that run from the store. This process's own
commits also arrive on the fast path (`on_commit`, before the store acknowledges the write), so
a run is ended in memory before `RevokeRun` returns here, and within the change feed's wake-up
latency on every other replica. Ended runs are pruned once no token of
theirs can still be unexpired, which keeps memory bounded by live work, not history.

`get` answers with the run as it stands now (`Run.as_of`): a run past its deadline or lease
reads as expired before the reaper has committed it, so every caller agrees with the clock.
A child run never outlives its parent: a run whose ancestor has ended, or is past its deadline
or lease, reads as ended with it — before the reaper has recorded it (its commit then ends the
whole subtree in one transaction; see `broker.store.EndRun`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from broker.audit.events import Action, AuditEvent
from broker.clock import Clock
from broker.runs.model import Run, RunState
from broker.store import Committed, Mutation, Store
from broker.store.changes import ChangeFeed

# The events after which a run's stored state differs from before.
RUN_STATE_ACTIONS = frozenset(
    {
        Action.RUN_STARTED,
        Action.RUN_EXECUTED_ON_BEHALF,
        Action.RUN_RENEWED,
        Action.RUN_ENDED,
        Action.RUN_EXPIRED,
    }
)


class RunRegistry:
    def __init__(
        self,
        store: Store,
        *,
        clock: Clock,
        token_horizon: float,
        changes: ChangeFeed | None = None,
    ) -> None:
        """`token_horizon`: the longest a token may outlive the end of its run (max TTL)."""
        self._store = store
        self._clock = clock
        self._horizon = token_horizon
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        for run in store.live_runs(ended_since=clock() - token_horizon):
            self._runs[run.run_id] = run
        changes = changes if changes is not None else ChangeFeed(store)
        changes.subscribe(pages=self.on_events, local=self.on_commit)

    def on_commit(self, committed: Committed, mutation: Mutation | None) -> None:
        if committed.run is not None:
            self._learn(committed.run)
        for descendant in committed.cascaded:  # ended with it, in the same transaction
            self._learn(descendant)

    def on_events(self, events: Sequence[AuditEvent]) -> None:
        changed = {
            e.draft.run_id for e in events if e.draft.run_id and e.draft.action in RUN_STATE_ACTIONS
        }
        for run_id in changed:
            run = self._store.get_run(run_id)
            if run is not None:
                self._learn(run)

    def _learn(self, run: Run) -> None:
        with self._lock:
            known = self._runs.get(run.run_id)
            # Never let a late or replayed update resurrect an ended run.
            if known is not None and not known.is_active and run.is_active:
                return
            self._runs[run.run_id] = run

    def get(self, run_id: str, now: float | None = None) -> Run | None:
        """The run as it stands at `now` (default: the clock's now), from memory, or from
        the store for runs pruned from memory; a child run reads as ended once an ancestor
        has ended or lapsed."""
        run = self._recorded(run_id)
        if run is None:
            return None
        now = self._clock() if now is None else now
        run = run.as_of(now)
        if not run.is_active or not run.parent_run_id:
            return run
        return self._within_ancestors(run, now)

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
            reason = ancestor.end_reason or ancestor.expiry_reason().value
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
        """Runs recorded as active that are past their deadline or lease, or an ancestor's
        (for the reaper), parents before their children: a parent's expiry ends its
        descendants with it."""
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
