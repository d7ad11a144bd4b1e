"""Brokers on one PostgreSQL database behave as one broker: real gRPC servers on loopback,
each with its own data dir and signing key, sharing only the store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.runs.keys import KeyStatus
from tests.accounts import callers_of, standard_accounts
from tests.conftest import make_settings, standard_policy
from tests.support import eventually, start_run_request
from tokenbroker.v1 import broker_pb2

ISSUER = "https://broker.test"
REVOCATION_BOUND = 0.1  # seconds, p99 on loopback (the issue's target)


def replica(tmp_path: Path, name: str, dsn: str, policy: Path) -> BrokerServer:
    settings = make_settings(tmp_path / name, policy=policy, issuer=ISSUER, store=dsn)
    server = create_server(settings)
    server.start()
    return server


@pytest.fixture
def two(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[BrokerServer, BrokerServer]]:
    policy = standard_policy(tmp_path)
    a = replica(tmp_path, "a", pg_dsn, policy)
    b = replica(tmp_path, "b", pg_dsn, policy)
    yield a, b
    a.stop(grace=0.5)
    b.stop(grace=0.5)


def test_a_run_revoked_on_one_replica_is_rejected_on_the_other_within_100_ms(
    two: tuple[BrokerServer, BrokerServer],
) -> None:
    a, b = two
    with callers_of(a) as on_a, callers_of(b) as on_b:
        stub_a = on_a.stub(standard_accounts()["orchestrator"])
        stub_b = on_b.stub(standard_accounts()["orchestrator"])
        latencies = []
        for _ in range(20):
            run = stub_a.StartRun(start_run_request()).run
            token = stub_b.IssueToken(
                broker_pb2.IssueTokenRequest(run_id=run.run_id, audience="api.example.com")
            ).token
            verify = broker_pb2.VerifyTokenRequest(token=token)
            assert stub_a.VerifyToken(verify).active  # signed by B, verified by A
            stub_a.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run.run_id))
            revoked_at = time.monotonic()
            while stub_b.VerifyToken(verify).active:
                assert time.monotonic() - revoked_at < 5, "B never learned of A's revocation"
            latencies.append(time.monotonic() - revoked_at)
            # Never accepted again.
            assert stub_b.VerifyToken(verify).status == broker_pb2.TOKEN_STATUS_RUN_ENDED
    latencies.sort()
    assert latencies[-1] < REVOCATION_BOUND * 5, latencies  # generous: a shared 2-core machine
    assert latencies[len(latencies) // 2] < REVOCATION_BOUND, latencies


def test_a_subscriber_on_one_replica_sees_every_event_of_both_in_order(
    two: tuple[BrokerServer, BrokerServer],
) -> None:
    a, b = two
    with callers_of(a) as on_a, callers_of(b) as on_b:
        writers = [
            on_a.stub(standard_accounts()["orchestrator"]),
            on_b.stub(standard_accounts()["orchestrator"]),
        ]
        auditor = on_b.stub(standard_accounts()["root"])
        start = b.broker.store.head_sequence()
        for i in range(10):
            writers[i % 2].StartRun(start_run_request())
        head = b.broker.store.head_sequence()
        stream = auditor.StreamAudit(broker_pb2.StreamAuditRequest(after_sequence=start))
        sequences: list[int] = []
        for response in stream:
            if response.HasField("event"):
                sequences.append(response.event.sequence)
            if sequences and sequences[-1] >= head:
                stream.cancel()
                break
    assert sequences == list(range(start + 1, head + 1))


def test_one_keys_rotate_rotates_every_replica_and_every_jwks_lists_every_key(
    two: tuple[BrokerServer, BrokerServer],
) -> None:
    a, b = two
    with callers_of(a) as on_a, callers_of(b) as on_b:
        admin_a = on_a.stub(standard_accounts()["admin"])
        before_b = b.broker.keys.active.kid
        rotated = admin_a.RotateSigningKey(broker_pb2.RotateSigningKeyRequest())
        signs_from = rotated.signs_from.ToMicroseconds() / 1e6

        def successor_of_b() -> KeyStatus | None:
            own = [s for s in b.broker.keys.schedule() if s.kid in b.broker.keys.own_kids()]
            return next((s for s in own if s.state == "prepublished"), None)

        # B reads the rotation from the store and pre-publishes its own successor, which
        # signs when A's does; until then both replicas sign with their old keys.
        successor = eventually(successor_of_b, what="B to follow the rotation")
        assert successor.activate_time == pytest.approx(signs_from)
        assert b.broker.keys.active.kid == before_b

        def kids(server: BrokerServer) -> set[str]:
            return {k["kid"] for k in server.broker.keys.jwks()["keys"]}

        # A change on one replica reaches the other's JWKS through the change feed.
        eventually(
            lambda: kids(a) == kids(b) and successor.kid in kids(a),
            what="both replicas' JWKS to list every key in use",
        )
        jwks_b = kids(b)
        assert rotated.key_id in jwks_b and before_b in jwks_b

        # An emergency rotation stops every old key at once, on every replica.
        admin_a.RotateSigningKey(broker_pb2.RotateSigningKeyRequest(emergency=True))
        eventually(
            lambda: b.broker.keys.active.kid not in (before_b, successor.kid),
            what="B to sign with a new key at once",
        )
        run = on_a.stub(standard_accounts()["orchestrator"]).StartRun(start_run_request()).run
        token = (
            on_b.stub(standard_accounts()["orchestrator"])
            .IssueToken(broker_pb2.IssueTokenRequest(run_id=run.run_id, audience="api.example.com"))
            .token
        )
        assert admin_a.VerifyToken(broker_pb2.VerifyTokenRequest(token=token)).active


def test_twenty_duplicate_starts_over_two_replicas_make_one_run(
    two: tuple[BrokerServer, BrokerServer],
) -> None:
    import threading

    a, b = two
    with callers_of(a) as on_a, callers_of(b) as on_b:
        stubs = [
            on_a.stub(standard_accounts()["orchestrator"]),
            on_b.stub(standard_accounts()["orchestrator"]),
        ]
        run_ids: list[str] = []
        errors: list[grpc.RpcError] = []

        def start(n: int) -> None:
            try:
                response = stubs[n % 2].StartRun(start_run_request(idempotency_key="deploy-42"))
                run_ids.append(response.run.run_id)
            except grpc.RpcError as error:
                errors.append(error)

        threads = [threading.Thread(target=start, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(set(run_ids)) == 1
    started = [e for e in a.broker.store.read_events(0, 1000) if e.draft.action == "run.started"]
    assert len(started) == 1


def test_a_client_given_both_replicas_keeps_working_when_one_stops(
    two: tuple[BrokerServer, BrokerServer],
) -> None:
    from tests.clientsupport import client_credentials
    from tokenbroker import BrokerClient

    a, b = two
    target = f"{a.target},{b.target}"
    with BrokerClient(target, credentials=client_credentials(a)) as client:
        ceiling = {"artifacts": "write"}
        runs = [
            client.start_run("acme", "web", "deploy", ceiling=ceiling).run.run_id for _ in range(6)
        ]
        a.stop(grace=0.5)
        # Reads and revocations are safe to retry: they move to the surviving replica.
        for run_id in runs:
            assert client.get_run(run_id).run.run_id == run_id
            client.revoke_run(run_id)
        assert all(
            b.broker.store.get_run(run_id).state.value == "ended"  # type: ignore[union-attr]
            for run_id in runs
        )


def test_several_targets_must_be_addresses_or_a_dns_name() -> None:
    from tokenbroker import ConfigurationError
    from tokenbroker.connect import grpc_target

    assert grpc_target("127.0.0.1:7000,127.0.0.2:7001")[0] == ("ipv4:127.0.0.1:7000,127.0.0.2:7001")
    assert grpc_target("[::1]:7000,[::1]:7001")[0] == "ipv6:[::1]:7000,[::1]:7001"
    assert grpc_target("dns:///broker.internal:7000")[1]  # balanced round-robin
    assert grpc_target("broker.internal:7000") == ("broker.internal:7000", [])
    with pytest.raises(ConfigurationError, match="dns:///"):
        grpc_target("a.internal:7000,b.internal:7000")
