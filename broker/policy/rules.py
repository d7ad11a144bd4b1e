"""What the policy in force says to IssueToken and ExecuteOnBehalfOf, in their own terms.

Reads the current policy on every call (so a SIGHUP reload applies at once) and keeps one
key cache per identity provider across reloads, so the hot path fetches no JWKS.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from broker.policy.model import IdentityProvider, Policy, Role
from broker.runs.delegation import ChildScope, DelegationRules, TrustedIdp
from broker.runs.permissions import PermissionSet
from tokenbroker.verifier import JwksCache, JwksFetcher, jwks_from_url


def _static(document: Mapping[str, Any]) -> JwksFetcher:
    return lambda: document


class PolicyRules:
    def __init__(self, policy: Callable[[], Policy]) -> None:
        self._policy = policy
        self._caches: dict[tuple[str, str], JwksCache] = {}
        self._lock = threading.Lock()

    def account_permissions(self, name: str) -> PermissionSet | None:
        """The permissions the policy grants service account `name`, for inherit mode."""
        account = self._policy().account(name)
        return None if account is None else account.permissions

    def token_algorithm(self, audience: str) -> str | None:
        """The algorithm the policy names for tokens to `audience` (None: the default)."""
        rule = self._policy().audience_rule(audience)
        return None if rule is None else rule.algorithm

    def delegation_rules(self, name: str) -> DelegationRules | None:
        account = self._policy().account(name)
        if account is None or Role.DELEGATOR not in account.roles:
            return None
        d = account.delegation
        return DelegationRules(
            idps={idp.issuer: self._trusted(idp) for idp in d.identity_providers},
            user_domains=d.user_domains,
            asserted_domains=d.asserted_domains if d.asserted_identities else frozenset(),
            max_chain_depth=d.max_chain_depth,
            covers=account.covers,
            scope_text=account.scope_text(),
            child_scope=ChildScope(d.child_runs.value),
        )

    def _trusted(self, idp: IdentityProvider) -> TrustedIdp:
        return TrustedIdp(idp.issuer, idp.audience, self._keys(idp).find)

    def _keys(self, idp: IdentityProvider) -> JwksCache:
        source = idp.jwks_url or hashlib.sha256(idp.jwks_json.encode()).hexdigest()
        with self._lock:
            cache = self._caches.get((idp.issuer, source))
            if cache is None:
                fetch = (
                    jwks_from_url(idp.jwks_url)
                    if idp.jwks_url
                    else _static(json.loads(idp.jwks_json))
                )
                cache = self._caches[(idp.issuer, source)] = JwksCache(fetch)
            return cache
