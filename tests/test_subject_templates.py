"""Issue 20 item 1-2 at load: subject templates, custom claims and AWS session tags are
checked when the policy loads, and `policy check` says why one is refused."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from broker import limits
from broker.policy.file import PolicyError, load_policy
from broker.runs.subjects import (
    ATTRIBUTES,
    BUILT_IN,
    IDS_SUBJECT,
    MAX_SUBJECT_BYTES,
    SubjectTemplate,
    SubjectUnavailable,
    TemplateError,
    check_distinct,
)
from tests.accounts import DELEGATION_TOML, new_account, policy_toml
from tests.cli_support import run_cli


def test_a_template_expands_with_the_runs_values() -> None:
    template = SubjectTemplate.parse("repo:{org_id}/{project:40}:env:{environment:30}")
    subject = template.expand({"org_id": "91824", "project": "web", "environment": "prod"})
    assert subject == "repo:91824/web:env:prod"
    assert template.max_bytes() == 5 + 36 + 1 + 40 + 5 + 30


def test_a_template_that_could_exceed_127_bytes_is_refused_with_the_arithmetic() -> None:
    with pytest.raises(TemplateError, match=r"389 bytes .*\{org\} 128.*at most 127"):
        SubjectTemplate.parse("ci:{org}/{project}/{pipeline}")


def test_the_longest_expansion_of_an_accepted_template_is_at_most_127_bytes() -> None:
    template = SubjectTemplate.parse("o:{org_id}/{project:40}/{pipeline:40}")
    longest = {p.attribute.name: "x" * p.max_chars for p in template.placeholders}
    assert len(template.expand(longest).encode()) == template.max_bytes() <= MAX_SUBJECT_BYTES


def test_a_value_longer_than_its_bound_gets_no_subject_rather_than_a_truncated_one() -> None:
    template = SubjectTemplate.parse("o:{org_id}/{pipeline:10}")
    with pytest.raises(SubjectUnavailable, match="pipeline of at most 10"):
        template.expand({"org_id": "1", "pipeline": "a-very-long-name"})
    with pytest.raises(SubjectUnavailable, match="needs org_id"):
        template.expand({"pipeline": "deploy"})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("s:{step}:{org}", "':', which a step may contain"),
        ("o:{org_id}/{step:20}/{pipeline:20}", "'/', which a step may contain"),
        ("o:{org}.{project:20}", "'.', which a org may contain"),
        ("o:{org_id}{pipeline_id}", "without a separator"),
        ("o:{org_id}/{pipeline-id}", "unknown placeholder"),
        ("o:{org_id}/{secret}", "unknown placeholder"),
        ("o:{org_id}/{pipeline:0}", "the bound must be 1 to 128"),
        ("o:{org_id}/{pipeline:129}", "the bound must be 1 to 128"),
        ("p:{project:40}", "must begin with {org} or {org_id}"),
        ("o:{org_id}/{pipeline", "unmatched"),
        ("o {org_id}", "printable ASCII without spaces"),
    ],
)
def test_ambiguous_unknown_or_unanchored_templates_are_refused(text: str, why: str) -> None:
    with pytest.raises(TemplateError) as refused:
        SubjectTemplate.parse(text)
    assert why in str(refused.value)


def test_each_attributes_characters_are_exactly_what_its_request_limit_allows() -> None:
    """The ambiguity check reasons over `Attribute.chars`: it must match broker.limits."""
    rules = {
        "org": limits.SEGMENT,
        "org_id": limits.IMMUTABLE_ID,
        "environment": limits.ENVIRONMENT,
        "step": limits.STEP,
        "account": limits.ACCOUNT,
    }
    for name, rule in rules.items():
        accepted = {c for c in string.printable if rule.problem("a" + c) is None}
        assert accepted == set(ATTRIBUTES[name].chars), name
        assert ATTRIBUTES[name].max_chars == rule.max_chars


def test_an_org_name_can_never_run_into_the_text_after_it() -> None:
    """Else `c:{org}` for org acmex and `c:{org}x` for org acme would both be `c:acmex`."""
    with pytest.raises(TemplateError, match="'x', which a org may contain"):
        SubjectTemplate.parse("c:{org:40}x")
    assert SubjectTemplate.parse("c:{org:40}:x").expand({"org": "acme"}) == "c:acme:x"


def test_templates_that_could_give_two_orgs_one_subject_are_refused_together() -> None:
    by_name = SubjectTemplate.parse("ci:{org:40}/{pipeline_id}")
    by_id = SubjectTemplate.parse("ci:{org_id}/{pipeline_id}")
    overlapping = SubjectTemplate.parse("ci:x{org:40}/{pipeline_id}")
    assert check_distinct([by_name, SubjectTemplate.parse("ci:{org:40}:{pipeline_id}")]) == []
    assert "one has {org_id}, the other {org}" in check_distinct([by_name, by_id])[0]
    assert "is the start of" in check_distinct([by_name, overlapping])[0]
    assert check_distinct(BUILT_IN) == []


def test_the_default_ids_subject_fits_every_relying_party() -> None:
    assert IDS_SUBJECT.max_bytes() == 3 * 36 + 6 <= MAX_SUBJECT_BYTES


def _policy(tmp_path: Path, federation: str) -> Path:
    accounts = [
        new_account("ci", ["orchestrator"]),
        new_account("deploy-portal", ["delegator"], extra_toml=DELEGATION_TOML),
    ]
    path = tmp_path / "policy.toml"
    path.write_text(policy_toml(accounts) + "\n" + federation)
    return path


def _problems(tmp_path: Path, federation: str) -> list[str]:
    with pytest.raises(PolicyError) as refused:
        load_policy(_policy(tmp_path, federation))
    return list(refused.value.problems)


VALID = """\
[federation]
subject = "ids:{org_id}/{project_id}/{pipeline_id}"

[federation.claims.team]
from = "input.team"
pattern = "[a-z][a-z0-9-]{0,31}"
max_length = 32

[federation.aws_session_tags]
audiences = ["sts.amazonaws.com"]
tags = { OrgId = "org_id", Team = "team", Env = "environment" }
transitive = ["OrgId"]

[federation.orgs.acme]
subject = "acme:{org:30}:{project:40}:{pipeline:40}"

[federation.delegators.deploy-portal]
subject = "portal:{org_id}:{pipeline_id}:{environment:40}"
"""


def test_a_valid_federation_table_loads_into_the_policy(tmp_path: Path) -> None:
    policy = load_policy(_policy(tmp_path, VALID))
    federation = policy.federation
    assert federation.default.subject == IDS_SUBJECT
    assert federation.orgs["acme"].subject is not None
    assert federation.delegators["deploy-portal"].needs() == (
        "org_id",
        "pipeline_id",
        "environment",
    )
    (team,) = federation.default.claims or ()
    assert (team.name, team.source, team.max_chars) == ("team", "input.team", 32)
    tags = federation.default.session_tags
    assert tags is not None and tags.transitive == ("OrgId",)


@pytest.mark.parametrize(
    ("federation", "where", "why"),
    [
        ('[federation]\nsubject = "p:{project:20}"', "federation.subject", "must begin with {org}"),
        ('[federation.orgs.acme]\nsubject = "a:{org}:{step}"', "orgs.acme.subject", "259 bytes"),
        (
            '[federation.delegators.ci]\nsubject = "c:{org_id}"',
            "federation.delegators.ci",
            "no account with role delegator",
        ),
        ('[federation.claims.sub]\nfrom = "org"', "claims.sub", "JWT or broker claim"),
        ('[federation.claims.org_id]\nfrom = "org"', "claims.org_id", "JWT or broker claim"),
        ('[federation.claims.Team]\nfrom = "input.team"', "claims.Team", "pattern or an enum"),
        ('[federation.claims.team]\nfrom = "secrets"', "claims.team.from", "'input.NAME'"),
        (
            '[federation.claims.team]\nfrom = "input.t"\npattern = "(["',
            "claims.team.pattern",
            "not a regular expression",
        ),
        (
            '[federation.claims.team]\nfrom = "input.t"\nenum = ["a"]\nmax_length = 5000',
            "claims.team.max_length",
            "1 to 1024",
        ),
        (
            '[federation.aws_session_tags]\naudiences = ["sts"]\ntags = { "aws:Org" = "org" }',
            "tags.aws:Org",
            "AWS reserves tag keys",
        ),
        (
            '[federation.aws_session_tags]\naudiences = ["sts"]\ntags = { A = "org", a = "org" }',
            "tags.a",
            "case-insensitive",
        ),
        (
            '[federation.aws_session_tags]\naudiences = ["sts"]\ntags = { Org = "nothing" }',
            "tags.Org",
            "must name a custom claim",
        ),
        (
            '[federation.claims.team]\nfrom = "input.team"\npattern = ".*"\nmax_length = 300\n'
            '[federation.aws_session_tags]\naudiences = ["sts"]\ntags = { Team = "team" }',
            "tags.Team",
            "AWS accepts tag values of at most 256",
        ),
        (
            '[federation.aws_session_tags]\naudiences = ["sts"]\ntags = { Org = "org" }\n'
            'transitive = ["Env"]',
            "aws_session_tags.transitive",
            "tag keys from tags",
        ),
        (
            '[federation.orgs.acme]\nsubject = "run:{org_id}"',
            "federation.subject",
            "two organisations could share a subject",
        ),
    ],
)
def test_each_federation_mistake_is_reported_where_it_is(
    tmp_path: Path, federation: str, where: str, why: str
) -> None:
    problems = _problems(tmp_path, federation)
    assert any(where in p and why in p for p in problems), problems


def test_with_a_policy_wide_subject_the_built_in_subjects_no_longer_constrain_prefixes(
    tmp_path: Path,
) -> None:
    """`run:{org_id}` clashes with the built-in `run:{org}` only while that is in use."""
    clash = '[federation.orgs.acme]\nsubject = "run:{org_id}"\n'
    assert any("could share a subject" in p for p in _problems(tmp_path, clash))
    default = '[federation]\nsubject = "ci:{org_id}/{pipeline_id}"\n'
    assert load_policy(_policy(tmp_path, default + clash)).federation.orgs["acme"].subject


def test_an_org_id_is_pinned_to_one_org_only(tmp_path: Path) -> None:
    pinned = '[federation.orgs.acme]\norg_id = "91824"\n[federation.orgs.beta]\norg_id = "91824"\n'
    assert any("already the id of org 'acme'" in p for p in _problems(tmp_path, pinned))
    malformed = '[federation.orgs.acme]\norg_id = "9/1"\n'
    assert any("orgs.acme.org_id: 1-36 letters" in p for p in _problems(tmp_path, malformed))
    policy = load_policy(_policy(tmp_path, '[federation.orgs.acme]\norg_id = "91824"\n'))
    assert dict(policy.federation.org_ids) == {"acme": "91824"}


def test_more_than_50_session_tags_are_refused(tmp_path: Path) -> None:
    tags = ", ".join(f'T{i} = "org"' for i in range(51))
    federation = f'[federation.aws_session_tags]\naudiences = ["sts"]\ntags = {{ {tags} }}'
    assert any("at most 50 tags" in p for p in _problems(tmp_path, federation))


def test_policy_check_prints_why_a_template_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _policy(tmp_path, '[federation.orgs.acme]\nsubject = "a:{step}:{org}"\n')
    checked = run_cli(capsys, "policy", "check", str(policy))
    assert checked.code == 2
    assert "federation.orgs.acme.subject: 'a:{step}:{org}' can expand to 259 bytes" in checked.out
    assert "':', which a step may contain: the subject would be ambiguous" in checked.out


def test_policy_check_lists_the_subject_templates_in_force_with_their_longest_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _policy(tmp_path, VALID)
    checked = run_cli(capsys, "policy", "check", str(policy))
    assert checked.code == 0
    lines = checked.out.splitlines()
    assert (
        "subject of org acme: acme:{org:30}:{project:40}:{pipeline:40} (at most 117 bytes)" in lines
    )
    summary = run_cli(capsys, "policy", "check", str(policy), "--json").json()
    assert summary["subjects"][0] == {
        "for": "delegator deploy-portal",
        "template": "portal:{org_id}:{pipeline_id}:{environment:40}",
        "max_bytes": 121,
    }
    assert summary["subjects"][-1]["for"] == "every other org"
