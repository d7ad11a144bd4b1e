"""Audit events straight to protobuf wire bytes, without building messages.

Catch-up and live fan-out send every event as an encoded `tokenbroker.v1.AuditEvent`. Building
the message first (`convert.audit_event_pb`) cost more than everything else per event: its
`details` go through `Struct.update`, one Python call and one upb object per value. The wire
format of these messages is simple (varints, length-delimited strings and submessages, one
fixed64 for a Struct number), so this module writes it directly.

The bytes are exactly what `audit_event_pb(event).SerializeToString(deterministic=True)` gives
(map entries of a Struct sorted by key, as deterministic serialisation orders them; without it
upb writes them in hash-table order, which clients never see: a map decodes the same in any
order). tests/test_audit_wire.py compares the two over many shapes of details. Anything this
encoder does not know how to write exactly as protobuf would (a value of a type `Struct.update`
refuses, a key that is not a string, a time out of Timestamp's range) raises `Unencodable`, and
the caller builds the message instead, so that the outcome — bytes or the same error — is
protobuf's own.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from broker.audit.events import AuditEvent, Outcome, RecordedEvent
from broker.identity import Person, VerificationMethod
from tokenbroker.v1 import types_pb2


class Unencodable(Exception):
    """This event needs the message-built path (which then encodes it or raises)."""


# The enums' protobuf numbers; `broker.api.convert` builds messages with the same tables.
OUTCOME_TO_PB = {
    Outcome.SUCCESS: types_pb2.AUDIT_OUTCOME_SUCCESS,
    Outcome.DENIED: types_pb2.AUDIT_OUTCOME_DENIED,
    Outcome.FAILURE: types_pb2.AUDIT_OUTCOME_FAILURE,
}
METHOD_TO_PB = {
    VerificationMethod.IDP_VERIFIED: types_pb2.VERIFICATION_METHOD_IDP_VERIFIED,
    VerificationMethod.ASSERTED_BY_CALLER: types_pb2.VERIFICATION_METHOD_ASSERTED_BY_CALLER,
}
# google.protobuf.Timestamp's valid seconds: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799

_pack_double = struct.Struct("<d").pack
_ONE_BYTE = [bytes((n,)) for n in range(128)]

# Value (google/protobuf/struct.proto): null_value 1 (varint), number_value 2 (fixed64),
# string_value 3, struct_value 5, list_value 6 (length-delimited), bool_value 4 (varint).
# Being a oneof, every set member is written, zero or not.
_NULL = b"\x08\x00"
_TRUE = b"\x20\x01"
_FALSE = b"\x20\x00"
_NUMBER = b"\x11"
_STRING = b"\x1a"
_STRUCT = b"\x2a"
_LIST = b"\x32"
# Struct.fields 1 (map entry: key 1, value 2); ListValue.values 1.
_ENTRY = b"\x0a"
_KEY = b"\x0a"
_VALUE = b"\x12"


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint; a negative one as int64 does (10 bytes)."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if 0 < value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    value &= 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    size = len(payload)
    return tag + (_ONE_BYTE[size] if size < 0x80 else varint(size)) + payload


# What repeats from event to event, encoded once: strings (actions, principals, detail keys),
# pipelines, the order of a set of detail keys. A dict lookup instead of an encoding; each
# bounded (emptied when full).
_CACHE_LIMIT = 4096
_strings: dict[tuple[bytes, str], bytes] = {}
_pipelines: dict[tuple[str, str, str], bytes] = {}
_orders: dict[tuple[str, ...], list[str]] = {}


def _bounded(cache: dict[Any, Any]) -> dict[Any, Any]:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    return cache


def _value(value: Any) -> bytes:
    """The body of a google.protobuf.Value, as `Struct.update` would set it (same type tests,
    same order: bool before numbers)."""
    if isinstance(value, str):
        raw = value.encode()
        size = len(raw)
        return _STRING + (_ONE_BYTE[size] if size < 0x80 else varint(size)) + raw
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return _TRUE if value else _FALSE
    if isinstance(value, int | float):
        return _NUMBER + _pack_double(float(value))
    if isinstance(value, dict):
        return _delimited(_STRUCT, struct_body(value))
    if isinstance(value, list | tuple):
        return _delimited(_LIST, b"".join([_delimited(_ENTRY, _value(v)) for v in value]))
    raise Unencodable(type(value).__name__)


def _map_order(key: str) -> bytes:
    """Where upb's deterministic serialisation puts a map key: by the bytes of the keys
    (memcmp), and of two keys one of which begins the other, the longer first — as if each
    ended with a byte above all others (0xff never occurs in UTF-8)."""
    return key.encode() + b"\xff"


def _ordered(data: Mapping[str, Any]) -> list[str]:
    keys = tuple(data)
    order = _orders.get(keys)
    if order is None:
        if not all(isinstance(key, str) for key in keys):
            raise Unencodable("a key that is not a string")
        order = _bounded(_orders).setdefault(keys, sorted(keys, key=_map_order))
    return order


def struct_body(data: Mapping[str, Any]) -> bytes:
    """The body of a google.protobuf.Struct holding `data`, entries in upb's deterministic
    order."""
    parts = []
    for key in _ordered(data):
        encoded_key = _strings.get((_KEY, key))
        if encoded_key is None:
            encoded_key = _bounded(_strings).setdefault((_KEY, key), _string(_KEY, key, empty=True))
        value = _value(data[key])
        size = len(value)
        entry = encoded_key + _VALUE + (_ONE_BYTE[size] if size < 0x80 else varint(size)) + value
        size = len(entry)
        parts.append(_ENTRY + (_ONE_BYTE[size] if size < 0x80 else varint(size)) + entry)
    return b"".join(parts)


def _string(tag: bytes, text: str, *, empty: bool = False) -> bytes:
    """A string field; left out when empty (proto3), unless `empty` (a map entry's key)."""
    if not text and not empty:
        return b""
    raw = text.encode()
    size = len(raw)
    return tag + (_ONE_BYTE[size] if size < 0x80 else varint(size)) + raw


def _repeated_string(tag: bytes, text: str) -> bytes:
    encoded = _strings.get((tag, text))
    if encoded is None:
        encoded = _bounded(_strings).setdefault((tag, text), _string(tag, text))
    return encoded


def _timestamp(seconds: float) -> bytes:
    whole, rest = divmod(round(seconds * 1_000_000), 1_000_000)
    if not _MIN_SECONDS <= whole <= _MAX_SECONDS:
        raise Unencodable("time out of Timestamp's range")
    body = (b"\x08" + varint(whole) if whole else b"") + (
        b"\x10" + varint(rest * 1000) if rest else b""
    )
    return b"\x12" + _ONE_BYTE[len(body)] + body  # at most 1 + 10 + 1 + 5 bytes


def _pipeline(org: str, project: str, pipeline: str) -> bytes:
    key = (org, project, pipeline)
    encoded = _pipelines.get(key)
    if encoded is None:
        body = _string(b"\x0a", org) + _string(b"\x12", project) + _string(b"\x1a", pipeline)
        encoded = _bounded(_pipelines).setdefault(key, _delimited(b"\x42", body))
    return encoded


def _person(person: Person) -> bytes:
    method = METHOD_TO_PB[person.method]
    body = b"".join(
        (
            _string(b"\x0a", person.subject),
            _string(b"\x12", person.issuer),
            _string(b"\x1a", person.email),
            _string(b"\x22", person.display_name),
            b"\x28" + varint(method) if method else b"",
            _string(b"\x32", person.evidence_sha256),
        )
    )
    return _delimited(b"\x32", body)


def audit_event(event: AuditEvent) -> bytes:
    """The serialised tokenbroker.v1.AuditEvent of `event` (fields in number order, proto3
    defaults left out, submessages the converter always sets written even when empty).
    A `RecordedEvent` not decoded yet is encoded from its record, when that record is what
    its draft would be rebuilt from without a question (else from the draft)."""
    if event.sequence < 0:
        raise Unencodable("a negative sequence")
    if isinstance(event, RecordedEvent) and "draft" not in event.__dict__:
        try:
            return _recorded(event)
        except (Unencodable, KeyError):
            pass  # the draft decides: it is built, and encodes or raises as it would
    d = event.draft
    outcome = OUTCOME_TO_PB[d.outcome]
    pipeline = d.pipeline
    details = d.details
    return b"".join(
        (
            b"\x08" + varint(event.sequence) if event.sequence else b"",
            _timestamp(d.time),
            _repeated_string(b"\x1a", d.action),
            b"\x20" + varint(outcome) if outcome else b"",
            _repeated_string(b"\x2a", d.principal),
            b"" if d.on_behalf_of is None else _person(d.on_behalf_of),
            _string(b"\x3a", d.run_id),
            b""
            if pipeline is None
            else _pipeline(pipeline.org, pipeline.project, pipeline.pipeline),
            _string(b"\x4a", d.trace_id),
            _string(b"\x52", d.request_id),
            _delimited(b"\x5a", struct_body(details)) if details else b"\x5a\x00",
            _string(b"\x62", event.prev_hash),
            _string(b"\x6a", event.hash),
        )
    )


_OUTCOMES_BY_VALUE = {outcome.value: number for outcome, number in OUTCOME_TO_PB.items()}
_METHODS_BY_VALUE = {method.value: number for method, number in METHOD_TO_PB.items()}
_PERSON_KEYS = ("subject", "issuer", "email", "display_name", "method", "evidence_sha256")
_PIPELINE_KEYS = frozenset(("org", "project", "pipeline"))


def _text(value: Any) -> str:
    if type(value) is not str:
        raise Unencodable("not a string")
    return value


def _recorded(event: RecordedEvent) -> bytes:
    """`audit_event` of the draft `from_record` would rebuild, read off the record itself:
    only for records whose every field is of the type `to_record` writes (else Unencodable,
    and the draft decides)."""
    record = event.record
    time_us = record["time_us"]
    if type(time_us) is not int:
        raise Unencodable("time_us is not an integer")
    outcome = _OUTCOMES_BY_VALUE.get(record["outcome"]) if type(record["outcome"]) is str else None
    if outcome is None:
        raise Unencodable("an unknown outcome")
    details = record["details"]
    if type(details) is not dict:
        raise Unencodable("details are not an object")
    person = record.get("on_behalf_of")
    pipeline = record.get("pipeline")
    return b"".join(
        (
            b"\x08" + varint(event.sequence) if event.sequence else b"",
            _timestamp(time_us / 1_000_000),  # as from_record keeps it: seconds
            _repeated_string(b"\x1a", _text(record["action"])),
            b"\x20" + varint(outcome),
            _repeated_string(b"\x2a", _text(record["principal"])),
            b"" if person is None else _recorded_person(person),
            _string(b"\x3a", _text(record["run_id"])),
            b"" if pipeline is None else _recorded_pipeline(pipeline),
            _string(b"\x4a", _text(record["trace_id"])),
            _string(b"\x52", _text(record["request_id"])),
            _delimited(b"\x5a", struct_body(details)) if details else b"\x5a\x00",
            _string(b"\x62", event.prev_hash),
            _string(b"\x6a", event.hash),
        )
    )


def _recorded_person(record: Any) -> bytes:
    if type(record) is not dict:
        raise Unencodable("on_behalf_of is not an object")
    subject, issuer, email, display_name, method, evidence = (
        _text(record[key]) for key in _PERSON_KEYS
    )
    number = _METHODS_BY_VALUE.get(method)
    if number is None:
        raise Unencodable("an unknown verification method")
    body = b"".join(
        (
            _string(b"\x0a", subject),
            _string(b"\x12", issuer),
            _string(b"\x1a", email),
            _string(b"\x22", display_name),
            b"\x28" + varint(number),
            _string(b"\x32", evidence),
        )
    )
    return _delimited(b"\x32", body)


def _recorded_pipeline(record: Any) -> bytes:
    if type(record) is not dict or record.keys() != _PIPELINE_KEYS:
        raise Unencodable("pipeline is not the three names")
    return _pipeline(_text(record["org"]), _text(record["project"]), _text(record["pipeline"]))
