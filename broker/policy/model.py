"""The policy: which service accounts exist, how each proves who it is, and what it may do.

A `Policy` is immutable. Reloading builds a new one and swaps the reference
(`broker.policysource`), so a call in flight decides against one consistent policy.
Parsing and validation live in `broker.policyfile`; this module has no I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from broker.runs.claims import ClaimRule, SessionTags
from broker.runs.model import SEGMENT_PATTERN, PipelineRef
from broker.runs.permissions import PermissionSet
from broker.runs.subjects import SubjectTemplate

WILDCARD = "*"
ACCOUNT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
DEFAULT_MAX_CHAIN_DEPTH = 4
# Algorithms a service account may sign assertions with (RFC 8725 §3.1: an explicit list).
ASSERTION_ALGORITHMS = ("ES256", "EdDSA", "RS256")
# Algorithms the broker signs tokens with; the policy picks one per audience.
TOKEN_ALGORITHMS = ("ES256", "RS256")


class Role(enum.Enum):
    ORCHESTRATOR = "orchestrator"
    DELEGATOR = "delegator"
    AUDITOR = "auditor"
    VERIFIER = "verifier"
    ADMIN = "admin"


@dataclass(frozen=True)
class Scope:
    """ORG/PROJECT/PIPELINE where any segment may be "*" (e.g. "acme/*/*")."""

    org: str
    project: str
    pipeline: str

    @classmethod
    def parse(cls, text: str) -> Scope:
        parts = text.split("/")
        if len(parts) != 3 or not all(p == WILDCARD or SEGMENT_PATTERN.match(p) for p in parts):
            raise ValueError(
                f"{text!r} is not ORG/PROJECT/PIPELINE with each part a name or '*' "
                "(e.g. 'acme/payments/*')"
            )
        return cls(*parts)

    def covers(self, target: PipelineRef) -> bool:
        """True when every pipeline `target` may denote lies inside this scope.

        A "*" in the target (a query over several pipelines) is covered only by "*".
        """
        return all(
            mine in (WILDCARD, theirs)
            for mine, theirs in (
                (self.org, target.org),
                (self.project, target.project),
                (self.pipeline, target.pipeline),
            )
        )

    def __str__(self) -> str:
        return f"{self.org}/{self.project}/{self.pipeline}"


EVERYTHING = PipelineRef(WILDCARD, WILDCARD, WILDCARD)


@dataclass(frozen=True)
class AccountKey:
    """A public key a service account signs its assertions with."""

    kid: str
    alg: str
    public_key: Any  # a cryptography public key object, as PyJWT accepts it
    thumbprint: str  # SHA-256 of the SubjectPublicKeyInfo, safe to show


@dataclass(frozen=True)
class IdentityProvider:
    """An OIDC provider whose ID tokens a delegator may present for a person."""

    issuer: str
    audience: str
    jwks_file: str = ""
    jwks_url: str = ""
    jwks_json: str = ""  # the content of jwks_file, read and checked at load


class ChildRuns(enum.Enum):
    """Where a child run of a delegator's chain may run, besides inside the delegator's scopes."""

    IN_SCOPE = "in_scope"  # anywhere in the scopes of the delegator that started the chain
    SAME_PROJECT = "same_project"  # and in its parent's org/project
    SAME_PIPELINE = "same_pipeline"  # and in its parent's very pipeline


@dataclass(frozen=True)
class Delegation:
    """For whom a delegator may act, and how it may establish who that is."""

    identity_providers: tuple[IdentityProvider, ...] = ()
    user_domains: frozenset[str] = frozenset()
    asserted_identities: bool = False
    asserted_domains: frozenset[str] = frozenset()
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    child_runs: ChildRuns = ChildRuns.IN_SCOPE


@dataclass(frozen=True)
class ServiceAccount:
    name: str
    roles: frozenset[Role]
    scopes: tuple[Scope, ...]
    keys: tuple[AccountKey, ...] = ()
    certificate_sans: frozenset[str] = frozenset()
    # Granted by IssueToken's inherit_from_service_account (intersected with the ceiling).
    permissions: PermissionSet = field(default_factory=lambda: PermissionSet.of({}))
    delegation: Delegation = field(default_factory=Delegation)
    # Every run credential of a run whose chain this account started, and every step token
    # of such a run, must be sender-constrained (DPoP or mTLS).
    require_binding: bool = False

    def covers(self, target: PipelineRef) -> bool:
        return any(scope.covers(target) for scope in self.scopes)

    def scope_text(self) -> str:
        return ", ".join(str(s) for s in self.scopes) or "none"


@dataclass(frozen=True)
class TokenClaims:
    """What step tokens of some runs say (the `[federation]` tables): each part unset
    (None) falls back to the policy-wide table, then to the built-in default."""

    subject: SubjectTemplate | None = None
    claims: tuple[ClaimRule, ...] | None = None
    session_tags: SessionTags | None = None


@dataclass(frozen=True)
class Federation:
    """`[federation]`: the policy-wide token claims, and per org (by name) and per delegator
    (for the runs of its chains: only a subject)."""

    default: TokenClaims = field(default_factory=TokenClaims)
    orgs: Mapping[str, TokenClaims] = field(default_factory=lambda: MappingProxyType({}))
    delegators: Mapping[str, SubjectTemplate] = field(default_factory=lambda: MappingProxyType({}))
    # Immutable org ids the policy pins, by org name (each id pinned to one org only).
    org_ids: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class BindingRequirements:
    """The policy's `[binding]` table: step tokens for these audiences, and step tokens with a
    permission at or above one of these levels (on the resource's ladder), must be bound."""

    audiences: frozenset[str] = frozenset()
    levels: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AudienceRule:
    """What the policy says about tokens for the audiences `pattern` matches: an exact
    audience, or a prefix ending in "*" (e.g. "https://iam.googleapis.com/*")."""

    pattern: str
    algorithm: str

    def matches(self, audience: str) -> bool:
        if self.pattern.endswith(WILDCARD):
            return audience.startswith(self.pattern[:-1])
        return audience == self.pattern


@dataclass(frozen=True)
class Policy:
    accounts: Mapping[str, ServiceAccount]
    source: str = ""
    sha256: str = ""
    account_by_san: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    federation: Federation = field(default_factory=Federation)
    binding: BindingRequirements = field(default_factory=BindingRequirements)
    # Most specific first: exact audiences, then the longest prefixes.
    audiences: tuple[AudienceRule, ...] = ()

    def audience_rule(self, audience: str) -> AudienceRule | None:
        """The rule for `audience`: its exact entry, else the longest matching prefix."""
        return next((rule for rule in self.audiences if rule.matches(audience)), None)

    def token_algorithms(self) -> frozenset[str]:
        """Every algorithm the policy names for some audience."""
        return frozenset(rule.algorithm for rule in self.audiences)

    def account(self, name: str) -> ServiceAccount | None:
        return self.accounts.get(name)

    def account_for_certificate(self, sans: tuple[str, ...]) -> ServiceAccount | None:
        """The account one of a verified client certificate's SANs is mapped to."""
        for san in sans:
            name = self.account_by_san.get(san)
            if name is not None:
                return self.accounts.get(name)
        return None
