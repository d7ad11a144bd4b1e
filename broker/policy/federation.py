"""The `[federation]` tables of a policy file: what step tokens say to relying parties
(docs/federation.md has the recipes).

    [federation]
    subject = "ids:{org_id}/{project_id}/{pipeline_id}"   # policy-wide (optional)

    [federation.claims.team]                               # a custom claim `team`
    from = "input.team"                                    # a run input, or a run attribute
    pattern = "[a-z][a-z0-9-]{0,31}"                       # and/or enum = [...]
    max_length = 32                                        # default 256, at most 1024

    [federation.aws_session_tags]                          # https://aws.amazon.com/tags
    audiences = ["sts.amazonaws.com"]
    tags = { OrgId = "org_id", Team = "team" }             # tag key = claim it copies
    transitive = ["OrgId"]

    [federation.orgs.acme]                                 # per org: any of the three above
    org_id = "91824"                                       # and its pinned immutable id
    subject = "acme:{org:30}:{project:40}:{pipeline:40}"

    [federation.delegators.deploy-portal]                  # per delegator: a subject only
    subject = "portal:{org_id}:{pipeline_id}:{environment}"

Everything is checked at load and each problem reported with its key path: templates
(`broker.runs.subjects`), claim names (none of JWT's or the broker's own), value rules,
AWS's limits on tags, and that no two organisations can ever share a subject.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from broker import limits
from broker.policy.model import Federation, Role, ServiceAccount, TokenClaims
from broker.runs import claims as tokenclaims
from broker.runs.claims import ClaimRule, SessionTags
from broker.runs.model import SEGMENT_PATTERN
from broker.runs.subjects import (
    ATTRIBUTES,
    BUILT_IN,
    SubjectTemplate,
    TemplateError,
    check_distinct,
)

FEDERATION_KEYS = ("subject", "claims", "aws_session_tags", "orgs", "delegators")
ORG_KEYS = ("org_id", "subject", "claims", "aws_session_tags")
DELEGATOR_KEYS = ("subject",)
CLAIM_KEYS = ("from", "pattern", "enum", "max_length")
TAGS_KEYS = ("audiences", "tags", "transitive")
MAX_PATTERN = 256
MAX_ENUM = 64


class Reporter(Protocol):
    def problem(self, where: str, text: str) -> None: ...

    def known_keys(
        self, table: Mapping[str, Any], allowed: tuple[str, ...], where: str
    ) -> None: ...


def parse_federation(
    value: Any, accounts: Mapping[str, ServiceAccount], out: Reporter
) -> Federation:
    where = "federation"
    if not isinstance(value, dict):
        out.problem(where, "must be a table")
        return Federation()
    out.known_keys(value, FEDERATION_KEYS, where)
    default = _token_claims(value, where, None, out)
    orgs: dict[str, TokenClaims] = {}
    org_ids: dict[str, str] = {}
    for org, table in _tables(value.get("orgs", {}), f"{where}.orgs", out):
        if not SEGMENT_PATTERN.match(org):
            out.problem(f"{where}.orgs.{org}", "is not an org name (1-128 letters, digits, ._-)")
        out.known_keys(table, ORG_KEYS, f"{where}.orgs.{org}")
        orgs[org] = _token_claims(table, f"{where}.orgs.{org}", default, out)
        if "org_id" in table:
            _pin(org, table["org_id"], org_ids, f"{where}.orgs.{org}.org_id", out)
    delegators: dict[str, SubjectTemplate] = {}
    for name, table in _tables(value.get("delegators", {}), f"{where}.delegators", out):
        at = f"{where}.delegators.{name}"
        account = accounts.get(name)
        if account is None or Role.DELEGATOR not in account.roles:
            out.problem(at, "names no account with role delegator in this policy")
        out.known_keys(table, DELEGATOR_KEYS, at)
        template = _subject(table.get("subject"), f"{at}.subject", out)
        if template is None and "subject" not in table:
            out.problem(f"{at}.subject", "required: the subject template of its runs")
        if template is not None:
            delegators[name] = template
    federation = Federation(
        default, MappingProxyType(orgs), MappingProxyType(delegators), MappingProxyType(org_ids)
    )
    for problem in check_distinct(_templates_in_use(federation)):
        out.problem(f"{where}.subject", f"two organisations could share a subject: {problem}")
    return federation


def _pin(org: str, org_id: Any, pinned: dict[str, str], where: str, out: Reporter) -> None:
    """`org_id = "…"`: the org's immutable id; StartRun may send no other for it, and no other
    org may claim it."""
    if not isinstance(org_id, str) or not org_id or limits.IMMUTABLE_ID.problem(org_id):
        out.problem(where, limits.IMMUTABLE_ID.rule)
        return
    owner = next((name for name, known in pinned.items() if known == org_id), None)
    if owner is not None:
        out.problem(where, f"{org_id!r} is already the id of org {owner!r}: an id names one org")
        return
    pinned[org] = org_id


def _templates_in_use(federation: Federation) -> Iterable[SubjectTemplate]:
    yield from (t.subject for t in federation.orgs.values() if t.subject is not None)
    yield from federation.delegators.values()
    if federation.default.subject is not None:
        yield federation.default.subject
    else:
        yield from BUILT_IN  # the subjects of the runs no template covers


def _tables(value: Any, where: str, out: Reporter) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(value, dict) or not all(isinstance(t, dict) for t in value.values()):
        out.problem(where, "must be a table of tables, e.g. [" + where + ".NAME]")
        return []
    return list(value.items())


def _token_claims(
    table: Mapping[str, Any], where: str, default: TokenClaims | None, out: Reporter
) -> TokenClaims:
    subject = _subject(table.get("subject"), f"{where}.subject", out)
    rules = None
    if "claims" in table:
        rules = _claims(table["claims"], f"{where}.claims", out)
    effective = rules if rules is not None else (default.claims if default else None) or ()
    tags = None
    if "aws_session_tags" in table:
        tags = _session_tags(table["aws_session_tags"], f"{where}.aws_session_tags", effective, out)
    return TokenClaims(subject, rules, tags)


def _subject(value: Any, where: str, out: Reporter) -> SubjectTemplate | None:
    if value is None:
        return None
    if not isinstance(value, str):
        out.problem(where, "must be a template string, e.g. 'ids:{org_id}/{pipeline_id}'")
        return None
    try:
        return SubjectTemplate.parse(value)
    except TemplateError as exc:
        out.problem(where, f"{value!r} {exc}")
        return None


def _claims(value: Any, where: str, out: Reporter) -> tuple[ClaimRule, ...]:
    rules = []
    for name, table in _tables(value, where, out):
        rule = _claim(name, table, f"{where}.{name}", out)
        if rule is not None:
            rules.append(rule)
    return tuple(rules)


def _claim(name: str, table: Mapping[str, Any], where: str, out: Reporter) -> ClaimRule | None:
    out.known_keys(table, CLAIM_KEYS, where)
    ok = True
    if not tokenclaims.CLAIM_NAME.match(name):
        out.problem(where, "claim names are 1-64 letters, digits or '_', starting with a letter")
        ok = False
    elif name.lower() in tokenclaims.RESERVED_CLAIMS:
        out.problem(where, f"{name!r} is a JWT or broker claim; the policy cannot set it")
        ok = False
    source = table.get("from")
    if not _is_source(source):
        known = ", ".join(ATTRIBUTES)
        out.problem(f"{where}.from", f"required: 'input.NAME' (a run input) or one of: {known}")
        ok = False
    max_chars = table.get("max_length", tokenclaims.DEFAULT_CLAIM_MAX)
    if isinstance(max_chars, bool) or not isinstance(max_chars, int):
        max_chars = 0
    if not 1 <= max_chars <= tokenclaims.MAX_CLAIM_MAX:
        out.problem(f"{where}.max_length", f"must be 1 to {tokenclaims.MAX_CLAIM_MAX}")
        ok = False
    pattern = _pattern(table.get("pattern"), f"{where}.pattern", out)
    allowed = _enum(table.get("enum"), max_chars, f"{where}.enum", out)
    if isinstance(pattern, bool) or allowed is None:
        return None
    from_input = isinstance(source, str) and source.startswith(tokenclaims.INPUT_SOURCE)
    if from_input and pattern is None and not allowed:
        out.problem(where, "a claim from a run input needs a pattern or an enum of values")
        ok = False
    if not ok:
        return None
    assert isinstance(source, str)
    return ClaimRule(name, source, max_chars, pattern, allowed)


def _is_source(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith(tokenclaims.INPUT_SOURCE):
        key = value.removeprefix(tokenclaims.INPUT_SOURCE)
        return bool(key) and limits.INPUT_KEY.problem(key) is None
    return value in ATTRIBUTES


def _pattern(value: Any, where: str, out: Reporter) -> re.Pattern[str] | bool | None:
    """The compiled pattern, None when there is none, False when it is invalid."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_PATTERN:
        out.problem(where, f"must be a regular expression of 1 to {MAX_PATTERN} characters")
        return False
    try:
        return re.compile(value)
    except re.error as exc:
        out.problem(where, f"is not a regular expression: {exc}")
        return False


def _enum(value: Any, max_chars: int, where: str, out: Reporter) -> frozenset[str] | None:
    if value is None:
        return frozenset()
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_ENUM
        or not all(isinstance(v, str) and v and limits.is_plain_text(v) for v in value)
    ):
        out.problem(where, f"must be a list of 1 to {MAX_ENUM} non-empty strings")
        return None
    if any(len(v) > max_chars for v in value):
        out.problem(where, f"a value is longer than max_length ({max_chars})")
    return frozenset(value)


def _session_tags(
    value: Any, where: str, claims: tuple[ClaimRule, ...], out: Reporter
) -> SessionTags | None:
    if not isinstance(value, dict):
        out.problem(where, "must be a table with audiences, tags and transitive")
        return None
    out.known_keys(value, TAGS_KEYS, where)
    audiences = value.get("audiences")
    if (
        not isinstance(audiences, list)
        or not audiences
        or not all(isinstance(a, str) and limits.AUDIENCE.problem(a) is None for a in audiences)
    ):
        out.problem(f"{where}.audiences", "required: the token audiences that get the tags")
        audiences = []
    tags = value.get("tags")
    if not isinstance(tags, dict) or not tags:
        out.problem(f"{where}.tags", 'required: a table of TagKey = "claim name"')
        tags = {}
    if len(tags) > tokenclaims.MAX_AWS_TAGS:
        out.problem(f"{where}.tags", f"AWS accepts at most {tokenclaims.MAX_AWS_TAGS} tags")
    # A custom claim of the same name as a run attribute is what the tag copies.
    longest = {name: a.max_chars for name, a in ATTRIBUTES.items()} | {
        rule.name: rule.max_chars for rule in claims
    }
    seen: set[str] = set()
    for key, claim in tags.items():
        _tag(key, claim, longest, seen, f"{where}.tags.{key}", out)
    transitive = value.get("transitive", [])
    if not isinstance(transitive, list) or not all(t in tags for t in transitive):
        out.problem(f"{where}.transitive", "must be a list of tag keys from tags")
        transitive = []
    return SessionTags(
        frozenset(audiences),
        tuple((k, v) for k, v in tags.items() if isinstance(v, str)),
        tuple(transitive),
    )


def _tag(
    key: str, claim: Any, longest: Mapping[str, int], seen: set[str], where: str, out: Reporter
) -> None:
    if not 1 <= len(key) <= tokenclaims.MAX_AWS_TAG_KEY or not tokenclaims.AWS_TAG_TEXT.match(key):
        out.problem(where, "AWS tag keys are 1-128 letters, digits or _ . : / = + - @")
    if key.lower().startswith("aws:"):
        out.problem(where, "AWS reserves tag keys starting with 'aws:'")
    if key.lower() in seen:
        out.problem(where, "AWS tag keys are case-insensitive: this one is given twice")
    seen.add(key.lower())
    if not isinstance(claim, str) or claim not in longest:
        out.problem(where, "must name a custom claim of this table or a run attribute")
    elif longest[claim] > tokenclaims.MAX_AWS_TAG_VALUE:
        out.problem(
            where,
            f"claim {claim!r} may be {longest[claim]} characters long; AWS accepts tag values "
            f"of at most {tokenclaims.MAX_AWS_TAG_VALUE} (set its max_length)",
        )
