"""What a step token says besides the broker's own claims: its `sub` (by template, see
`broker.runs.subjects`), the custom claims the policy lets through, and AWS session tags.

Nothing reaches a token unless the policy names it: a custom claim takes its value from one
run input (`input.NAME`, set by the orchestrator at StartRun) or one run attribute, under a
name the policy gives, and only if the value passes the claim's rules (pattern, enum, length).
A run without that input gets no such claim; a run whose input breaks the rules gets no token
(FailedPrecondition names the claim and the rule, never the value).

AWS session tags (`https://aws.amazon.com/tags`, read by AssumeRoleWithWebIdentity) are
emitted only for the audiences the policy lists, each tag from a claim of the same token.
The policy is checked at load against AWS's limits (tag keys ≤ 128 characters, values ≤ 256,
at most 50 tags); values are checked again here against AWS's character set.

A pure domain module: the policy builds `TokenShape`s, `Issuance` applies them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import FailedPrecondition
from broker.runs.model import Run
from broker.runs.subjects import IDS_SUBJECT, SubjectTemplate, SubjectUnavailable

AWS_TAGS_CLAIM = "https://aws.amazon.com/tags"
MAX_AWS_TAGS = 50
MAX_AWS_TAG_KEY = 128
MAX_AWS_TAG_VALUE = 256
# AWS tag keys and values: letters, numbers, spaces and _ . : / = + - @ (IAM User Guide,
# "Tagging IAM resources" — rules for tagging). The broker emits no spaces.
AWS_TAG_TEXT = re.compile(r"^[\w.:/=+\-@]*$")
CLAIM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
INPUT_SOURCE = "input."
DEFAULT_CLAIM_MAX = 256
MAX_CLAIM_MAX = 1024

# Claims a policy can never define: those of JWT/OIDC (RFC 7519, OIDC Core, RFC 8693,
# RFC 9068) and every claim the broker sets itself.
RESERVED_CLAIMS = frozenset(
    {
        "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "typ", "cty", "azp", "nonce",
        "auth_time", "acr", "amr", "at_hash", "c_hash", "sid", "cnf", "scope", "client_id",
        "may_act", "act", "roles", "groups", "entitlements", "email", "email_verified",
        "name", "run_id", "org", "project", "pipeline", "org_id", "project_id", "pipeline_id",
        "environment", "triggered_via", "on_behalf_of", "step", "permissions",
    }
)  # fmt: skip


def run_attributes(run: Run, step: str) -> dict[str, str]:
    """The run attributes templates and claims may use, those that are set."""
    values = {
        "org": run.pipeline.org,
        "project": run.pipeline.project,
        "pipeline": run.pipeline.pipeline,
        **run.ids.as_dict(),
        "environment": run.environment,
        "account": run.root_account(),
        "run_id": run.run_id,
        "step": step,
    }
    return {name: value for name, value in values.items() if value}


@dataclass(frozen=True)
class ClaimRule:
    """One custom claim: its name, where its value comes from and what values pass."""

    name: str
    source: str  # "input.NAME" or a run attribute (broker.runs.subjects.ATTRIBUTES)
    max_chars: int = DEFAULT_CLAIM_MAX
    pattern: re.Pattern[str] | None = None
    allowed: frozenset[str] = frozenset()

    def value(self, run: Run, attributes: Mapping[str, str]) -> str | None:
        """The claim's value for `run`, None when the run has none; FailedPrecondition when
        the value breaks the claim's rules."""
        if self.source.startswith(INPUT_SOURCE):
            value = run.inputs.get(self.source.removeprefix(INPUT_SOURCE))
        else:
            value = attributes.get(self.source)
        if not value:
            return None
        if len(value) > self.max_chars:
            self._refuse(f"is longer than {self.max_chars} characters")
        if self.allowed and value not in self.allowed:
            self._refuse("is not one of the values the policy allows")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            self._refuse(f"does not match the policy's pattern {self.pattern.pattern!r}")
        return value

    def _refuse(self, why: str) -> None:
        raise FailedPrecondition(
            f"claim {self.name!r}: the run's {self.source} {why}; no token carries it"
        )


@dataclass(frozen=True)
class SessionTags:
    """AWS session tags for tokens of some audiences: tag key → the claim it copies."""

    audiences: frozenset[str]
    tags: tuple[tuple[str, str], ...]
    transitive: tuple[str, ...] = ()

    def claim(self, claims: Mapping[str, Any]) -> dict[str, Any] | None:
        principal_tags = {}
        for key, claim in self.tags:
            value = claims.get(claim)
            if not isinstance(value, str) or not value:
                continue  # a run without the value has no such tag (AWS conditions fail closed)
            if len(value) > MAX_AWS_TAG_VALUE or not AWS_TAG_TEXT.match(value):
                raise FailedPrecondition(
                    f"session tag {key!r}: the value of claim {claim!r} is not one AWS accepts "
                    f"(at most {MAX_AWS_TAG_VALUE} letters, digits or _ . : / = + - @)"
                )
            principal_tags[key] = [value]
        if not principal_tags:
            return None
        transitive = [key for key in self.transitive if key in principal_tags]
        return {"principal_tags": principal_tags, "transitive_tag_keys": transitive}


@dataclass(frozen=True)
class TokenShape:
    """What the policy in force adds to a run's step tokens."""

    subject: SubjectTemplate | None = None  # None: the built-in default (`default_subject`)
    subject_origin: str = "the built-in default"  # for messages: whose template it is
    claims: tuple[ClaimRule, ...] = ()
    session_tags: SessionTags | None = None

    def claims_for(self, run: Run, step: str, audience: str) -> dict[str, Any]:
        """`sub`, the custom claims and the session tags of a step token of `run` for
        `audience`; FailedPrecondition when the run cannot have one under this policy."""
        attributes = run_attributes(run, step)
        claims: dict[str, Any] = {"sub": self._subject(run, attributes)}
        for rule in self.claims:
            value = rule.value(run, attributes)
            if value is not None:
                claims[rule.name] = value
        if self.session_tags is not None and audience in self.session_tags.audiences:
            tags = self.session_tags.claim({**attributes, **claims})
            if tags is not None:
                claims[AWS_TAGS_CLAIM] = tags
        return claims

    def _subject(self, run: Run, attributes: Mapping[str, str]) -> str:
        if self.subject is None:
            return default_subject(run, attributes)
        try:
            return self.subject.expand(attributes)
        except SubjectUnavailable as exc:
            raise FailedPrecondition(
                f"the subject template {self.subject.text!r} ({self.subject_origin}) {exc}; "
                f"run {run.run_id} can get no step token under it"
            ) from None


def default_subject(run: Run, attributes: Mapping[str, str]) -> str:
    """Without a template: the immutable ids when the run has all three, else the run."""
    if run.ids.org_id and run.ids.project_id and run.ids.pipeline_id:
        return IDS_SUBJECT.expand(attributes)
    return run.subject()


DEFAULT_SHAPE = TokenShape()
