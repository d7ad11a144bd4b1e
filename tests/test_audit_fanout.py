"""Live StreamAudit fan-out: each event is read once and encoded once for every live
subscriber, and a subscriber that cannot keep up is dropped with where to resume, instead of
slowing the others."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest

from broker.api import convert
from broker.api.server import BrokerServer
from broker.audit.events import AuditEvent
from broker.audit.feed import AuditFeed, AuditFilter, Heartbeat
from broker.context import CallContext
from broker.errors import Unavailable
from broker.store import Write
from broker.store.changes import ChangeFeed
from broker.store.memory import MemoryStore
from tests.audit_support import AllowAll, auditor, draft, orchestrator
from tests.support import FakeClock, eventually, start_run_request
from tokenbroker import messages
from tokenbroker.v1 import broker_pb2, types_pb2

SUBSCRIBERS = 4  # the per-principal limit
RUNS = 20


@pytest.fixture
def following() -> Iterator[tuple[MemoryStore, ChangeFeed, AuditFeed]]:
    store = MemoryStore()
    changes = ChangeFeed(store)
    feed = AuditFeed(
        store, FakeClock(), AllowAll(), lambda run_id: None, changes=changes, max_backlog=10
    )
    changes.start()
    yield store, changes, feed
    feed.close()
    changes.close()


def received(got: list[int], sequence: int) -> bool:
    return got[-1:] == [sequence]


def events_of(items: list[object]) -> list[int]:
    return [e.sequence for item in items if isinstance(item, list) for e in item]


def test_a_live_subscriber_that_falls_behind_is_dropped_with_where_to_resume_and_loses_nothing(
    following: tuple[MemoryStore, ChangeFeed, AuditFeed],
) -> None:
    store, _, feed = following
    slow = feed.follow_pages(CallContext(), 0, AuditFilter())
    prompt = feed.follow_pages(CallContext(), 0, AuditFilter())
    firsts: list[object] = []
    waiting = [threading.Thread(target=lambda g=g: firsts.append(next(g))) for g in (slow, prompt)]
    for thread in waiting:
        thread.start()
    eventually(lambda: feed.live_subscribers == 2, within=10, what="both to follow live")
    store.commit(Write([draft()]))
    for thread in waiting:
        thread.join(10)
    assert events_of(firsts) == [1, 1]
    got_promptly: list[int] = []

    def read_promptly() -> None:
        with contextlib.suppress(Unavailable):  # the feed closes at the end of the test
            for item in prompt:
                if not isinstance(item, Heartbeat):
                    got_promptly.extend(e.sequence for e in item)

    reader = threading.Thread(target=read_promptly, daemon=True)
    reader.start()
    for sequence in range(2, 32):  # the slow one's backlog passes 10 on the way
        store.commit(Write([draft()]))
        # The prompt subscriber is not held up by the slow one.
        eventually(partial(received, got_promptly, sequence), within=10, what="the prompt one")
    with pytest.raises(Unavailable, match=r"fell 11 events behind.*resume with after_sequence=1$"):
        next(slow)
    resumed = feed.follow_pages(CallContext(), 1, AuditFilter(), stop_at_head=True)
    assert events_of(list(resumed)) == list(range(2, 32))
    assert got_promptly == list(range(2, 32))


def test_each_event_is_encoded_once_for_every_live_subscriber(server: BrokerServer) -> None:
    start = server.broker.store.head_sequence()
    received: list[list[int]] = [[] for _ in range(SUBSCRIBERS)]
    errors: list[grpc.RpcError] = []
    with auditor(server) as stub:
        streams = [
            stub.StreamAudit(
                broker_pb2.StreamAuditRequest(
                    after_sequence=start, max_events_per_message=100 if n % 2 else 0
                ),
                timeout=30,
            )
            for n in range(SUBSCRIBERS)
        ]

        def consume(n: int) -> None:
            try:
                for item in streams[n]:
                    received[n].extend(e.sequence for e in messages.events_of(item))
            except grpc.RpcError as error:
                errors.append(error)

        readers = [
            threading.Thread(target=consume, args=(n,), daemon=True) for n in range(SUBSCRIBERS)
        ]
        for reader in readers:
            reader.start()
        eventually(
            lambda: errors or server.broker.feed.live_subscribers == SUBSCRIBERS,
            within=10,
            what="live",
        )
        assert errors == []
        assert server.servicer is not None
        encoded_before = server.servicer.encoded_events.encodings
        with orchestrator(server) as writer:
            for _ in range(RUNS):
                writer.StartRun(start_run_request(), timeout=10)
        head = server.broker.store.head_sequence()
        expected = list(range(start + 1, head + 1))
        eventually(lambda: all(r == expected for r in received), within=20, what="all events")
        for stream in streams:
            stream.cancel()
    assert len(expected) >= RUNS
    # Five streams, one encoding per event (not five).
    assert server.servicer.encoded_events.encodings - encoded_before == len(expected)


def test_responses_put_together_from_encoded_events_are_the_messages_protobuf_would_send(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    store.commit(Write([draft(), draft(), draft()]))
    events: list[AuditEvent] = store.read_events(0, 10)
    encoded = convert.EncodedEvents()
    as_pb = [convert.audit_event_pb(e) for e in events]
    single = broker_pb2.StreamAuditResponse(event=as_pb[0])
    page = broker_pb2.StreamAuditResponse(page=broker_pb2.AuditEventPage(events=as_pb))
    assert convert.event_message(encoded.of(events[0])) == single.SerializeToString()
    assert convert.page_message([encoded.of(e) for e in events]) == page.SerializeToString()
    assert (
        broker_pb2.StreamAuditResponse.FromString(
            convert.page_message([encoded.of(e) for e in events])
        ).page.events
        == as_pb
    )
    assert encoded.encodings == 3
    assert isinstance(as_pb[0], types_pb2.AuditEvent)
