"""Every request checked against `broker.limits` before the servicer sees it.

`check(request)` walks the message by its descriptor: each string against its `Text` rule,
each repeated field and map against its `Items` count, each integer against its `Range`,
each enum against the values the .proto defines (proto3 keeps unknown numbers), each
google.protobuf.Duration for well-formed seconds and nanos, and map keys for NUL. All
violations are reported at once, as `InvalidArgument` field violations that never quote
the offending value.
"""

from __future__ import annotations

import functools

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from broker import limits
from broker.errors import FieldViolation, InvalidArgument

# google.protobuf.Duration bounds (duration.proto): ±10,000 years, nanos with the sign of seconds.
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999
FALLBACK = limits.Text(256, "at most 256 characters of text", None, "text")

_INTEGERS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


Violations = list[FieldViolation]


def check(request: Message) -> None:
    """Raise InvalidArgument naming every field of `request` that breaks its limit."""
    violations: list[FieldViolation] = []
    _message(request, "", violations)
    if violations:
        raise InvalidArgument(violations[:20])


def _message(message: Message, path: str, out: Violations) -> None:
    present = message.ListFields()
    _missing(message, {field.name for field, _ in present}, path, out)
    for field, value in present:
        where = f"{path}{field.name}"
        if _is_map(field):
            _map(field, value, where, out)
        elif _is_repeated(field):
            _repeated(field, value, where, out)
        else:
            _single(field, value, where, out)


def _missing(message: Message, present: set[str], path: str, out: Violations) -> None:
    """Required fields left unset (or empty: proto3 cannot tell the two apart)."""
    for field, rule in _required(message.DESCRIPTOR):
        if field.name in present:
            continue
        where = f"{path}{field.name}"
        before = len(out)
        if isinstance(rule, limits.Present):  # name the required fields inside, if any
            _missing(getattr(message, field.name), set(), f"{where}.", out)
        if len(out) == before:
            out.append(FieldViolation(where, f"required: {rule.rule}"))


# Per message type and field, what the limits table says never changes: looked up once
# (a request walks a few dozen fields; the descriptors are a fixed, finite set).
@functools.cache
def _required(descriptor: Descriptor) -> tuple[tuple[FieldDescriptor, limits.Rule], ...]:
    rules = ((field, limits.rule_for(field.full_name)) for field in descriptor.fields)
    return tuple((field, rule) for field, rule in rules if rule is not None and rule.required)


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


@functools.cache
def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return _is_repeated(field) and entry is not None and bool(entry.GetOptions().map_entry)


def _repeated(field: FieldDescriptor, values: object, where: str, out: Violations) -> None:
    items = list(values)  # type: ignore[call-overload]
    rule = limits.rule_for(field.full_name)
    if isinstance(rule, limits.Items) and len(items) > rule.max_items:
        out.append(FieldViolation(where, rule.rule))
        return
    element = limits.rule_for(field.full_name + "[]")
    for i, item in enumerate(items):
        if isinstance(element, limits.Text):
            _text(element, item, f"{where}[{i}]", out)
        else:
            _single(field, item, f"{where}[{i}]", out)


def _map(field: FieldDescriptor, entries: object, where: str, out: Violations) -> None:
    mapping = dict(entries)  # type: ignore[call-overload]
    rule = limits.rule_for(field.full_name)
    if isinstance(rule, limits.Items) and len(mapping) > rule.max_items:
        out.append(FieldViolation(where, rule.rule))
        return
    entry = field.message_type
    assert entry is not None
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for key, value in mapping.items():
        shown = f"{where}[{limits.shown(key, 32)!r}]"
        if isinstance(key, str):
            if not key or "\x00" in key:
                out.append(FieldViolation(shown, "keys must be non-empty, without NUL"))
                continue
            _single(key_field, key, shown, out)
        _single(value_field, value, shown, out)


def _single(field: FieldDescriptor, value: object, where: str, out: Violations) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        if value.DESCRIPTOR.full_name == "google.protobuf.Duration":
            _duration(value, where, out, limits.rule_for(field.full_name))
        else:
            _message(value, f"{where}.", out)
        return
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        if field.enum_type.values_by_number.get(int(value)) is None:  # type: ignore[call-overload]
            out.append(FieldViolation(where, "not a value this API defines"))
        return
    rule = limits.rule_for(field.full_name)
    if field.type == FieldDescriptor.TYPE_STRING:
        if isinstance(rule, limits.Text):
            _text(rule, str(value), where, out)
        else:  # every string field has a rule (tests check); be strict if one is missing
            _text(
                limits.Text(256, "at most 256 characters of text", None, "text"),
                str(value),
                where,
                out,
            )
    elif field.type == FieldDescriptor.TYPE_BYTES:
        if len(value) > 4096:  # type: ignore[arg-type]
            out.append(FieldViolation(where, "at most 4096 bytes"))
    elif field.type in _INTEGERS and isinstance(rule, limits.Range):
        _range(rule, int(value), where, out)  # type: ignore[call-overload]


def _range(rule: limits.Range, value: int, where: str, out: Violations) -> None:
    if not rule.low <= value <= rule.high:
        out.append(FieldViolation(where, rule.rule))


def _text(rule: limits.Text, value: str, where: str, out: Violations) -> None:
    problem = rule.problem(value)
    if problem is not None:
        out.append(FieldViolation(where, problem))


def _duration(message: Message, where: str, out: Violations, rule: limits.Rule | None) -> None:
    seconds: int = message.seconds  # type: ignore[attr-defined]
    nanos: int = message.nanos  # type: ignore[attr-defined]
    if not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        out.append(FieldViolation(where, "seconds out of range for a Duration"))
    elif not -MAX_NANOS <= nanos <= MAX_NANOS or (seconds * nanos < 0):
        out.append(
            FieldViolation(where, "nanos must be within ±999,999,999 and have the sign of seconds")
        )
    elif isinstance(rule, limits.Seconds) and not rule.low <= seconds + nanos / 1e9 <= rule.high:
        out.append(FieldViolation(where, rule.rule))
