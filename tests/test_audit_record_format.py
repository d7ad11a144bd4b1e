"""The stored form of an event and of a person never changes: the audit hash covers it.

The records below were written by the broker before a person's record had one serialiser;
they stand for every event already stored. If any of these tests fails, existing audit logs
would stop verifying.
"""

from __future__ import annotations

import json
from types import MappingProxyType

from broker.audit.events import (
    AuditDraft,
    Outcome,
    chain_hash,
    from_record,
    seal_with_record,
    to_record,
)
from broker.identity import Person, VerificationMethod
from broker.runs.model import PipelineRef
from broker.store.codec import person_from_json, person_to_json

RUN_ID = "r-01m8kv2wes4ep8dg3zjfj27exw"
PREV_HASH = "1" * 64

# seq 4 of the demo's audit trail, as the `record` column of the audit table holds it.
DELEGATED_RECORD = (
    '{"action":"token.issued","details":{"aud":"sample-api","permissions":{"pipelines":"read"},'
    '"step":"call-sample-api"},"on_behalf_of":{"display_name":"Alice Ä. Example",'
    '"email":"alice@example.com","evidence_sha256":"'
    + "ab"
    * 32
    + '","issuer":"https://idp.example.com","method":"idp_verified","subject":"u-1001"},'
    '"outcome":"success","pipeline":{"org":"acme","pipeline":"deploy","project":"web"},'
    f'"principal":"run:{RUN_ID}","request_id":"req-1","run_id":"{RUN_ID}","sequence":4,'
    '"time_us":1700000000123456,"trace_id":"0af7651916cd43dd8448eb211c80319c"}'
)
DELEGATED_HASH = "8ff63ecb1c9fdefc261c225e99ae537f57c6c1933cc5fc0e2e5d7b377fdd3702"

UNDELEGATED_RECORD = (
    '{"action":"run.started","details":{"ceiling":{"artifacts":"write"}},"on_behalf_of":null,'
    '"outcome":"success","pipeline":{"org":"acme","pipeline":"deploy","project":"web"},'
    '"principal":"ci-orchestrator","request_id":"","run_id":"r-1","sequence":3,'
    '"time_us":1700000000500000,"trace_id":""}'
)
UNDELEGATED_HASH = "b306c6f8c656ad7080ad03f72a7d1f5b0a4178b414ffcf210422edd3bddaa54a"

# The runs table's `on_behalf_of` column for the same person.
STORED_PERSON = (
    '{"display_name": "Alice \\u00c4. Example", "email": "alice@example.com", '
    '"evidence_sha256": "' + "ab" * 32 + '", "issuer": "https://idp.example.com", '
    '"method": "idp_verified", "subject": "u-1001"}'
)

ALICE = Person(
    subject="u-1001",
    issuer="https://idp.example.com",
    method=VerificationMethod.IDP_VERIFIED,
    evidence_sha256="ab" * 32,
    email="alice@example.com",
    display_name="Alice Ä. Example",
)


def test_a_stored_delegated_event_reads_back_and_seals_to_its_stored_hash() -> None:
    record = json.loads(DELEGATED_RECORD)
    assert chain_hash(PREV_HASH, record) == DELEGATED_HASH
    event, body = seal_with_record(from_record(record), 4, PREV_HASH)
    assert body.decode() == DELEGATED_RECORD
    assert event.hash == DELEGATED_HASH
    assert event.draft.on_behalf_of == ALICE


def test_an_event_made_today_for_the_same_person_has_the_same_hash_as_the_stored_one() -> None:
    draft = AuditDraft(
        time=1_700_000_000.123456,
        action="token.issued",
        outcome=Outcome.SUCCESS,
        principal=f"run:{RUN_ID}",
        on_behalf_of=ALICE,
        run_id=RUN_ID,
        pipeline=PipelineRef("acme", "web", "deploy"),
        trace_id="0af7651916cd43dd8448eb211c80319c",
        request_id="req-1",
        details=MappingProxyType(
            {"aud": "sample-api", "permissions": {"pipelines": "read"}, "step": "call-sample-api"}
        ),
    )
    assert to_record(4, draft) == json.loads(DELEGATED_RECORD)
    assert seal_with_record(draft, 4, PREV_HASH)[0].hash == DELEGATED_HASH


def test_a_stored_event_without_a_person_seals_to_its_stored_hash() -> None:
    event, body = seal_with_record(from_record(json.loads(UNDELEGATED_RECORD)), 3, "0" * 64)
    assert body.decode() == UNDELEGATED_RECORD
    assert event.hash == UNDELEGATED_HASH


def test_a_runs_person_column_is_written_as_before_and_reads_back() -> None:
    assert person_to_json(ALICE) == STORED_PERSON
    assert person_from_json(STORED_PERSON) == ALICE
    assert person_to_json(None) is None and person_from_json(None) is None


def test_the_audit_record_and_the_runs_table_store_a_person_alike() -> None:
    in_audit = json.loads(DELEGATED_RECORD)["on_behalf_of"]
    assert in_audit == json.loads(STORED_PERSON) == ALICE.as_record()
    assert Person.from_record(in_audit) == ALICE
