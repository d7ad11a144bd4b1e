"""Composition root of the domain: builds every component from Settings, and closes them."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from broker.auditfeed import AuditFeed
from broker.auditkeeper import DAY, AuditKeeper, KeeperSettings
from broker.authz import AllowAll
from broker.checkpoints import CheckpointSigner
from broker.clock import Clock, system_clock
from broker.context import CallContext
from broker.identity import BROKER
from broker.lifecycle import RunLifecycle
from broker.registry import RunRegistry
from broker.settings import Settings
from broker.store import Store
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

# The longest a step token may live; an ended run stays in memory this long.
MAX_TOKEN_TTL = 3600.0


def open_store(settings: Settings) -> Store:
    if settings.store == "memory":
        return MemoryStore()
    return SqliteStore(settings.data_dir)


@dataclass
class Broker:
    settings: Settings
    store: Store
    clock: Clock
    registry: RunRegistry
    runs: RunLifecycle
    feed: AuditFeed
    keeper: AuditKeeper
    _stop: threading.Event = field(default_factory=threading.Event)
    _reaper: threading.Thread | None = None

    def start_background(self) -> None:
        """Start the reaper that expires runs past their deadline or lease."""
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        self._reaper.start()
        self.keeper.start()

    def _reap_loop(self) -> None:
        ctx = CallContext(principal=BROKER)
        while not self._stop.wait(self.settings.reap_interval):
            try:
                for run in self.runs.expire_due(ctx):
                    log.info("run expired", extra={"run_id": run.run_id, "reason": run.end_reason})
            except Exception:
                # Keep reaping: a transient storage failure must not stop expiry for good.
                log.exception("reaper pass failed")

    def close(self) -> None:
        self._stop.set()
        self.feed.close()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.keeper.close()
        self.store.close()


def build_broker(
    settings: Settings,
    *,
    store: Store | None = None,
    clock: Clock = system_clock,
    signer: CheckpointSigner | None = None,
) -> Broker:
    """`signer` signs audit checkpoints (the key ring); without one, none are taken."""
    store = store if store is not None else open_store(settings)
    registry = RunRegistry(store, now=clock(), token_horizon=MAX_TOKEN_TTL)
    authorizer = AllowAll()
    return Broker(
        settings=settings,
        store=store,
        clock=clock,
        registry=registry,
        runs=RunLifecycle(store, registry, clock, authorizer),
        # Half the workers at most follow audit streams; the rest stay free for everyone else.
        feed=AuditFeed(
            store, clock, authorizer, registry.get, max_subscribers=settings.max_workers // 2
        ),
        keeper=AuditKeeper(store, clock, signer, _keeper_settings(settings)),
    )


def _keeper_settings(settings: Settings) -> KeeperSettings:
    return KeeperSettings(
        every_events=settings.audit_checkpoint_events,
        interval=settings.audit_checkpoint_interval,
        retention_seconds=settings.audit_retention_days * DAY,
        issuer=settings.effective_issuer,
    )
