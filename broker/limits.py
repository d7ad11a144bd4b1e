"""Limits on everything a caller sends: one table, checked at the edge before anything else.

Every field of every request message has a rule here, keyed by the field's full protobuf
name (`tokenbroker.v1.StartRunRequest.idempotency_key`): strings a maximum length and a
character rule, repeated fields and maps a maximum count, integers and durations a range.
Enums must be defined values and every duration well-formed; those need no entry.
`broker.api.validation` walks each request against this table; a test checks that the table
covers every field of the request descriptors and nothing else, and that
`protos/tokenbroker/v1/LIMITS.md` (written by `make limits-doc` from `markdown()`) is current.
The domain re-checks what it relies on.

Also here: how caller-supplied text may appear in messages and logs (`shown`), and how text
is made safe to render for people (`printable`) — one helper each, used everywhere.

A pure value module: no gRPC, no protobuf.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

PACKAGE = "tokenbroker.v1"

# Characters never allowed in names and free text: C0/C1 controls (NUL, newline, ESC …),
# line and paragraph separators, and the bidirectional overrides that reorder what a reader
# sees. Text containing them could forge a line of an attribution or a table row.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")

# RFC 5322 dot-atom local part (no quoted strings, no comments) and a DNS host name.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"^{_ATEXT}(?:\.{_ATEXT})*$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")
MAX_EMAIL = 254
MAX_EMAIL_LOCAL = 64

MAX_SHOWN = 64
DEFAULT_MAX_REQUEST_BYTES = 256 * 1024
MAX_REPLY_BYTES = 4 * 1024 * 1024  # what a default gRPC client accepts
MAX_PAGE_BYTES = 2 * 1024 * 1024  # runs per ListRuns page, encoded


@dataclass(frozen=True)
class Text:
    """A string field: at most `max_chars` characters; when non-empty, `pattern` must match
    the whole value (identifiers), or else the value must be `text` (no control characters),
    or `opaque` (anything but NUL, e.g. a token the broker parses and answers about)."""

    max_chars: int
    rule: str
    pattern: re.Pattern[str] | None = None
    kind: str = "pattern"  # "pattern", "text", "email" or "opaque"
    required: bool = False

    def problem(self, value: str) -> str | None:
        """The rule `value` breaks, or None. An empty value is left to the domain (required?)."""
        if not value:
            return None
        if len(value) > self.max_chars:
            return self.rule
        if self.kind == "pattern":
            assert self.pattern is not None
            return None if self.pattern.fullmatch(value) else self.rule
        if self.kind == "email":
            return None if parse_email(value) is not None else self.rule
        if self.kind == "text":
            return None if is_plain_text(value) else self.rule
        return None if "\x00" not in value else self.rule


@dataclass(frozen=True)
class Items:
    """A repeated field or map: at most `max_items` entries."""

    max_items: int
    min_items: int = 0

    @property
    def rule(self) -> str:
        if self.min_items:
            return f"{self.min_items} to {self.max_items} entries"
        return f"at most {self.max_items} entries"

    @property
    def required(self) -> bool:
        return self.min_items > 0


@dataclass(frozen=True)
class Range:
    """An integer field: `low` ≤ value ≤ `high` (0 where it means "default" is included)."""

    low: int
    high: int

    @property
    def required(self) -> bool:
        return False

    @property
    def rule(self) -> str:
        return f"must be between {self.low} and {self.high}"


@dataclass(frozen=True)
class Seconds:
    """A google.protobuf.Duration field: `low` ≤ seconds ≤ `high` when set."""

    low: float
    high: float

    @property
    def required(self) -> bool:
        return False

    @property
    def rule(self) -> str:
        return f"must be between {self.low:g}s and {self.high:g}s ({_span(self.high)})"


def _span(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Present:
    """A message field that must be set (its own fields have their own rules)."""

    rule: str = "required"
    required: bool = True


Rule = Text | Items | Range | Seconds | Present

# An optional message field: when set, its own fields are checked by their own rules.
_OPTIONAL = Present("optional; its fields have their own rules", required=False)


def required(rule: Text) -> Text:
    return dataclasses.replace(rule, required=True)


def _pattern(regex: str, max_chars: int, rule: str) -> Text:
    return Text(max_chars, rule, re.compile(regex))


def _text(max_chars: int, what: str = "text") -> Text:
    return Text(
        max_chars, f"at most {max_chars} characters of {what}, no control characters", None, "text"
    )


# Identifiers and names. Lengths are in characters (code points).
RUN_ID = _pattern(
    r"r-[0-9a-hjkmnp-tv-z]{26}", 28, "a run id: 'r-' and 26 lower-case base32 characters"
)
SEGMENT = _pattern(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
    128,
    "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
# Immutable ids of an org, project or pipeline (PipelineIds): a UUID fits; no '.', ':', '/'
# or '@', so that subject templates can use those to separate them (broker.runs.subjects).
IMMUTABLE_ID = _pattern(
    r"[A-Za-z0-9][A-Za-z0-9_-]{0,35}",
    36,
    "1-36 letters, digits, '_' or '-', starting with a letter or digit",
)
ENVIRONMENT = _pattern(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
    64,
    "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
RESOURCE = _pattern(
    r"[a-z][a-z0-9._-]{0,63}", 64, "1-64 lower-case letters, digits, '.', '_' or '-'"
)
LEVEL = _pattern(r"[a-z]{1,32}", 32, "1-32 lower-case letters, e.g. 'read'")
ACCOUNT = _pattern(
    r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}",
    128,
    "a service-account name: 1-128 letters, digits, '.', '_', '@' or '-'",
)
PRINCIPAL = _pattern(
    r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}|run:r-[0-9a-hjkmnp-tv-z]{26}",
    128,
    "a service-account name, or 'run:' and a run id",
)
AUDIENCE = _pattern(r"[\x21-\x7e]{1,256}", 256, "1-256 printable ASCII characters, no spaces")
STEP = _pattern(
    r"[A-Za-z0-9._:/-]{1,128}", 128, "at most 128 letters, digits, '.', '_', ':', '/' or '-'"
)
IDEMPOTENCY_KEY = _text(128)
SUBJECT = _pattern(r"[\x21-\x7e]{1,255}", 255, "1-255 printable ASCII characters, no spaces")
EMAIL = Text(
    MAX_EMAIL,
    "one address 'local@domain' (RFC 5322 dot-atom, a DNS domain), at most 254 characters",
    None,
    "email",
)
DISPLAY_NAME = _text(128)
REASON = _text(512)
PERSON = _text(255, "a subject or an email address")
ACTION = _pattern(r"[a-z][a-z0-9_.]{0,63}", 64, "an action name such as 'run.ended'")
PAGE_TOKEN = _pattern(
    r"[A-Za-z0-9_-]{1,512}", 512, "a next_page_token returned by ListRuns (at most 512 characters)"
)
JWS = _pattern(
    r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*",
    16 * 1024,
    "a JWT in compact serialization, at most 16384 characters",
)
# VerifyToken answers about any token, malformed included: only the length is limited.
TOKEN = Text(16 * 1024, "at most 16384 characters, no NUL", None, "opaque")
# Sender-constrained tokens: a public JWK (parsed and checked by the domain), a DPoP proof
# (checked like a token: only the length here), the request it came with.
JWK = Text(4096, "a public JWK as JSON, at most 4096 characters", None, "opaque")
PROOF = Text(8 * 1024, "at most 8192 characters, no NUL", None, "opaque")
HTTP_METHOD = _pattern(r"[A-Z]{1,16}", 16, "an HTTP method in capitals, e.g. 'GET'")
HTTP_URL = _pattern(r"[\x21-\x7e]{1,2048}", 2048, "a URL: 1-2048 printable ASCII characters")
THUMBPRINT = _pattern(r"[A-Za-z0-9_-]{43}", 43, "a base64url SHA-256 (43 characters)")
NONCE = _pattern(r"[\x21-\x7e]{1,256}", 256, "1-256 printable ASCII characters")
INPUT_KEY = _text(128, "text")
INPUT_VALUE = Text(4096, "at most 4096 characters, no NUL", None, "opaque")

MAX_INPUTS = 64
MAX_INPUTS_BYTES = 8 * 1024  # keys and values together, UTF-8: what one run stores
MAX_PERMISSIONS = 32
MAX_ACTIONS = 32
MAX_PAGE_SIZE = 500
MAX_SEQUENCE = 2**63 - 1
HOUR = 3600.0
DEADLINE = Seconds(1.0, 24 * HOUR)
LEASE = Seconds(1.0, HOUR)
TTL = Seconds(30.0, HOUR)  # SQLite integers are signed 64-bit

_V = PACKAGE


def _fields(message: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    return {f"{_V}.{message}.{name}": rule for name, rule in rules.items()}


RULES: Mapping[str, Rule] = MappingProxyType(
    {
        **_fields(
            "PipelineRef",
            {"org": required(SEGMENT), "project": required(SEGMENT), "pipeline": required(SEGMENT)},
        ),
        **_fields(
            "PipelineIds",
            {"org_id": IMMUTABLE_ID, "project_id": IMMUTABLE_ID, "pipeline_id": IMMUTABLE_ID},
        ),
        **_fields("Permission", {"resource": required(RESOURCE), "level": required(LEVEL)}),
        **_fields(
            "StartRunRequest",
            {
                "deadline": DEADLINE,
                "lease": LEASE,
                "pipeline": Present(),
                "permission_ceiling": Items(MAX_PERMISSIONS, min_items=1),
                "inputs": Items(MAX_INPUTS),
                "idempotency_key": IDEMPOTENCY_KEY,
                "pipeline_ids": _OPTIONAL,
                "environment": ENVIRONMENT,
                "dpop_jwk": JWK,
            },
        ),
        **_fields("StartRunRequest.InputsEntry", {"key": INPUT_KEY, "value": INPUT_VALUE}),
        **_fields(
            "AssertedPerson",
            {"subject": required(SUBJECT), "email": required(EMAIL), "display_name": DISPLAY_NAME},
        ),
        **_fields(
            "ExecuteOnBehalfOfRequest",
            {
                "deadline": DEADLINE,
                "lease": LEASE,
                "pipeline": Present(),
                "permission_ceiling": Items(MAX_PERMISSIONS, min_items=1),
                "inputs": Items(MAX_INPUTS),
                "idempotency_key": required(IDEMPOTENCY_KEY),
                "id_token": JWS,
                "pipeline_ids": _OPTIONAL,
                "environment": ENVIRONMENT,
                "dpop_jwk": JWK,
            },
        ),
        **_fields("ExecuteOnBehalfOfRequest.InputsEntry", {"key": INPUT_KEY, "value": INPUT_VALUE}),
        **_fields("RenewRunRequest", {"run_id": RUN_ID}),
        **_fields(
            "IssueTokenRequest",
            {
                "run_id": RUN_ID,
                "audience": required(AUDIENCE),
                "permissions": Items(MAX_PERMISSIONS),
                "ttl": TTL,
                "inherit_from_service_account": ACCOUNT,
                "step": STEP,
                "dpop_jwk": JWK,
            },
        ),
        **_fields(
            "VerifyTokenRequest",
            {
                "token": TOKEN,
                "audience": AUDIENCE,
                "dpop_proof": PROOF,
                "http_method": HTTP_METHOD,
                "http_url": HTTP_URL,
                "certificate_thumbprint": THUMBPRINT,
                "dpop_nonce": NONCE,
            },
        ),
        **_fields("RevokeRunRequest", {"run_id": RUN_ID, "reason": REASON}),
        **_fields("GetRunRequest", {"run_id": required(RUN_ID)}),
        **_fields(
            "ListRunsRequest",
            {
                "org": SEGMENT,
                "project": SEGMENT,
                "pipeline": SEGMENT,
                "page_size": Range(0, MAX_PAGE_SIZE),
                "page_token": PAGE_TOKEN,
            },
        ),
        **_fields(
            "AuditFilter",
            {
                "run_id": RUN_ID,
                "principal": PRINCIPAL,
                "person": PERSON,
                "actions": Items(MAX_ACTIONS),
                "org": SEGMENT,
                "project": SEGMENT,
            },
        ),
        # Each element of a repeated string field has its own rule, under "<field>[]".
        f"{_V}.AuditFilter.actions[]": ACTION,
        **_fields(
            "ProveInclusionRequest",
            {"sequence": Range(1, MAX_SEQUENCE), "tree_size": Range(0, MAX_SEQUENCE)},
        ),
        **_fields(
            "ProveConsistencyRequest",
            {"first": Range(1, MAX_SEQUENCE), "second": Range(0, MAX_SEQUENCE)},
        ),
        **_fields(
            "StreamAuditRequest",
            {
                "after_sequence": Range(0, MAX_SEQUENCE),
                # Above the maximum a stream is served at the maximum, not refused.
                "max_events_per_message": Range(0, 2**32 - 1),
            },
        ),
    }
)


def rule_for(field_full_name: str) -> Rule | None:
    return RULES.get(field_full_name)


def is_plain_text(value: str) -> bool:
    """No control characters, separators or bidi overrides; no unpaired surrogates."""
    if _FORBIDDEN.search(value):
        return False
    # Surrogates are not ASCII: most text (ids, audiences, reasons) is, and is done here
    # without looking at each character in Python.
    return value.isascii() or not any(unicodedata.category(c) == "Cs" for c in value)


def parse_email(value: str) -> tuple[str, str] | None:
    """(local part, lower-case domain) of a single addr-spec, or None when it is not one.

    Exactly one '@'; a dot-atom local part (no quotes, comments, spaces or controls); a DNS
    domain of letters, digits and hyphens. The domain is compared case-insensitively
    everywhere (RFC 5321 §2.4), so it is returned lower-cased.
    """
    if len(value) > MAX_EMAIL or value.count("@") != 1:
        return None
    local, _, domain = value.partition("@")
    if len(local) > MAX_EMAIL_LOCAL or not _LOCAL_PART.fullmatch(local):
        return None
    if not _DOMAIN.fullmatch(domain):
        return None
    return local, domain.lower()


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """Caller-supplied text as it may appear in a message or a log line: at most `limit`
    characters, control characters escaped, and how much was left out."""
    text = value if isinstance(value, str) else str(value)
    head = printable(text[:limit])
    if len(text) > limit:
        return f"{head}…(+{len(text) - limit} chars)"
    return head


def printable(text: str) -> str:
    """`text` safe to render for people: control characters, separators and bidi overrides
    escaped as \\xNN / \\uNNNN, so field content can never start a new line or reorder one."""
    if is_plain_text(text):
        return text
    return "".join(_escape(c) for c in text)


def _escape(char: str) -> str:
    if _FORBIDDEN.match(char) or unicodedata.category(char) == "Cs":
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def _describe(rule: Rule) -> str:
    if isinstance(rule, Text):
        text = rule.rule
        return f"required; {text}" if rule.required else text
    return rule.rule


def markdown() -> str:
    """The table as `protos/tokenbroker/v1/LIMITS.md` shows it beside the .proto files."""
    lines = [
        "# Request limits",
        "",
        "<!-- Generated from broker/limits.py by `make limits-doc`; tests check it is current. -->",
        "",
        "Every request is checked against these rules after authentication and before anything",
        "else; a request that breaks any is `INVALID_ARGUMENT` with a `google.rpc.BadRequest`",
        "field violation per broken rule (the value itself is never quoted back). Lengths are",
        "in characters. *No control characters* means no C0/C1 control (NUL, newline, ESC, …),",
        "no line or paragraph separator and no bidirectional override. Besides the table:",
        "",
        "- an enum field must hold a value the .proto defines (proto3 keeps unknown numbers);",
        "- a `google.protobuf.Duration` must be well-formed (nanos within ±999,999,999, with",
        "  the sign of seconds);",
        "- map keys are never empty and never contain NUL;",
        f"- the inputs of a run, keys and values together, are at most {MAX_INPUTS_BYTES} bytes"
        " (UTF-8);",
        "- a request message is at most `--max-request-bytes` (default "
        f"{DEFAULT_MAX_REQUEST_BYTES}) bytes, or gRPC",
        "  answers `RESOURCE_EXHAUSTED` before reading it; an undecodable message is",
        "  `INVALID_ARGUMENT`;",
        f"- a reply is at most {MAX_REPLY_BYTES // 2**20} MiB, what a default gRPC client "
        "accepts: a `ListRuns` page",
        f"  stops at {MAX_PAGE_BYTES // 2**20} MiB of runs and says so with a "
        "`next_page_token`, even below `page_size`.",
        "",
        "| field | rule |",
        "| --- | --- |",
    ]
    prefix = PACKAGE + "."
    for name in sorted(RULES):
        lines.append(f"| `{name.removeprefix(prefix)}` | {_describe(RULES[name])} |")
    return "\n".join(lines) + "\n"
