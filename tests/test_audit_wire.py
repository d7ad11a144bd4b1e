"""Audit events written straight to wire bytes (broker/api/eventwire.py) are exactly the
bytes protobuf serialises from the message the converter builds, over every shape of details
an event can carry — and whatever the direct encoder does not handle goes to protobuf, which
encodes or refuses it as before."""

from __future__ import annotations

import json
import math
import random
from types import MappingProxyType
from typing import Any

import pytest

from broker.api import convert, eventwire
from broker.audit import events as audit
from broker.audit.events import AuditDraft, AuditEvent, Outcome, RecordedEvent
from broker.identity import Person, VerificationMethod
from broker.runs.model import PipelineRef
from broker.store import codec
from tokenbroker.v1 import types_pb2

ACME = PipelineRef("acme", "web", "deploy")
DETAILS: list[dict[str, Any]] = [
    {},
    {"reason": "finished"},
    {"": None, "a": "", "b": 0, "c": False, "d": True, "e": [], "f": {}},
    {"nested": {"deeper": {"deepest": [1, "two", None, True, {"x": [[], [[]]]}]}}},
    {"list": [1, 2.5, -3, 1e300, -0.0, 2**53 + 1, 2**63, -(2**63), 10**30]},
    {"numbers": [0.1, 1 / 3, math.pi, 5e-324, 1.7976931348623157e308, 7]},
    {"unicode": "ümlaut ✓ 日本語 🎉", "ключ": "значение", "🔑": ["é", "\u0000", "\uffff"]},
    {"ordering": 1, "Ordering": 2, "order": 3, "ä": 4, "z": 5, "日": 6, "🎉": 7, "A": 8},
    {"tuple": (1, "a", (None, False)), "long": "x" * 300, "longer": "y" * 20_000},
    {f"key{n}": n for n in range(200)},
    {"permissions": {"artifacts": "write", "deploy": "read"}, "jti": "t-01", "exp_us": 17e14},
    {"bools": [True, False], "nulls": [None, None], "mixed": [{"a": 1}, ["b"], "c", 2]},
]


def event(
    details: dict[str, Any] | MappingProxyType[str, Any],
    *,
    sequence: int = 42,
    time: float = 1_795_929_815.570014,
    person: Person | None = None,
    pipeline: PipelineRef | None = ACME,
    outcome: Outcome = Outcome.SUCCESS,
    hashes: tuple[str, str] = ("a" * 64, "b" * 64),
    **fields: str,
) -> AuditEvent:
    draft = AuditDraft(
        time=time,
        action=fields.get("action", "token.issued"),
        outcome=outcome,
        principal=fields.get("principal", "orchestrator"),
        on_behalf_of=person,
        run_id=fields.get("run_id", "r-01"),
        pipeline=pipeline,
        trace_id=fields.get("trace_id", ""),
        request_id=fields.get("request_id", "req-1"),
        details=MappingProxyType(details) if isinstance(details, dict) else details,
    )
    return AuditEvent(sequence, draft, *hashes)


def protobuf_bytes(e: AuditEvent) -> bytes:
    return convert.audit_event_pb(e).SerializeToString(deterministic=True)


def assert_same_as_protobuf(e: AuditEvent) -> None:
    direct = eventwire.audit_event(e)
    assert direct == protobuf_bytes(e)
    assert types_pb2.AuditEvent.FromString(direct) == convert.audit_event_pb(e)
    assert convert.audit_event_bytes(e) == direct


@pytest.mark.parametrize("details", DETAILS, ids=range(len(DETAILS)))
def test_every_shape_of_details_encodes_to_the_bytes_protobuf_serialises(
    details: dict[str, Any],
) -> None:
    assert_same_as_protobuf(event(details))


def test_random_details_encode_to_the_bytes_protobuf_serialises() -> None:
    rng = random.Random(16)
    alphabet = ["a", "B", "_", "é", "日", "🎉", " ", '"', "\\", "\n"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))

    def value(depth: int) -> Any:
        kind = rng.randrange(9 if depth < 4 else 6)
        scalars = [
            None,
            rng.random() < 0.5,
            text(),
            rng.randrange(-(2**70), 2**70),
            rng.uniform(-1e9, 1e9),
            rng.choice([0, 0.0, -0.0, 1, 127, 128, 16_383, 16_384]),
        ]
        if kind < 6:
            return scalars[kind]
        if kind < 8:
            return {text(): value(depth + 1) for _ in range(rng.randrange(0, 5))}
        return [value(depth + 1) for _ in range(rng.randrange(0, 5))]

    for _ in range(300):
        details = {text(): value(0) for _ in range(rng.randrange(0, 8))}
        assert_same_as_protobuf(event(details, sequence=rng.randrange(0, 2**40)))


def test_every_field_of_an_event_encodes_as_protobuf_writes_it_set_or_empty() -> None:
    person = Person(
        subject="u-1",
        issuer="https://idp.example",
        email="ana@example.com",
        display_name="Ana Łukasiewicz",
        method=VerificationMethod.ASSERTED_BY_CALLER,
        evidence_sha256="c" * 64,
    )
    empty_person = Person(
        subject="",
        issuer="",
        email="",
        display_name="",
        method=VerificationMethod.IDP_VERIFIED,
        evidence_sha256="",
    )
    cases = [
        event({}, person=person, trace_id="0af7651916cd43dd8448eb211c80319c"),
        event({}, person=empty_person),
        event({}, pipeline=None, run_id="", principal="", action="", request_id=""),
        event({}, pipeline=PipelineRef("", "", "")),
        event({}, sequence=0, time=0.0, hashes=("", "")),
        event({}, sequence=2**63, time=-1.5, outcome=Outcome.DENIED),
        event({}, time=253_402_300_799.5, outcome=Outcome.FAILURE),
        event({}, time=-62_135_596_800.0),
        event({}, time=1.0000005),
        event({"r": 1}, run_id="r" * 200, principal="p" * 127, action="a" * 128),
    ]
    for e in cases:
        assert_same_as_protobuf(e)


def test_repeated_strings_are_encoded_the_same_from_the_cache() -> None:
    first = [eventwire.audit_event(event({"k": n})) for n in range(3)]
    again = [eventwire.audit_event(event({"k": n})) for n in range(3)]
    assert first == again == [protobuf_bytes(event({"k": n})) for n in range(3)]


@pytest.mark.parametrize(
    "details",
    [
        {"a": {1, 2}},  # a set: Struct.update refuses it
        {"a": b"bytes"},
        {"a": MappingProxyType({"b": 1})},  # only dicts nest
        {"a": 10**400},  # too large for a double
        {"a": "\ud800"},  # a lone surrogate is not UTF-8
    ],
    ids=["set", "bytes", "mapping", "huge int", "surrogate"],
)
def test_what_the_direct_encoder_leaves_to_protobuf_is_refused_as_protobuf_refuses_it(
    details: dict[str, Any],
) -> None:
    e = event(details)
    with pytest.raises(Exception) as direct:
        convert.audit_event_bytes(e)
    with pytest.raises(Exception) as built:
        protobuf_bytes(e)
    assert type(direct.value) is type(built.value)


def test_a_time_outside_timestamps_range_is_refused_as_protobuf_refuses_it() -> None:
    e = event({}, time=1e13)
    with pytest.raises(eventwire.Unencodable):
        eventwire.audit_event(e)
    with pytest.raises(ValueError):
        convert.audit_event_bytes(e)


def recorded(e: AuditEvent) -> tuple[dict[str, Any], AuditEvent]:
    """The record a store keeps of `e` (JSON and back), and the event read back from it."""
    record = json.loads(audit.canonical_bytes(audit.to_record(e.sequence, e.draft)))
    return record, AuditEvent(e.sequence, audit.from_record(record), e.prev_hash, e.hash)


def assert_recorded_same_as_protobuf(record: dict[str, Any], hashes: tuple[str, str]) -> None:
    """Encoded from the record itself, an event read back is what its decoded draft gives."""
    lazy = RecordedEvent(record, *hashes)
    direct = eventwire.audit_event(lazy)
    assert "draft" not in lazy.__dict__  # encoded without rebuilding the draft
    assert direct == protobuf_bytes(RecordedEvent(record, *hashes))


@pytest.mark.parametrize("details", DETAILS, ids=range(len(DETAILS)))
def test_an_event_read_back_encodes_from_its_record_to_the_bytes_of_its_draft(
    details: dict[str, Any],
) -> None:
    person = Person(
        subject="u-1",
        issuer="https://idp.example",
        email="ana@example.com",
        display_name="Ana",
        method=VerificationMethod.IDP_VERIFIED,
        evidence_sha256="c" * 64,
    )
    for e in (event(details), event(details, person=person, pipeline=None, trace_id="0af7")):
        record, read_back = recorded(e)
        assert_recorded_same_as_protobuf(record, (e.prev_hash, e.hash))
        assert RecordedEvent(record, e.prev_hash, e.hash) == read_back
        assert read_back == RecordedEvent(record, e.prev_hash, e.hash)


@pytest.mark.parametrize(
    "change",
    [
        {"time_us": 1.5},
        {"time_us": True},
        {"time_us": 10**20},
        {"outcome": "maybe"},
        {"outcome": None},
        {"action": 7},
        {"principal": None},
        {"details": [["a", 1]]},
        {"details": {"a": {1, 2}}},
        {"pipeline": {"org": "a", "project": "b"}},
        {"pipeline": {"org": "a", "project": "b", "pipeline": "c", "more": "d"}},
        {"pipeline": {"org": "a", "project": "b", "pipeline": 3}},
        {"on_behalf_of": {"subject": "s"}},
        {"on_behalf_of": {**dict.fromkeys(("subject", "issuer", "email")), "method": "x"}},
        {
            "on_behalf_of": {
                **dict.fromkeys(("subject", "issuer", "email", "display_name"), "a"),
                "evidence_sha256": "",
                "method": "telepathy",
            }
        },
        {"trace_id": None},
    ],
)
def test_a_record_not_as_written_is_left_to_its_draft_which_encodes_or_refuses_as_before(
    change: dict[str, Any],
) -> None:
    record, _ = recorded(event({"k": 1}))
    record.update(change)
    hashes = ("a" * 64, "b" * 64)
    try:
        expected: bytes | type[BaseException] = protobuf_bytes(RecordedEvent(record, *hashes))
    except Exception as error:  # whatever protobuf or the draft raise
        expected = type(error)
    try:
        got: bytes | type[BaseException] = convert.audit_event_bytes(RecordedEvent(record, *hashes))
    except Exception as error:
        got = type(error)
    assert got == expected


def test_a_record_missing_a_field_is_refused_as_its_draft_refuses_it() -> None:
    record, _ = recorded(event({}))
    del record["run_id"]
    with pytest.raises(KeyError):
        convert.audit_event_bytes(RecordedEvent(record, "", ""))


@pytest.mark.parametrize(
    "text", ['{"a": 1}', ' {"a": 1}', '{"a": 1} ', '{"a": 1}x', "[1]", '"s"', "", "{", "nan"]
)
def test_a_stored_record_is_read_as_json_loads_reads_it(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except ValueError as error:
        expected = type(error)
    try:
        got: Any = codec._json_record(text)
    except ValueError as error:
        got = type(error)
    assert got == expected
