"""The policy in force, and reloading it (SIGHUP) without dropping a call.

The current `Policy` is one immutable object behind one reference: a reload parses and
validates the file completely, then swaps the reference. A call in flight keeps deciding
against the object it read; a bad file never replaces a good policy. Every load and every
failed reload is an audit event.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from broker.audit.events import Action, Outcome, draft
from broker.clock import Clock
from broker.context import CallContext
from broker.identity import BROKER
from broker.policy.file import PolicyError, load_policy
from broker.policy.model import Policy
from broker.store import Store, StoreUnavailable, Write

log = logging.getLogger(__name__)


class PolicySource:
    def __init__(self, path: Path, policy: Policy, store: Store, clock: Clock) -> None:
        self.path = path
        self._policy = policy
        self._store = store
        self._clock = clock
        self._reloading = threading.Lock()

    def record_in_force(self) -> None:
        """At start: log and audit which policy the broker serves with."""
        self._loaded(previous_sha256="")

    def current(self) -> Policy:
        return self._policy

    def reload(self) -> bool:
        """Re-read the file; keep the old policy if the new one is invalid. True if swapped."""
        with self._reloading:
            previous = self._policy
            try:
                policy = load_policy(self.path)
            except PolicyError as exc:
                self._failed(exc)
                return False
            self._policy = policy
            self._loaded(previous_sha256=previous.sha256)
            return True

    def reload_in_background(self) -> None:
        """For a signal handler: reload on a thread, never inside the handler itself."""
        threading.Thread(target=self.reload, name="policy-reload", daemon=True).start()

    def _loaded(self, previous_sha256: str) -> None:
        policy = self._policy
        log.info(
            "policy loaded",
            extra={
                "path": policy.source,
                "sha256": policy.sha256,
                "accounts": len(policy.accounts),
            },
        )
        self._audit(
            Action.POLICY_LOADED,
            Outcome.SUCCESS,
            {
                "path": policy.source,
                "sha256": policy.sha256,
                "previous_sha256": previous_sha256,
                "accounts": sorted(policy.accounts),
            },
        )

    def _failed(self, exc: PolicyError) -> None:
        log.error(
            "policy reload failed; the previous policy stays in force",
            extra={"path": exc.source, "problems": list(exc.problems)},
        )
        self._audit(
            Action.POLICY_RELOAD_FAILED,
            Outcome.FAILURE,
            {
                "path": exc.source,
                "problems": list(exc.problems),
                "kept_sha256": self._policy.sha256,
            },
        )

    def _audit(self, action: str, outcome: Outcome, details: dict[str, object]) -> None:
        event = draft(
            CallContext(principal=BROKER), self._clock(), action, outcome, details=details
        )
        try:
            self._store.commit(Write([event]))
        except StoreUnavailable:
            log.exception("could not record a policy event", extra={"action": action})
