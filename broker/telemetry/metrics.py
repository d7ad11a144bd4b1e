"""The broker's metrics, through the OpenTelemetry metrics API.

Labels are bounded sets (outcome, result, state, and the first `max_audiences` token
audiences, then "other"): never a run id, a token id or a person, which would give every
run its own time series. RPC latency
(`rpc.server.call.duration`) is recorded by the server interceptor in tokenbroker.tracing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from broker.runs.model import Run, RunState
from broker.store import Committed, CreateRun, EndRun, Mutation

AUDIENCE = "tokenbroker.token.audience"
OUTCOME = "tokenbroker.token.outcome"
VERIFICATION_RESULT = "tokenbroker.verification.result"
DELEGATED = "tokenbroker.run.delegated"
EXPIRY_REASON = "tokenbroker.run.expiry_reason"
ALREADY_ENDED = "tokenbroker.revocation.already_ended"


OTHER = "other"
DEFAULT_MAX_AUDIENCES = 100


class BoundedLabels:
    """Label values taken from caller input, with bounded cardinality: the first `limit`
    distinct values seen keep their name, every later one is counted as "other" — so a
    caller inventing audiences cannot create time series without end."""

    def __init__(self, limit: int = DEFAULT_MAX_AUDIENCES) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


class TalliedCounter:
    """A monotonic counter kept as plain integers, reported when metrics are collected.

    Why not a `Counter`: its `add` costs ~20 µs of Python per call (a measurement object, the
    current context, the attribute set hashed and looked up under the aggregation's lock),
    and IssueToken and VerifyToken count on every call; adding to an integer under a lock
    costs well under 1 µs. An observable counter reports the same cumulative sums at
    collection time: same name, unit and monotonic sum, scraped or pushed alike (what it
    lacks is a trace exemplar per increment). Callers keep the attributes of a label set in
    the same order, which makes them one key."""

    def __init__(self, meter: Meter, name: str, unit: str, description: str) -> None:
        self._counts: dict[tuple[tuple[str, str | bool], ...], int] = {}
        self._lock = threading.Lock()
        meter.create_observable_counter(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def add(self, amount: int, attributes: Mapping[str, str | bool]) -> None:
        key = tuple(attributes.items())
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._counts.items())
        return [Observation(count, dict(key)) for key, count in counts]


class BrokerMetrics:
    def __init__(self, meter: Meter, max_audiences: int = DEFAULT_MAX_AUDIENCES) -> None:
        self.audience_label = BoundedLabels(max_audiences)
        # Counted on every IssueToken and VerifyToken: tallied (see TalliedCounter).
        self.tokens_issued = TalliedCounter(
            meter, "tokenbroker.tokens.issued", "{token}", "Step tokens asked for"
        )
        self.verifications = TalliedCounter(
            meter,
            "tokenbroker.tokens.verifications",
            "{verification}",
            "Token verifications by result",
        )
        self.runs_started = meter.create_counter(
            "tokenbroker.runs.started", unit="{run}", description="Runs started"
        )
        self.runs_ended = meter.create_counter(
            "tokenbroker.runs.ended", unit="{run}", description="Runs ended by a caller"
        )
        self.runs_expired = meter.create_counter(
            "tokenbroker.runs.expired",
            unit="{run}",
            description="Runs expired past their deadline or lease",
        )
        self.revocations = meter.create_counter(
            "tokenbroker.runs.revocations", unit="{call}", description="RevokeRun calls served"
        )
        self.cosignatures = meter.create_counter(
            "tokenbroker.audit.cosignatures",
            unit="{submission}",
            description="Witness cosignature submissions by result (accepted or refused)",
        )
        self.audit_lag = meter.create_histogram(
            "tokenbroker.audit.stream.lag",
            unit="{event}",
            description="How far behind the newest event an audit event was delivered",
            explicit_bucket_boundaries_advisory=(0, 1, 10, 100, 1_000, 10_000, 100_000),
        )
        self._meter = meter

    def count_cosignature(self, result: str) -> None:
        """A witness's cosignature submission: "accepted" or "refused"."""
        self.cosignatures.add(1, {"tokenbroker.cosignature.result": result})

    def on_commit(self, committed: Committed, mutation: Mutation | None) -> None:
        """Count run transitions as the store commits them (every replica counts its own)."""
        run = committed.run
        if run is None:
            return
        if isinstance(mutation, CreateRun):
            self.runs_started.add(1, {DELEGATED: run.on_behalf_of is not None})
        elif isinstance(mutation, EndRun) and run.state is RunState.EXPIRED:
            # Descendants ended with it count under the same reason as the run that lapsed.
            label = run.expiry_reason().label
            self.runs_expired.add(1 + len(committed.cascaded), {EXPIRY_REASON: label})
        elif isinstance(mutation, EndRun):
            self.runs_ended.add(1 + len(committed.cascaded))

    def observe(self, active_runs: Callable[[], list[Run]], subscribers: Callable[[], int]) -> None:
        """Gauges read at collection time: active runs, open audit streams."""

        def count_active(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(len(active_runs()))]

        def count_subscribers(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(subscribers())]

        self._meter.create_observable_up_down_counter(
            "tokenbroker.runs.active",
            callbacks=[count_active],
            unit="{run}",
            description="Active runs in this broker's memory",
        )
        self._meter.create_observable_up_down_counter(
            "tokenbroker.audit.subscribers",
            callbacks=[count_subscribers],
            unit="{stream}",
            description="Open StreamAudit streams",
        )
