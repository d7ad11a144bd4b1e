"""Composition root of the domain: builds every component from Settings, and closes them."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from broker.audit.checkpoints import CheckpointSigner
from broker.audit.feed import AuditFeed
from broker.audit.keeper import DAY, AuditKeeper, KeeperSettings
from broker.audit.lognote import LOG_KEY_FILE, LogKey, origin_for
from broker.audit.quorum import WitnessKeyError, WitnessQuorum, WitnessVerifier
from broker.audit.refusals import RefusalLedger
from broker.audit.treehead import TreeHeads
from broker.auth.authn import Authenticator, RunCredentialVerifier
from broker.auth.authz import PolicyAuthorizer
from broker.auth.throttle import RateLimit, Throttle
from broker.clock import Clock, system_clock
from broker.context import CallContext
from broker.errors import FailedPrecondition
from broker.identity import BROKER
from broker.policy import dev as devpolicy
from broker.policy.file import load_policy
from broker.policy.model import Policy
from broker.policy.rules import PolicyRules
from broker.policy.source import PolicySource
from broker.runs.delegation import Delegation, Handoff
from broker.runs.issuance import MAX_TTL, Issuance
from broker.runs.keys import CheckpointSigning, KeyRing
from broker.runs.lifecycle import HOUR, MAX_DEADLINE, RunLifecycle
from broker.runs.registry import RunRegistry
from broker.runs.tokens import TokenService
from broker.settings import Settings, SettingsError
from broker.store import Store, StoreRefused, StoreUnavailable, headroom
from broker.store.changes import ChangeFeed
from broker.store.factory import OpenOptions
from broker.store.factory import open_store as open_store_url
from broker.telemetry.otel import Telemetry

if TYPE_CHECKING:  # the Prometheus exporter is imported only where /metrics is served
    from broker.telemetry.scrape import PrometheusScrape

log = logging.getLogger(__name__)

KEY_DIR = "keys"


def open_store(settings: Settings, held_lock: int | None = None) -> Store:
    """The store `--store` names. Raises StoreRefused (nothing changed) if it must not be
    opened; an empty one is created only in a data dir that never held a broker, or with
    --init-store. `held_lock`: a worker of `serve --workers` (see OpenOptions)."""
    return open_store_url(settings.store, store_options(settings, held_lock))


def store_options(settings: Settings, held_lock: int | None = None) -> OpenOptions:
    data_dir = settings.data_dir
    return OpenOptions(
        data_dir=data_dir,
        create=settings.init_store,
        held_lock=held_lock,
        # What a broker leaves in its data dir: a database missing beside these was lost.
        history=(
            data_dir / KEY_DIR,
            data_dir / devpolicy.POLICY_FILE,
            data_dir / devpolicy.KEY_FILE,
        ),
    )


@dataclass(frozen=True)
class Readiness:
    """Whether the broker is ready for all of its work, and if not, why: the one answer that
    the HTTP `/readyz` and the gRPC health service both report."""

    store_writable: bool
    policy_loaded: bool
    keys_present: bool
    draining: bool

    @property
    def ready(self) -> bool:
        return not self.reasons

    @property
    def reasons(self) -> list[str]:
        reasons = []
        if self.draining:
            reasons.append("draining: shutting down, finishing the calls in flight")
        if not self.store_writable:
            reasons.append(
                "store cannot take writes (disk full or read-only): reads and verification only"
            )
        if not self.policy_loaded:
            reasons.append("no policy loaded")
        if not self.keys_present:
            reasons.append("no active signing key")
        return reasons


@dataclass
class Broker:
    settings: Settings
    store: Store
    clock: Clock
    registry: RunRegistry
    runs: RunLifecycle
    feed: AuditFeed
    keys: KeyRing
    tokens: TokenService
    issuance: Issuance
    delegation: Delegation
    telemetry: Telemetry
    policy: PolicySource
    authn: Authenticator
    keeper: AuditKeeper
    tree_heads: TreeHeads
    quorum: WitnessQuorum
    changes: ChangeFeed
    refusals: RefusalLedger
    throttle: Throttle
    # Set when the server begins to shut down: not ready from then on.
    draining: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _reaper: threading.Thread | None = None
    _next_forget: float = 0.0

    def start_background(self) -> None:
        """Start the reaper that expires runs past their deadline or lease."""
        self._next_forget = self.clock() + HOUR
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        self._reaper.start()
        self.keeper.start()
        self.changes.start()

    def _reap_loop(self) -> None:
        ctx = CallContext(principal=BROKER)
        while not self._stop.wait(self.settings.reap_interval):
            try:
                for run in self.runs.expire_due(ctx):
                    log.info("run expired", extra={"run_id": run.run_id, "reason": run.end_reason})
                self.keys.refresh()  # unpublish keys past retirement; see other replicas' keys
                self.refusals.flush()  # the counts of repeated refusals whose interval closed
                self._forget_idempotency_keys(ctx)
            except Exception:
                # Keep reaping: a transient storage failure must not stop expiry for good.
                log.exception("reaper pass failed")

    def _forget_idempotency_keys(self, ctx: CallContext) -> None:
        """Hourly: the retention of idempotency keys (one audit event per pass)."""
        days = self.settings.idempotency_retention_days
        now = self.clock()
        if days <= 0 or now < self._next_forget:
            return
        self._next_forget = now + HOUR
        self.runs.forget_idempotency_keys(ctx, days * DAY)

    def writes_ready(self) -> bool:
        """Whether the store can be expected to take writes now: for readiness only; a
        write that fails still fails closed on its own."""
        # A file-backed store (sqlite) says where its file is; the others have no disk.
        path = getattr(self.store, "path", None)
        return headroom.can_write(path) if isinstance(path, Path) else True

    def readiness(self) -> Readiness:
        """Store writable, policy loaded, a key to sign with, not draining — now."""
        try:
            keys_present = bool(self.keys.active)
        except FailedPrecondition:
            keys_present = False
        return Readiness(
            store_writable=self.writes_ready(),
            policy_loaded=self.policy.current() is not None,
            keys_present=keys_present,
            draining=self.draining.is_set(),
        )

    def close(self) -> None:
        self.draining.set()
        self._stop.set()
        self.feed.close()
        self.delegation.close()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.keeper.close()
        self.refusals.flush(everything=True)
        self.changes.close()
        self.store.close()


def build_broker(
    settings: Settings,
    *,
    store: Store | None = None,
    clock: Clock = system_clock,
    issuer: str | None = None,
    handoff: Handoff | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    run_credentials: RunCredentialVerifier | None = None,
    signer: CheckpointSigner | None = None,
    held_lock: int | None = None,
    scrape: PrometheusScrape | None = None,
) -> Broker:
    """Everything the broker needs, loaded and ready.

    `issuer` (the `iss` of broker tokens and the audience of callers' assertions) defaults
    from settings. Without providers, telemetry is a no-op (`serve` builds them from OTEL_*
    variables; `scrape` is the Prometheus reader of `meter_provider`, for /metrics). Audit
    checkpoints are signed by `signer`, by default the key ring.
    Raises PolicyError (before opening anything) when the policy is invalid, and
    StoreRefused when the store must not be opened. The store is opened before anything is
    written into the data dir, so that a first start is told from a lost database.
    `held_lock`: this process is a worker of `serve --workers` (see OpenOptions).
    """
    issuer = issuer or settings.effective_issuer
    given_policy = load_policy(settings.policy) if settings.policy else None
    witnesses = _witness_keys(settings)  # like the policy: refused before opening anything
    opened = store is None
    store = open_store(settings, held_lock) if store is None else store
    try:
        return _assemble(
            settings,
            store,
            clock,
            issuer,
            given_policy,
            handoff=handoff,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            run_credentials=run_credentials,
            signer=signer,
            scrape=scrape,
            witnesses=witnesses,
        )
    except StoreUnavailable as exc:
        # Reading the store at start failed (a damaged page, an I/O error): not serving.
        if opened:
            store.close()
        where = getattr(store, "path", settings.store)
        raise StoreRefused(f"{where}: cannot be read at start: {exc}") from exc
    except BaseException:
        if opened:
            store.close()  # and with it the data dir's lock
        raise


def _assemble(
    settings: Settings,
    store: Store,
    clock: Clock,
    issuer: str,
    given_policy: Policy | None,
    *,
    handoff: Handoff | None,
    tracer_provider: TracerProvider | None,
    meter_provider: MeterProvider | None,
    run_credentials: RunCredentialVerifier | None,
    signer: CheckpointSigner | None,
    witnesses: list[WitnessVerifier],
    scrape: PrometheusScrape | None,
) -> Broker:
    if settings.policy is not None and given_policy is not None:
        policy_path, first_policy = settings.policy, given_policy
    else:
        policy_path = devpolicy.ensure(settings.data_dir, issuer)
        first_policy = load_policy(policy_path)
    # Read what must be read (the live runs) before the first write (policy.loaded), so that
    # a store that cannot be read at start is refused before anything is added to it.
    # The committed audit log is the one change feed: registry, audit feed, keeper and key
    # ring learn of every change from it, whichever process or replica made it.
    changes = ChangeFeed(store)
    registry = RunRegistry(store, clock=clock, token_horizon=MAX_TTL, changes=changes)
    policy = PolicySource(policy_path, first_policy, store, clock)
    policy.record_in_force()
    refusals = RefusalLedger(store, clock, settings.refusal_audit_interval)
    authorizer = PolicyAuthorizer(policy.current, store, clock, refusals)
    telemetry = Telemetry(tracer_provider, meter_provider, settings.metric_audiences, scrape)
    keys = KeyRing(
        store,
        clock,
        key_dir=settings.data_dir / KEY_DIR,
        alg=settings.signing_alg,
        # A rotated-out key stays published while anything it signed may be unexpired:
        # run credentials live until their run's deadline.
        retire_after=MAX_DEADLINE + MAX_TTL,
        authorizer=authorizer,
        external_key=settings.signing_key,
        prepublish=settings.key_prepublish,
        # A key for every algorithm the policy in force names for some audience.
        algorithms=lambda: policy.current().token_algorithms(),
    )
    keys.load(CallContext(principal=BROKER))
    rules = PolicyRules(policy.current)
    tokens = TokenService(keys, registry, issuer, clock, store, rules.token_algorithm)
    throttle = Throttle(
        RateLimit(settings.peer_rate, settings.peer_burst),
        RateLimit(settings.principal_rate, settings.principal_burst),
        clock,
        refusals,
    )
    authn = Authenticator(
        policy.current,
        issuer,
        store,
        clock,
        run_credentials or tokens.authenticate_run_credential,
        refusals=refusals,
        before_refusal=throttle.unauthenticated,
        proofs=lambda proof, htu, credential, jkt: tokens.check_proof(
            proof, htu=htu, credential=credential, expected_jkt=jkt
        ),
    )
    runs = RunLifecycle(
        store,
        registry,
        clock,
        authorizer,
        observer=telemetry,
        binding_policy=rules.binding_policy,
        org_ids=rules.org_ids,
    )
    feed = AuditFeed(
        store,
        clock,
        authorizer,
        registry.get,
        observer=telemetry,
        # Each live stream holds a thread of the streams' pool (broker.api.server), which
        # has this many and a few more for health watches and reflection.
        max_subscribers=settings.max_audit_streams,
        changes=changes,
        max_per_principal=settings.audit_streams_per_principal,
    )
    changes.subscribe(pages=keys.on_events)
    telemetry.watch(store, registry.active, lambda: feed.subscribers)
    log_key = LogKey.load_or_create(
        settings.audit_log_key or settings.data_dir / LOG_KEY_FILE, origin_for(issuer)
    )
    tree_heads = TreeHeads(store, log_key, authorizer)
    return Broker(
        settings=settings,
        store=store,
        clock=clock,
        registry=registry,
        runs=runs,
        feed=feed,
        keys=keys,
        tokens=tokens,
        issuance=Issuance(
            store,
            registry,
            tokens,
            authorizer,
            clock,
            rules.account_permissions,
            telemetry,
            shape_for=rules.token_shape,
            binding_policy=rules.binding_policy,
        ),
        delegation=Delegation(
            runs,
            registry,
            tokens,
            store,
            clock,
            rules.delegation_rules,
            handoff=handoff,
            observer=telemetry,
        ),
        telemetry=telemetry,
        policy=policy,
        authn=authn,
        keeper=AuditKeeper(
            store,
            clock,
            signer or CheckpointSigning(keys),
            _keeper_settings(settings, issuer),
            changes=changes,
        ),
        tree_heads=tree_heads,
        quorum=WitnessQuorum(
            store,
            tree_heads,
            log_key.verifier,
            witnesses,
            settings.witness_quorum,
            telemetry.metrics.count_cosignature,
            refusals,
            clock,
        ),
        changes=changes,
        refusals=refusals,
        throttle=throttle,
    )


def _witness_keys(settings: Settings) -> list[WitnessVerifier]:
    try:
        witnesses = [WitnessVerifier.load(path) for path in settings.witness_key]
    except WitnessKeyError as exc:
        raise SettingsError(f"--witness-key: {exc}") from None
    distinct = len({w.text() for w in witnesses})
    if settings.witness_quorum > distinct:
        # Two files with one key are one witness: such a quorum could never be reached.
        raise SettingsError(
            f"--witness-quorum {settings.witness_quorum} needs that many distinct witness "
            f"keys; the --witness-key files hold {distinct}"
        )
    return witnesses


def _keeper_settings(settings: Settings, issuer: str) -> KeeperSettings:
    return KeeperSettings(
        every_events=settings.audit_checkpoint_events,
        interval=settings.audit_checkpoint_interval,
        retention_seconds=settings.audit_retention_days * DAY,
        issuer=issuer,
    )
