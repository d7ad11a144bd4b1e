"""Live audit streams run on a pool of their own: they never take the unary calls' threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from tests.audit_support import auditor, orchestrator
from tests.conftest import make_settings, standard_policy
from tests.support import eventually, start_run_request
from tokenbroker.v1 import broker_pb2

UNARY_THREADS = 4
STREAMS = 8


@pytest.fixture
def small_pool(tmp_path: Path) -> Iterator[BrokerServer]:
    settings = make_settings(
        tmp_path / "data",
        policy=standard_policy(tmp_path),
        max_workers=UNARY_THREADS,
        max_audit_streams=STREAMS,
        audit_streams_per_principal=STREAMS + 1,
    )
    running = create_server(settings, broker=build_broker(settings))
    running.start()
    yield running
    running.stop(grace=0.5)


def test_more_live_streams_than_unary_threads_leave_unary_calls_answered(
    small_pool: BrokerServer,
) -> None:
    server = small_pool
    head = server.broker.store.head_sequence()
    errors: list[grpc.RpcError] = []
    with auditor(server) as stub:
        streams = [
            stub.StreamAudit(broker_pb2.StreamAuditRequest(after_sequence=head), timeout=30)
            for _ in range(STREAMS)
        ]

        def follow(stream: Iterator[object]) -> None:
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.CANCELLED:
                    errors.append(error)

        for stream in streams:
            threading.Thread(target=follow, args=(stream,), daemon=True).start()
        eventually(
            lambda: errors or server.broker.feed.live_subscribers == STREAMS, within=10, what="live"
        )
        assert errors == []
        # Twice as many unary calls at once as the unary pool has threads: all answered
        # while every stream is live (with one pool, the streams held all its threads).
        with orchestrator(server) as writer, futures.ThreadPoolExecutor(8) as pool:
            started = list(
                pool.map(
                    lambda _: writer.StartRun(start_run_request(), timeout=10),
                    range(2 * UNARY_THREADS),
                )
            )
        assert len({s.run.run_id for s in started}) == 2 * UNARY_THREADS
        # One stream more than --max-audit-streams is refused, resumably.
        extra = stub.StreamAudit(broker_pb2.StreamAuditRequest(after_sequence=head), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(extra))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        for stream in streams:
            stream.cancel()
