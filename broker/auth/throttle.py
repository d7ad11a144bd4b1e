"""Call-rate limits: per peer for callers that prove nothing, per principal for the rest.

A token bucket per key (`rate` calls per second, up to `burst` at once). Calls that present
no valid credential — anonymous calls and refused authentications — draw from their peer's
bucket (the peer's address without the port, so one client opening many connections is one
source); authenticated calls draw from their principal's bucket. An empty bucket answers
RESOURCE_EXHAUSTED with the delay until a call would be admitted again (google.rpc.RetryInfo).
Memory is bounded: the least recently seen keys are forgotten first (a forgotten key starts
with a full bucket, which only ever favours the caller). A rate of 0 switches a limit off.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from broker.audit.events import Action, Outcome, draft
from broker.audit.refusals import RefusalLedger
from broker.clock import Clock
from broker.context import CallContext
from broker.errors import ResourceExhausted
from broker.identity import Principal

DEFAULT_MAX_KEYS = 10_000


@dataclass(frozen=True)
class RateLimit:
    rate: float  # calls per second; 0 = no limit
    burst: int

    @property
    def enabled(self) -> bool:
        return self.rate > 0


class TokenBuckets:
    """One token bucket per key, with at most `max_keys` keys remembered."""

    def __init__(self, limit: RateLimit, clock: Clock, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.limit = limit
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float | None:
        """Admit one call for `key` (None), or the seconds until one would be admitted."""
        if not self.limit.enabled:
            return None
        now = self._clock()
        burst = float(max(1, self.limit.burst))
        with self._lock:
            tokens, at = self._buckets.pop(key, (burst, now))
            tokens = min(burst, tokens + max(0.0, now - at) * self.limit.rate)
            wait = None
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.limit.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        return wait


def peer_source(peer: str) -> str:
    """'ipv4:10.0.0.7:53412' → 'ipv4:10.0.0.7'; the port changes with every connection."""
    kind, sep, rest = peer.partition(":")
    if not sep:
        return peer[:128]
    if kind in ("ipv4", "ipv6"):
        address = rest.rpartition(":")[0] or rest
        return f"{kind}:{address}"[:128]
    return peer[:128]


class Throttle:
    def __init__(
        self,
        per_peer: RateLimit,
        per_principal: RateLimit,
        clock: Clock,
        refusals: RefusalLedger,
    ) -> None:
        self._peers = TokenBuckets(per_peer, clock)
        self._principals = TokenBuckets(per_principal, clock)
        self._clock = clock
        self._refusals = refusals

    def unauthenticated(self, ctx: CallContext, peer: str, method: str) -> None:
        """An anonymous call or a refused authentication from `peer`: within its peer's rate?"""
        source = peer_source(peer)
        self._check(
            self._peers, source, ctx, method, f"calls without a valid credential from {source}"
        )

    def authenticated(self, ctx: CallContext, principal: Principal, method: str) -> None:
        self._check(self._principals, principal.name, ctx, method, f"calls by {principal.name}")

    def _check(
        self, buckets: TokenBuckets, key: str, ctx: CallContext, method: str, what: str
    ) -> None:
        wait = buckets.take(key)
        if wait is None:
            return
        limit = buckets.limit
        reason = f"rate limit exceeded: {what} (at most {limit.rate:g}/s, bursts of {limit.burst})"
        details = {"reason": reason, "method": method, "source": key}
        event = draft(ctx, self._clock(), Action.CALL_THROTTLED, Outcome.DENIED, details=details)
        self._refusals.record(event, source=key, reason=reason)
        raise ResourceExhausted(f"{reason}; retry in {wait:.1f}s", retry_after=wait)
