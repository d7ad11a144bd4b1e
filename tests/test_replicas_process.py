"""Broker processes on one PostgreSQL database, as a platform team runs them: `token-broker
serve --store postgresql://…` subprocesses on loopback, a client given every replica, and one
replica killed with SIGKILL under load."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.accounts import standard_accounts
from tests.conftest import standard_policy
from tests.support import REPO, BrokerProcess, eventually, hold_load, start_broker_process
from tokenbroker import BrokerClient, BrokerError, assertion_credentials
from tokenbroker.retry import RetryPolicy
from tokenbroker.v1 import types_pb2

ISSUER = "https://broker.test"
CEILING = {"artifacts": "write"}


@pytest.fixture
def replicas(tmp_path: Path, pg_dsn: str) -> Iterator[list[BrokerProcess]]:
    policy = standard_policy(tmp_path)
    started = [
        start_broker_process(
            tmp_path / f"replica-{n}",
            [
                "--store",
                pg_dsn,
                "--policy",
                str(policy),
                "--issuer",
                ISSUER,
                "--reap-interval",
                "0.2",
            ],
        )
        for n in range(3)
    ]
    yield started
    for replica in started:
        if replica.process.poll() is None:
            replica.process.kill()
            replica.process.wait(10)


def client_for(replicas: list[BrokerProcess], retry: RetryPolicy | None = None) -> BrokerClient:
    root = standard_accounts()["root"]
    credentials = assertion_credentials(root.name, root.private_pem, ISSUER, key_id=root.kid)
    target = ",".join(r.target for r in replicas)
    return BrokerClient(target, credentials=credentials, timeout=10, retry=retry)


def test_three_replicas_expire_a_run_exactly_once_and_stream_each_others_events(
    replicas: list[BrokerProcess],
) -> None:
    with client_for(replicas[:1]) as first, client_for(replicas[2:]) as third:
        run = first.start_run("acme", "web", "deploy", ceiling=CEILING, lease=1.0).run

        def actions() -> list[str]:
            stream = third.stream_audit(after=0, run_id=run.run_id, follow=False)
            return [event.action for event in stream]

        # GetRun says EXPIRED at the lapse; the reapers' record follows within a pass.
        eventually(lambda: "run.expired" in actions(), within=15, interval=0.05)
        assert third.get_run(run.run_id).run.state == types_pb2.RUN_STATE_EXPIRED
        hold_load(1.0)  # every replica's reaper passes again: none may expire it twice
        recorded = actions()
    assert recorded.count("run.expired") == 1, recorded
    assert recorded[0] == "run.started"


def test_killing_one_replica_under_load_loses_no_acknowledged_write(
    replicas: list[BrokerProcess], pg_dsn: str
) -> None:
    acknowledged_runs: list[str] = []
    acknowledged_revokes: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    retry = RetryPolicy(max_attempts=8, initial_backoff=0.05, max_backoff=0.5)

    def load(worker: int) -> None:
        with client_for(replicas, retry) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    run = client.start_run(
                        "acme", "web", "deploy", ceiling=CEILING, idempotency_key=f"w{worker}-{n}"
                    ).run
                    acknowledged_runs.append(run.run_id)
                    client.revoke_run(run.run_id)
                    acknowledged_revokes.append(run.run_id)
                except BrokerError as error:
                    failures.append(error)

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    eventually(lambda: len(acknowledged_revokes) >= 20, within=30, what="load before the kill")
    replicas[0].process.send_signal(signal.SIGKILL)
    replicas[0].process.wait(10)
    after_kill = len(acknowledged_revokes)
    eventually(lambda: len(acknowledged_revokes) >= after_kill + 20, within=30, what="load after")
    stop.set()
    for worker in workers:
        worker.join(30)
    assert failures == [], failures[:3]
    assert len(acknowledged_revokes) > 20
    with client_for(replicas[1:]) as survivor:
        for run_id in acknowledged_runs:
            assert survivor.get_run(run_id).run.state == types_pb2.RUN_STATE_ENDED
    verified = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify", "--store", pg_dsn],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
