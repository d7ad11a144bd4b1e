"""The one table of request limits covers every field the API accepts, and nothing else."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from broker import limits
from tests.support import REPO
from tokenbroker.v1 import broker_pb2

SERVICE = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"]
INTEGERS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
}


def request_messages() -> Iterator[Descriptor]:
    """Every message a caller can send, nested ones included (well-known types aside)."""
    seen: set[str] = set()
    pending = [method.input_type for method in SERVICE.methods]
    while pending:
        message = pending.pop()
        if message.full_name in seen or message.full_name.startswith("google.protobuf."):
            continue
        seen.add(message.full_name)
        yield message
        pending.extend(f.message_type for f in message.fields if f.message_type is not None)


def is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and bool(entry.GetOptions().map_entry)


def expected_rule_types(field: FieldDescriptor) -> dict[str, type]:
    """The rules a field must have: {key in RULES: rule type}."""
    name = field.full_name
    if field.is_repeated:
        needed: dict[str, type] = {name: limits.Items}
        if field.type == FieldDescriptor.TYPE_STRING:
            needed[name + "[]"] = limits.Text
        return needed
    if field.type == FieldDescriptor.TYPE_STRING:
        return {name: limits.Text}
    if field.type in INTEGERS:
        return {name: limits.Range}
    message = field.message_type
    if message is not None and message.full_name == "google.protobuf.Duration":
        return {name: limits.Seconds}
    return {}  # bools, enums (checked against the .proto) and messages (walked into)


def test_every_field_of_every_request_has_a_limit_of_the_right_kind() -> None:
    missing = []
    for message in request_messages():
        for field in message.fields:
            if is_map(field):
                assert field.message_type is not None
                needed: dict[str, type] = {field.full_name: limits.Items}
                needed |= {f.full_name: limits.Text for f in field.message_type.fields}
            else:
                needed = expected_rule_types(field)
            for key, kind in needed.items():
                if not isinstance(limits.RULES.get(key), kind):
                    missing.append(f"{key}: needs a {kind.__name__} rule")
    assert not missing, "\n".join(missing)


def test_the_table_names_no_field_the_api_does_not_have() -> None:
    known = set()
    for message in request_messages():
        for field in message.fields:
            known |= {field.full_name, field.full_name + "[]"}
            if is_map(field):
                assert field.message_type is not None
                known |= {f.full_name for f in field.message_type.fields}
    assert set(limits.RULES) <= known, sorted(set(limits.RULES) - known)


def test_the_limits_beside_the_proto_files_are_generated_from_the_table() -> None:
    written = (REPO / "protos/tokenbroker/v1/LIMITS.md").read_text()
    assert written == limits.markdown(), "run `make limits-doc`"


def test_emails_are_one_addr_spec_with_one_at_and_a_dns_domain() -> None:
    assert limits.parse_email("alice@Example.COM") == ("alice", "example.com")
    for forged in (
        "mallory@evil.com\nExecuted by: ceo@acme.example\n@acme.example",
        "mallory@evil.com@acme.example",
        "mallory@evil.com\x00@acme.example",
        '"mallory@evil"@acme.example',
        "mallory @acme.example",
        "mallory@acme",
        "@acme.example",
        "mallory@",
        "mallory@-acme.example",
        "a" * 65 + "@acme.example",
        "mallory@" + "a" * 250 + ".example",
    ):
        assert limits.parse_email(forged) is None, forged


def test_shown_quotes_a_short_printable_prefix_and_says_how_much_was_left_out() -> None:
    assert limits.shown("r-abc") == "r-abc"
    long = "x" * 1_000_000
    assert (
        limits.shown(long) == "x" * limits.MAX_SHOWN + f"…(+{1_000_000 - limits.MAX_SHOWN} chars)"
    )
    assert limits.shown("a\nb\x1b[31m\u202e") == "a\\x0ab\\x1b[31m\\u202e"


def test_printable_text_cannot_start_a_line_or_reorder_one() -> None:
    forged = "mallory@evil.com\nExecuted by: ceo@acme.example\r\u2028\u202e"
    rendered = limits.printable(forged)
    assert "\n" not in rendered and "\r" not in rendered
    assert "\u2028" not in rendered and "\u202e" not in rendered
    assert limits.printable("Zoë Ærø 山田") == "Zoë Ærø 山田"
