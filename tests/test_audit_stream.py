"""StreamAudit under load: every subscriber gets every matching event exactly once, in order;
resuming after a disconnect loses and repeats nothing; retention never skips silently; a
stalled subscriber holds neither memory nor writers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.audit.events import AuditDraft, AuditEvent, Outcome
from broker.audit.feed import PAGE_SIZE, AuditFeed, AuditFilter
from broker.context import CallContext
from broker.errors import OutOfRange, Unavailable
from broker.store import Store, Write
from broker.store.memory import MemoryStore
from broker.store.sqlite import SqliteStore
from tests.accounts import callers_of, standard_accounts
from tests.audit_support import (
    AllowAll,
    Broker,
    auditor,
    draft,
    keeper,
    make_signer,
    orchestrator,
)
from tests.conftest import make_settings
from tests.support import (
    FakeClock,
    details,
    eventually,
    perms,
    pipeline,
    rpc_error,
    start_run_request,
)
from tokenbroker.v1 import broker_pb2

WRITERS = 8
RUNS_PER_WRITER = 150  # x 2 events (started, ended) = 2400 events


def writer_pipeline(i: int) -> broker_pb2.StartRunRequest:
    org = "acme" if i % 2 == 0 else "globex"
    return broker_pb2.StartRunRequest(
        pipeline=pipeline(org=org, project=f"p{i % 4}"), permission_ceiling=perms(artifacts="read")
    )


def all_events(store: Store) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    while page := store.read_events(events[-1].sequence if events else 0, 1000):
        events.extend(page)
    return events


@dataclass
class Subscriber:
    """A StreamAudit consumer on its own thread, recording the sequences it receives."""

    target: Broker
    request: broker_pb2.StreamAuditRequest
    delay: float = 0.0
    received: list[int] = field(default_factory=list)
    error: grpc.RpcError | None = None

    def start(self) -> Subscriber:
        self._call_ready = threading.Event()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()
        assert self._call_ready.wait(10)
        return self

    def _consume(self) -> None:
        with auditor(self.target) as stub:
            self._call = stub.StreamAudit(self.request, timeout=120)
            self._call_ready.set()
            try:
                for item in self._call:
                    if item.HasField("event"):
                        self.received.append(item.event.sequence)
                        if self.delay:
                            time.sleep(self.delay)
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.CANCELLED:
                    self.error = error

    def wait_for(self, count: int, within: float = 60) -> None:
        eventually(
            lambda: len(self.received) >= count or self.error is not None,
            within=within,
            what=f"{count} events (got {len(self.received)})",
        )

    def stop(self) -> None:
        self._call.cancel()
        self._thread.join(10)


def test_concurrent_writers_and_subscribers_each_get_every_matching_event_exactly_once(
    server: BrokerServer,
) -> None:
    def of_globex(e: AuditEvent) -> bool:
        return e.draft.pipeline is not None and e.draft.pipeline.org == "globex"

    def ended(e: AuditEvent) -> bool:
        return e.draft.action == "run.ended"

    def of_p2(e: AuditEvent) -> bool:
        return e.draft.pipeline is not None and e.draft.pipeline.project == "p2"

    filters: list[tuple[broker_pb2.AuditFilter, Callable[[AuditEvent], bool], float]] = [
        (broker_pb2.AuditFilter(), lambda e: True, 0.0),
        (broker_pb2.AuditFilter(org="globex"), of_globex, 0.0),
        (broker_pb2.AuditFilter(actions=["run.ended"]), ended, 0.002),  # the slow one
        (broker_pb2.AuditFilter(project="p2"), of_p2, 0.0),
    ]
    subscribers = [
        Subscriber(server, broker_pb2.StreamAuditRequest(filter=f), delay=d).start()
        for f, _, d in filters
    ]

    def write(i: int) -> None:
        with orchestrator(server) as stub:
            for _ in range(RUNS_PER_WRITER):
                run = stub.StartRun(writer_pipeline(i), timeout=10).run
                stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id), timeout=10)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(120)
    log = all_events(server.broker.store)
    assert [e.sequence for e in log] == list(range(1, len(log) + 1))
    assert sum(e.draft.action.startswith("run.") for e in log) == WRITERS * RUNS_PER_WRITER * 2
    for subscriber, (_, matches, _) in zip(subscribers, filters, strict=True):
        expected = [e.sequence for e in log if matches(e)]
        subscriber.wait_for(len(expected))
        subscriber.stop()
        assert subscriber.error is None, subscriber.error
        assert subscriber.received == expected


def test_a_subscriber_resuming_after_a_disconnect_gets_exactly_the_missed_events(
    server: BrokerServer,
) -> None:
    stop_writing = threading.Event()

    def write() -> None:
        with orchestrator(server) as stub:
            while not stop_writing.is_set():
                stub.StartRun(start_run_request(), timeout=10)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        first = Subscriber(server, broker_pb2.StreamAuditRequest()).start()
        first.wait_for(30)
        first.stop()  # mid-stream, while events keep coming
        last = first.received[-1]
        resumed = Subscriber(server, broker_pb2.StreamAuditRequest(after_sequence=last))
        resumed.start().wait_for(20)
    finally:
        stop_writing.set()
        writer.join(10)
    head = server.broker.store.head_sequence()
    resumed.wait_for(head - last)
    resumed.stop()
    assert first.received == list(range(1, last + 1))
    assert resumed.received == list(range(last + 1, head + 1))


@pytest.fixture
def retained(tmp_path: Path) -> Iterator[tuple[BrokerServer, FakeClock]]:
    """A broker with one-day retention, a checkpoint signer and a clock the test moves."""
    # The test moves the clock past every run's deadline: a reaper pass would add run.expired
    # events between the ones it counts, so the reaper waits longer than the test runs.
    settings = make_settings(tmp_path / "data", audit_retention_days=1.0, reap_interval=3600.0)
    clock = FakeClock(1_000_000.0)
    broker = build_broker(settings, clock=clock, signer=make_signer())
    running = create_server(settings, broker=broker)
    running.start()
    yield running, clock
    running.stop(grace=0.5)


def test_a_cursor_older_than_retention_is_out_of_range_naming_the_oldest_sequence(
    retained: tuple[BrokerServer, FakeClock],
) -> None:
    server, clock = retained
    # The log starts with the broker's own policy.loaded and key.created events.
    with orchestrator(server) as stub:
        for _ in range(5):
            stub.StartRun(start_run_request(), timeout=5)
        old = server.broker.store.head_sequence()
        assert server.broker.keeper.checkpoint() is not None  # at `old`
        clock.advance(86400 + 1)
        stub.StartRun(start_run_request(), timeout=5)  # old + 1, young
    assert server.broker.keeper.prune() == old  # and old + 2 is the audit.pruned event
    young = old + 1
    with auditor(server) as stub:
        error = rpc_error(
            lambda: list(stub.StreamAudit(broker_pb2.StreamAuditRequest(after_sequence=3)))
        )
        assert error.code() is grpc.StatusCode.OUT_OF_RANGE
        assert f"the oldest available sequence is {young}" in details(error)
        for cursor in (old, 0):  # 0 means "from the oldest retained"
            request = broker_pb2.StreamAuditRequest(after_sequence=cursor, stop_at_head=True)
            got = [item.event.sequence for item in stub.StreamAudit(request, timeout=5)]
            assert got == [young, young + 1]


def test_retention_overtaking_a_slow_subscriber_ends_its_stream_out_of_range() -> None:
    store = MemoryStore()
    clock = FakeClock(1000.0)
    keep = keeper(store, make_signer(), clock, retention_seconds=60.0)
    store.commit(Write([draft(time=1000.0) for _ in range(PAGE_SIZE + 100)]))
    keep.checkpoint()
    feed = AuditFeed(store, clock, AllowAll(), lambda run_id: None)
    following = feed.follow(CallContext(), 0, AuditFilter())
    got = [next(following)]
    clock.advance(61)
    store.commit(Write([draft(time=clock.now)]))
    assert keep.prune() == PAGE_SIZE + 100
    with pytest.raises(OutOfRange, match=f"oldest available sequence is {PAGE_SIZE + 101}"):
        got.extend(following)  # the page already read is delivered; then no silent skip
    assert [e.sequence for e in got if isinstance(e, AuditEvent)] == list(range(1, PAGE_SIZE + 1))


def test_audit_streams_beyond_the_limit_are_refused_so_writers_keep_their_workers() -> None:
    store = MemoryStore()
    store.commit(Write([draft()]))
    feed = AuditFeed(store, FakeClock(), AllowAll(), lambda run_id: None, max_subscribers=1)
    first = feed.follow(CallContext(), 0, AuditFilter())
    assert isinstance(next(first), AuditEvent)
    with pytest.raises(Unavailable, match="already serves 1 audit streams"):
        next(feed.follow(CallContext(), 0, AuditFilter()))
    first.close()  # a subscriber that leaves frees its place
    assert isinstance(next(feed.follow(CallContext(), 0, AuditFilter())), AuditEvent)


class ObservedStore(SqliteStore):
    """Records how far subscribers have read the log."""

    read_through = 0

    def read_events(self, after: int, limit: int) -> list[AuditEvent]:
        events = super().read_events(after, limit)
        # Only what RPC threads read for subscribers (the checkpoint keeper reads too).
        if events and threading.current_thread().name.startswith("rpc"):
            self.read_through = max(self.read_through, events[-1].sequence)
        return events


def test_a_stalled_subscriber_holds_one_page_and_blocks_neither_writers_nor_others(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data")
    store = ObservedStore(settings.data_dir)
    padding = {"padding": "x" * 400}
    event = AuditDraft(time=1.0, action="test.padded", outcome=Outcome.SUCCESS, details=padding)
    store.commit(Write([event] * 3000))
    server = create_server(settings, broker=build_broker(settings, store=store))
    server.start()
    try:
        # A client granting only HTTP/2's default 64 KiB window (no BDP-driven growth).
        with auditor(server, options=[("grpc.http2.bdp_probe", 0)]) as stalled_stub:
            stalled = stalled_stub.StreamAudit(broker_pb2.StreamAuditRequest(), timeout=60)
            assert next(stalled).event.sequence == 1  # ...and then it stops reading
            settled = _settle(lambda: store.read_through)
            assert settled <= PAGE_SIZE, "the server ran ahead of its stalled subscriber"
            with orchestrator(server) as stub:
                for _ in range(50):
                    stub.StartRun(start_run_request(), timeout=5)  # writers are not held up
            head = store.head_sequence()
            other = Subscriber(server, broker_pb2.StreamAuditRequest(stop_at_head=True)).start()
            other.wait_for(head)
            other.stop()
            assert other.received == list(range(1, head + 1))
            rest = [next(stalled).event.sequence for _ in range(head - 1)]
            assert rest == list(range(2, head + 1))  # it catches up, from the store
            stalled.cancel()
    finally:
        server.stop(grace=0.5)


def _settle(value: Callable[[], int]) -> int:
    """The value once it stopped changing for a few polls."""
    seen: list[int] = []

    def unchanged_for_five_polls() -> bool:
        seen.append(value())
        return len(seen) >= 5 and len(set(seen[-5:])) == 1

    eventually(unchanged_for_five_polls, interval=0.05, what="the value to stop changing")
    return seen[-1]


def test_pages_carry_exactly_the_events_of_the_one_event_stream_in_order(
    server: BrokerServer,
) -> None:
    with orchestrator(server) as stub:
        for i in range(120):
            stub.StartRun(writer_pipeline(i), timeout=10)
    with callers_of(server) as callers:
        root = callers.stub(standard_accounts()["root"])
        singles = [
            r.event.sequence
            for r in root.StreamAudit(broker_pb2.StreamAuditRequest(stop_at_head=True))
            if r.HasField("event")
        ]
        paged = list(
            root.StreamAudit(
                broker_pb2.StreamAuditRequest(stop_at_head=True, max_events_per_message=50)
            )
        )
    pages = [r.page for r in paged if r.HasField("page")]
    assert not any(r.HasField("event") for r in paged)
    assert all(0 < len(page.events) <= 50 for page in pages)
    assert [e.sequence for page in pages for e in page.events] == singles
    assert singles == list(range(1, len(singles) + 1)) and len(singles) >= 120
    # A page request beyond the broker's maximum is served at the maximum, not refused.
    with callers_of(server) as callers:
        huge = callers.stub(standard_accounts()["root"]).StreamAudit(
            broker_pb2.StreamAuditRequest(stop_at_head=True, max_events_per_message=10**6)
        )
        assert sum(len(r.page.events) for r in huge) == len(singles)


def test_a_stream_to_the_head_reads_past_what_the_change_feed_remembers(
    server: BrokerServer,
) -> None:
    """The feed's memory lags the store (it gathers before reading): a subscriber that stops
    at the head must still get every committed event, not only the remembered ones."""
    server.broker.changes.close()  # its thread would catch up by itself; this test moves it
    with orchestrator(server) as stub:
        stub.StartRun(writer_pipeline(0), timeout=10)
        server.broker.changes.catch_up()  # the feed remembers up to here, and no further
        for i in range(1, 6):
            stub.StartRun(writer_pipeline(i), timeout=10)
    head = server.broker.store.head_sequence()
    with callers_of(server) as callers:
        root = callers.stub(standard_accounts()["root"])
        responses = root.StreamAudit(broker_pb2.StreamAuditRequest(stop_at_head=True))
        sequences = [r.event.sequence for r in responses if r.HasField("event")]
    assert sequences == list(range(1, head + 1))
