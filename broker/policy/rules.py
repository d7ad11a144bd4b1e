"""What the policy in force says to IssueToken and ExecuteOnBehalfOf, in their own terms.

Reads the current policy on every call (so a SIGHUP reload applies at once) and keeps one
key cache per identity provider across reloads, so the hot path fetches no JWKS.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from broker.errors import PermissionDenied
from broker.policy.model import IdentityProvider, Policy, Role, TokenClaims
from broker.runs.binding import BindingPolicy
from broker.runs.claims import TokenShape
from broker.runs.delegation import ChildScope, DelegationRules, TrustedIdp
from broker.runs.model import PipelineIds, PipelineRef, Run
from broker.runs.permissions import PermissionSet
from tokenbroker.verifier import JwksCache, JwksFetcher, jwks_from_url


def _static(document: Mapping[str, Any]) -> JwksFetcher:
    return lambda: document


class PolicyRules:
    def __init__(self, policy: Callable[[], Policy]) -> None:
        self._policy = policy
        self._caches: dict[tuple[str, str], JwksCache] = {}
        self._lock = threading.Lock()
        self._binding_of: tuple[Policy | None, BindingPolicy] = (None, BindingPolicy())

    def account_permissions(self, name: str) -> PermissionSet | None:
        """The permissions the policy grants service account `name`, for inherit mode."""
        account = self._policy().account(name)
        return None if account is None else account.permissions

    def token_shape(self, run: Run) -> TokenShape:
        """What the policy in force adds to `run`'s step tokens: the subject template of the
        delegator that started its chain, else of its org, else the policy-wide one, else
        the built-in default; custom claims and session tags of its org, else policy-wide."""
        federation = self._policy().federation
        org = federation.orgs.get(run.pipeline.org, TokenClaims())
        default = federation.default
        root = run.root_account()
        subject, origin = federation.delegators.get(root), f"delegator {root}"
        if subject is None:
            subject, origin = org.subject, f"org {run.pipeline.org}"
        if subject is None:
            subject, origin = default.subject, "policy-wide"
        claims = org.claims if org.claims is not None else default.claims
        return TokenShape(
            subject=subject,
            subject_origin=origin,
            claims=claims or (),
            session_tags=org.session_tags or default.session_tags,
        )

    def org_ids(self, pipeline: PipelineRef, ids: PipelineIds) -> PipelineIds:
        """The ids a run of `pipeline` carries: the org id the policy pins for its org filled
        in; PermissionDenied for another id of a pinned org, or another org's pinned id."""
        pinned = self._policy().federation.org_ids
        own = pinned.get(pipeline.org)
        if own is not None and ids.org_id not in ("", own):
            raise PermissionDenied(
                f"org {pipeline.org} has another immutable id in the policy; pipeline_ids.org_id "
                "must be that id or empty"
            )
        if own is None and ids.org_id in pinned.values():
            raise PermissionDenied(
                "pipeline_ids.org_id is the id of another organisation in the policy"
            )
        return ids if own is None or ids.org_id == own else replace(ids, org_id=own)

    def binding_policy(self) -> BindingPolicy:
        """Which tokens and run credentials the policy in force requires bound."""
        policy = self._policy()
        if policy is not self._binding_of[0]:
            required = frozenset(a.name for a in policy.accounts.values() if a.require_binding)
            self._binding_of = (
                policy,
                BindingPolicy(policy.binding.audiences, policy.binding.levels, required),
            )
        return self._binding_of[1]

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
