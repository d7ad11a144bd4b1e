"""The key ring's schedule with two replicas on one store, stepped by a fake clock: each
replica decides what to sign with from the stored schedule alone, however late it reads it."""

from __future__ import annotations

from pathlib import Path

from broker.audit.events import Action
from broker.context import CallContext
from broker.identity import BROKER
from broker.runs.keys import KeyRing
from broker.store.memory import MemoryStore
from tests.audit_support import AllowAll
from tests.support import FakeClock

HOUR = 3600.0
ADMIN = CallContext(principal=BROKER)


def ring(store: MemoryStore, clock: FakeClock, key_dir: Path) -> KeyRing:
    keys = KeyRing(
        store,
        clock,
        key_dir=key_dir,
        alg="ES256",
        retire_after=25 * HOUR,
        authorizer=AllowAll(),
        prepublish=HOUR,
    )
    keys.load(ADMIN)
    return keys


def two_replicas(tmp_path: Path) -> tuple[KeyRing, KeyRing, FakeClock]:
    store, clock = MemoryStore(), FakeClock(1_000_000.0)
    return ring(store, clock, tmp_path / "a"), ring(store, clock, tmp_path / "b"), clock


def test_a_replica_follows_a_rotation_with_a_successor_that_signs_when_the_rotating_ones_does(
    tmp_path: Path,
) -> None:
    a, b, clock = two_replicas(tmp_path)
    old_a, old_b = a.active.kid, b.active.kid
    rotation = a.rotate(ADMIN)
    b.refresh()  # what the change feed does when the rotation's events pass
    [successor] = b.own_kids() - {old_b}
    assert {s.kid: s.activate_time for s in b.schedule()}[successor] == rotation.signs_from
    clock.advance(HOUR - 1)
    assert (a.active.kid, b.active.kid) == (old_a, old_b)
    clock.advance(1)
    assert (a.active.kid, b.active.kid) == (rotation.new_kids[0], successor)


def test_a_replica_that_reads_a_rotation_after_its_window_signs_with_its_successor_at_once(
    tmp_path: Path,
) -> None:
    a, b, clock = two_replicas(tmp_path)
    old_b = b.active.kid
    a.rotate(ADMIN)
    clock.advance(2 * HOUR)  # B was cut off from the store meanwhile
    assert b.active.kid == old_b  # better than not signing
    b.refresh()
    assert b.active.kid != old_b
    [status] = [s for s in b.schedule() if s.kid == b.active.kid]
    assert status.activate_time == clock()


def test_an_emergency_overtaking_a_normal_rotation_stops_every_replica_old_keys_at_once(
    tmp_path: Path,
) -> None:
    a, b, clock = two_replicas(tmp_path)
    old_b = b.active.kid
    a.rotate(ADMIN)
    b.refresh()
    pending_b = b.own_kids() - {old_b}
    clock.advance(60)
    emergency = a.rotate(ADMIN, emergency=True)
    assert a.active.kid == emergency.new_kids[0]
    assert set(emergency.retiring_kids) >= {old_b, *pending_b}
    b.refresh()
    assert b.active.kid not in {old_b, *pending_b}


def test_a_successor_made_for_a_normal_rotation_that_an_emergency_overtook_is_replaced(
    tmp_path: Path,
) -> None:
    """B read the normal rotation and made its successor (signing at the end of the window)
    while A's emergency rotation was choosing which keys to stop: the emergency missed it.
    B's next refresh sees a successor that would sign only later and makes one for now."""
    a, b, clock = two_replicas(tmp_path)
    old_b = b.active.kid
    normal = a.rotate(ADMIN)
    clock.advance(60)
    a.rotate(ADMIN, emergency=True)
    # The successor B's refresh decided on before the emergency, committed after it.
    stale = b._create(ADMIN, "ES256", Action.KEY_ROTATED, normal.signs_from)
    b.refresh()
    assert b.active.kid not in (old_b, stale.kid)
    [status] = [s for s in b.schedule() if s.kid == b.active.kid]
    assert status.activate_time == clock()
    assert {s.kid: s.state for s in b.schedule()}[stale.kid] == "retiring"  # superseded
    clock.advance(HOUR)  # past the stale one's activation: it never signs
    assert b.active.kid == status.kid
