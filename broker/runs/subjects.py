"""The `sub` of step tokens, by template: what relying parties (AWS, GCP, Azure, Vault,
Fulcio) match to decide whose pipeline is asking.

A template is text with placeholders, e.g. `repo:{org}/{project}:env:{environment}`. Every
placeholder names an attribute of the run that the holder of a run credential cannot choose
— the org, project and pipeline the orchestrator started the run in, their immutable ids,
the environment, the service account that started the run — except `{step}`, which the step
names itself when it asks for a token (use it only to tell steps apart, never to trust).
`{name:N}` bounds a placeholder to N characters; a run whose value is longer gets no token
from that template (never a truncated, colliding one).

A template is checked once, when the policy loads (`SubjectTemplate.parse`), so that every
token it can ever produce is one a relying party accepts:
- every expansion is at most 127 bytes (GCP's limit for `google.subject`), computed from the
  longest value each placeholder allows (`broker.limits`), or from its `:N` bound;
- the expansion reads back unambiguously: the text after a placeholder starts with a
  character that placeholder's values cannot contain (in `{step}:{org}` the ':' could belong
  to the step, so which org is it?), and two placeholders never touch;
- it starts with fixed text and then the org (`{org}` or `{org_id}`), so that no two
  organisations can share a subject (`check_distinct` compares the templates of a policy).

All values are ASCII, so characters and bytes are the same here.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from broker import limits

MAX_SUBJECT_BYTES = 127  # GCP workload identity: google.subject is at most 127 bytes

_NAME = frozenset(string.ascii_letters + string.digits + "._-")
_ID = frozenset(string.ascii_letters + string.digits + "_-")
_STEP = frozenset(string.ascii_letters + string.digits + "._:/-")
_RUN_ID = frozenset("0123456789abcdefghjkmnpqrstvwxyz-")
_ACCOUNT = frozenset(string.ascii_letters + string.digits + "._@-")


@dataclass(frozen=True)
class Attribute:
    """A run attribute a template (or a custom claim) may use."""

    name: str
    max_chars: int
    chars: frozenset[str]  # every character a value may contain


ATTRIBUTES: Mapping[str, Attribute] = {
    a.name: a
    for a in (
        Attribute("org", limits.SEGMENT.max_chars, _NAME),
        Attribute("project", limits.SEGMENT.max_chars, _NAME),
        Attribute("pipeline", limits.SEGMENT.max_chars, _NAME),
        Attribute("org_id", limits.IMMUTABLE_ID.max_chars, _ID),
        Attribute("project_id", limits.IMMUTABLE_ID.max_chars, _ID),
        Attribute("pipeline_id", limits.IMMUTABLE_ID.max_chars, _ID),
        Attribute("environment", limits.ENVIRONMENT.max_chars, _NAME),
        Attribute("account", limits.ACCOUNT.max_chars, _ACCOUNT),
        Attribute("run_id", limits.RUN_ID.max_chars, _RUN_ID),
        Attribute("step", limits.STEP.max_chars, _STEP),
    )
}
ORG_ATTRIBUTES = ("org", "org_id")

_SEPARATORS = ":/@+=~"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_BOUNDED = re.compile(r"^([a-z_]+)(?::([0-9]{1,3}))?$")


class TemplateError(ValueError):
    """Why a template is refused; the message is shown by `policy check`."""


@dataclass(frozen=True)
class Placeholder:
    attribute: Attribute
    max_chars: int  # the attribute's own limit, or the template's tighter `:N`


@dataclass(frozen=True)
class SubjectTemplate:
    text: str
    # Alternating literal text and placeholders: literal, placeholder, literal, ..., literal.
    literals: tuple[str, ...]
    placeholders: tuple[Placeholder, ...]

    @classmethod
    def parse(cls, text: str) -> SubjectTemplate:
        """The template, checked; TemplateError says what is wrong with it."""
        literals, placeholders = _split(text)
        template = cls(text, tuple(literals), tuple(placeholders))
        problems = []
        for check in (
            template._check_length,
            template._check_unambiguous,
            template._check_starts_with_org,
        ):
            try:
                check()
            except TemplateError as exc:
                problems.append(str(exc))
        if problems:
            raise TemplateError("; and ".join(problems))
        return template

    @property
    def prefix(self) -> str:
        """The fixed text before the org placeholder."""
        return self.literals[0]

    @property
    def org_attribute(self) -> str:
        return self.placeholders[0].attribute.name

    def max_bytes(self) -> int:
        return sum(len(text) for text in self.literals) + sum(
            p.max_chars for p in self.placeholders
        )

    def needs(self) -> tuple[str, ...]:
        return tuple(p.attribute.name for p in self.placeholders)

    def expand(self, values: Mapping[str, str]) -> str:
        """The subject for a run's attribute values; SubjectUnavailable says which is missing
        or too long for this template."""
        out = [self.literals[0]]
        for placeholder, literal in zip(self.placeholders, self.literals[1:], strict=True):
            name = placeholder.attribute.name
            value = values.get(name, "")
            if not value:
                raise SubjectUnavailable(f"needs {name}, which the run was not started with")
            if len(value) > placeholder.max_chars or not set(value) <= placeholder.attribute.chars:
                raise SubjectUnavailable(
                    f"allows {name} of at most {placeholder.max_chars} characters"
                )
            out += [value, literal]
        return "".join(out)

    def _check_length(self) -> None:
        longest = self.max_bytes()
        if longest > MAX_SUBJECT_BYTES:
            parts = " + ".join(f"{{{p.attribute.name}}} {p.max_chars}" for p in self.placeholders)
            raise TemplateError(
                f"can expand to {longest} bytes (fixed text {sum(map(len, self.literals))} + "
                f"{parts}); relying parties such as GCP accept at most {MAX_SUBJECT_BYTES}: "
                "bound placeholders with {name:N} or use the ids"
            )

    def _check_unambiguous(self) -> None:
        """Each placeholder's value ends at the first character it cannot contain, so the
        subject reads back one way only: within the template, and against every other
        template with the same prefix (an org value is never the start of another's)."""
        for i, placeholder in enumerate(self.placeholders):
            separator = self.literals[i + 1]
            name = placeholder.attribute.name
            last = i == len(self.placeholders) - 1
            if not separator and not last:
                following = self.placeholders[i + 1].attribute.name
                raise TemplateError(
                    f"{{{name}}} and {{{following}}} follow each other without a separator: "
                    "where one ends and the next begins cannot be told"
                )
            if separator and separator[0] in placeholder.attribute.chars:
                raise TemplateError(
                    f"the text {separator!r} after {{{name}}} starts with "
                    f"{separator[0]!r}, which a {name} may contain: the subject would be "
                    f"ambiguous (use a character {name} cannot hold, e.g. "
                    + " or ".join(
                        repr(c) for c in _SEPARATORS if c not in placeholder.attribute.chars
                    )
                    + ")"
                )

    def _check_starts_with_org(self) -> None:
        first = self.placeholders[0].attribute.name if self.placeholders else ""
        if first not in ORG_ATTRIBUTES:
            raise TemplateError(
                "must begin with {org} or {org_id} (after any fixed text), so that no two "
                "organisations can ever share a subject"
            )


class SubjectUnavailable(Exception):
    """A run lacks a value its subject template needs (or has one too long for it)."""


def _split(text: str) -> tuple[list[str], list[Placeholder]]:
    if not text or len(text) > 4 * MAX_SUBJECT_BYTES:
        raise TemplateError(f"must be 1 to {4 * MAX_SUBJECT_BYTES} characters")
    literals: list[str] = []
    placeholders: list[Placeholder] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        literals.append(text[position : match.start()])
        placeholders.append(_placeholder(match.group(1)))
        position = match.end()
    literals.append(text[position:])
    for literal in literals:
        if "{" in literal or "}" in literal:
            raise TemplateError("has an unmatched '{' or '}'")
        if not all(c in string.printable and c not in string.whitespace for c in literal):
            raise TemplateError("fixed text must be printable ASCII without spaces")
    return literals, placeholders


def _placeholder(inside: str) -> Placeholder:
    match = _BOUNDED.match(inside)
    attribute = ATTRIBUTES.get(match.group(1)) if match else None
    if match is None or attribute is None:
        known = ", ".join("{" + name + "}" for name in ATTRIBUTES)
        raise TemplateError(f"unknown placeholder {{{limits.shown(inside, 40)}}} (known: {known})")
    bound = int(match.group(2)) if match.group(2) else attribute.max_chars
    if not 1 <= bound <= attribute.max_chars:
        raise TemplateError(
            f"{{{attribute.name}:{bound}}}: the bound must be 1 to {attribute.max_chars}"
        )
    return Placeholder(attribute, bound)


def check_distinct(templates: Iterable[SubjectTemplate]) -> list[str]:
    """Problems that would let two organisations share a subject: templates whose fixed
    prefixes overlap (one is the start of another), or that share a prefix but put different
    org attributes after it (an org named "123" and an org whose id is "123")."""
    problems = []
    by_prefix: dict[str, SubjectTemplate] = {}
    for template in templates:
        known = by_prefix.setdefault(template.prefix, template)
        if known.org_attribute != template.org_attribute:
            problems.append(
                f"{template.text!r} and {known.text!r} both start with {template.prefix!r} but "
                f"then one has {{{template.org_attribute}}}, the other {{{known.org_attribute}}}"
            )
    prefixes = sorted(by_prefix)
    for shorter in prefixes:
        for longer in prefixes:
            if shorter != longer and longer.startswith(shorter):
                problems.append(
                    f"{by_prefix[shorter].text!r} and {by_prefix[longer].text!r}: the fixed text "
                    f"{shorter!r} is the start of {longer!r}, so an org name could make one look "
                    "like the other; give templates distinct prefixes (or the same one)"
                )
    return problems


# The subjects of a policy without templates (docs/federation.md says why):
# - a run started with all three immutable ids: those ids, which survive renames and are
#   never reused (GitHub's `owner@ID` reasoning), at most 3 x 36 + 6 = 114 bytes;
IDS_SUBJECT = SubjectTemplate.parse("ids:{org_id}/{project_id}/{pipeline_id}")


# - otherwise the run itself (`Run.subject`), as before templates: unique per run, matched
#   with a wildcard (`run:acme/web/deploy:*`); up to 418 bytes, too long for GCP's
#   `google.subject` unless names are short — send ids or set a template. Not checked for
#   length (it predates the rule); here for `check_distinct`.
def _unchecked(text: str) -> SubjectTemplate:
    literals, placeholders = _split(text)
    return SubjectTemplate(text, tuple(literals), tuple(placeholders))


LEGACY_SUBJECT = _unchecked("run:{org}/{project}/{pipeline}:{run_id}")
BUILT_IN = (IDS_SUBJECT, LEGACY_SUBJECT)
