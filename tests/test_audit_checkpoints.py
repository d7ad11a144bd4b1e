"""Signed checkpoints and retention, as the broker's audit keeper takes them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import settings as settings_module
from broker.api.server import create_server
from broker.app import build_broker
from broker.audit import checkpoints
from broker.audit import events as audit
from broker.audit.checkpoints import CheckpointInvalid, PrivateKeySigner, PublishedKeys
from broker.cli import main as cli
from broker.settings import SettingsError
from broker.store import Store, Write
from broker.store.factory import OpenOptions, open_store
from tests.audit_support import (
    draft,
    keeper,
    make_signer,
    orchestrator,
    publish,
)
from tests.conftest import make_settings
from tests.support import FakeClock, eventually, start_run_request


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[Store]:
    backend = open_store(store_url, OpenOptions(data_dir=tmp_path))
    yield backend
    backend.close()


def write(store: Store, count: int, at: float = 1000.0) -> None:
    store.commit(Write([draft(time=at) for _ in range(count)]))


def test_a_checkpoint_signs_the_head_and_verifies_with_the_published_key(store: Store) -> None:
    signer = make_signer()
    publish(store, signer)
    write(store, 4)
    clock = FakeClock(2000.0)
    record = keeper(store, signer, clock).checkpoint()
    assert record is not None
    head = store.read_events(4, 1)[0]
    assert (record.sequence, record.hash, record.prev_sequence, record.kid) == (
        5,
        head.hash,
        0,
        signer.kid,
    )
    keys = PublishedKeys.from_records(store.public_keys())
    verified = checkpoints.verify_record(keys, record)
    assert (verified.sequence, verified.hash, verified.issued_at) == (5, head.hash, 2000)
    assert jwt.get_unverified_header(record.jws)["typ"] == checkpoints.CHECKPOINT_TYP
    assert store.latest_checkpoint() == record


def test_nothing_is_checkpointed_twice_or_without_a_signer(store: Store) -> None:
    signer = make_signer()
    write(store, 3)
    assert keeper(store, None, FakeClock()).checkpoint() is None
    active = keeper(store, signer, FakeClock())
    first = active.checkpoint()
    assert first is not None and active.checkpoint() is None
    write(store, 2)
    second = active.checkpoint()
    assert second is not None and (second.sequence, second.prev_sequence) == (5, 3)


def test_the_keeper_thread_checkpoints_every_n_events_and_once_more_at_close(
    store: Store,
) -> None:
    signer = make_signer()
    running = keeper(store, signer, FakeClock(), every_events=10)
    running.start()
    try:
        for _ in range(25):
            write(store, 1)
        # Wherever its checkpoints landed while events arrived, it ends fewer than 10 behind.
        eventually(lambda: checkpointed(store) > 25 - 10, what="a checkpoint within 10 events")
    finally:
        running.close()
    latest = store.latest_checkpoint()
    assert latest is not None and latest.sequence == 25  # the tail, covered at shutdown
    stored = store.checkpoints(0, 100)
    assert [c.prev_sequence for c in stored] == [0, *(c.sequence for c in stored[:-1])]


def checkpointed(store: Store) -> int:
    latest = store.latest_checkpoint()
    return 0 if latest is None else latest.sequence


def test_retention_prunes_only_whole_checkpointed_ranges_older_than_the_period(
    store: Store,
) -> None:
    signer = make_signer()
    publish(store, signer, now=1000.0)
    clock = FakeClock(1000.0)
    keep = keeper(store, signer, clock, retention_seconds=3600.0)
    write(store, 9, at=1000.0)  # sequences 2..10
    keep.checkpoint()  # at 10
    write(store, 5, at=1000.0)  # 11..15, old but not yet checkpointed
    assert keep.prune() is None  # nothing is old yet
    clock.now = 1000.0 + 3601
    write(store, 3, at=clock.now)  # 16..18, young
    assert keep.prune() == 10  # 11..15 are old too, but no checkpoint closes their range
    assert (store.pruned_through(), store.oldest_sequence()) == (10, 11)
    pruned = store.read_events(store.head_sequence() - 1, 1)[0]
    assert pruned.draft.action == audit.Action.AUDIT_PRUNED
    assert pruned.draft.details["pruned_through"] == 10
    assert keep.prune() is None
    keep.checkpoint()  # at 19 (the audit.pruned event): includes young events, so it stays
    assert keep.prune() is None


def test_checkpoints_of_another_type_key_or_algorithm_do_not_verify() -> None:
    signer = make_signer("k1")
    keys = PublishedKeys([json.loads(signer.public_jwk())])
    claims = checkpoints.claims_for(7, "ab" * 32, 0, 1000.0, "iss")
    assert keys.verify(signer.sign(claims, typ=checkpoints.CHECKPOINT_TYP)).sequence == 7
    with pytest.raises(CheckpointInvalid, match="typ"):
        keys.verify(signer.sign(claims, typ="at+jwt"))
    impostor = make_signer("k1")  # same kid, different key
    with pytest.raises(CheckpointInvalid, match="signature"):
        keys.verify(impostor.sign(claims, typ=checkpoints.CHECKPOINT_TYP))
    with pytest.raises(CheckpointInvalid, match="unknown key"):
        keys.verify(make_signer("k2").sign(claims, typ=checkpoints.CHECKPOINT_TYP))
    rsa_signer = PrivateKeySigner(rsa.generate_private_key(65537, 2048), "k1", "RS256")
    with pytest.raises(CheckpointInvalid):  # the key's algorithm decides, not the header's
        keys.verify(rsa_signer.sign(claims, typ=checkpoints.CHECKPOINT_TYP))
    bad_claims = {**claims, "prev_seq": 9}
    with pytest.raises(CheckpointInvalid, match="prev_seq"):
        keys.verify(signer.sign(bad_claims, typ=checkpoints.CHECKPOINT_TYP))


def test_a_large_backlog_is_pruned_in_bounded_steps_of_whole_ranges(store: Store) -> None:
    clock = FakeClock(1000.0)
    keep = keeper(store, make_signer(), clock, retention_seconds=60.0, prune_batch=15)
    for _ in range(3):
        write(store, 10)
        keep.checkpoint()  # at 10, 20, 30
    write(store, 5)  # 31..35: old, but no checkpoint closes their range yet
    clock.advance(61)
    assert keep.prune() == 30
    pruned = [e for e in store.read_events(0, 100) if e.draft.action == audit.Action.AUDIT_PRUNED]
    assert [e.draft.details["pruned_through"] for e in pruned] == [10, 20, 30]
    assert store.oldest_sequence() == 31


def test_a_broker_with_a_signer_leaves_its_log_checkpointed_and_verifiable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path / "data")
    signer = make_signer()
    server = create_server(settings, broker=build_broker(settings, signer=signer))
    server.start()
    try:
        with orchestrator(server) as stub:
            for _ in range(3):
                stub.StartRun(start_run_request(), timeout=5)
    finally:
        server.stop(grace=0.5)  # takes the final checkpoint
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [json.loads(signer.public_jwk())]}))
    args = ["audit", "verify", "--data-dir", str(settings.data_dir), "--jwks", str(jwks), "--json"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    # policy.loaded, key.created, then three run.started: all five under the checkpoint.
    assert (report["checkpoints_verified"], report["anchored_through"]) == (1, 5)


def test_the_key_ring_signs_checkpoints_that_verify_against_the_published_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path / "data")
    server = create_server(settings)
    server.start()
    try:
        with orchestrator(server) as stub:
            stub.StartRun(start_run_request(), timeout=5)
    finally:
        server.stop(grace=0.5)
    assert cli.main(["audit", "verify", "--data-dir", str(settings.data_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["checkpoints_verified"], report["anchored_through"]) == (1, 3)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--audit-checkpoint-events", "0"),
        ("--audit-checkpoint-interval", "0"),
        ("--audit-retention-days", "-1"),
    ],
)
def test_unsafe_audit_settings_are_refused(flag: str, value: str) -> None:
    with pytest.raises(SettingsError, match=flag):
        settings_module.parse([flag, value], environ={})
