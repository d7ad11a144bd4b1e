"""Drain on SIGTERM (issue 14 §2): a broker stopped and restarted under load, again and
again, loses no RevokeRun of a client that retries — each one ends its run.

TOKEN_BROKER_DRAIN_RESTARTS sets how many restarts (default 5)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from tests.faults_support import (
    Ledger,
    RestartableBroker,
    env_int,
    pipeline_worker,
)
from tests.support import hold_load
from tokenbroker.v1 import types_pb2

pytestmark = pytest.mark.slow

CLIENTS = 8
PATIENCE = 90.0


def test_every_revoke_run_of_a_retrying_client_ends_its_run_across_sigterm_restarts(
    tmp_path: Path,
) -> None:
    broker = RestartableBroker(tmp_path)
    broker.start()
    ledger = Ledger()
    stop = threading.Event()
    clients = [broker.client() for _ in range(CLIENTS)]
    workers = [
        threading.Thread(target=pipeline_worker, args=(c, ledger, stop), daemon=True)
        for c in clients
    ]
    for worker in workers:
        worker.start()
    restarts = env_int("TOKEN_BROKER_DRAIN_RESTARTS", 5)
    try:
        for _ in range(restarts):
            hold_load(random.uniform(0.3, 1.0))  # under load for a random while
            assert broker.terminate() == 0, broker.logs()
            broker.start()
        hold_load(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=PATIENCE)
    try:
        assert not any(w.is_alive() for w in workers), ledger.summary()
        assert ledger.failures["RevokeRun"] == 0, f"{ledger.summary()} {broker.downtimes}"
        assert ledger.calls["RevokeRun"] >= restarts, ledger.summary()
        with broker.client() as client:
            for run_id in sorted(ledger.revoked):
                state = client.get_run(run_id).run.state
                assert state == types_pb2.RUN_STATE_ENDED, run_id
    finally:
        for client in clients:
            client.close()
        assert broker.terminate() == 0
    # Every call either succeeded or was retried until it did.
    assert sum(ledger.failures.values()) == 0, f"{ledger.summary()} downtimes {broker.downtimes}"
    print(  # the figures docs/reliability.md quotes (pytest -s shows them)
        f"drain: {restarts} SIGTERM restarts, {sum(ledger.calls.values())} calls, 0 failed, "
        f"{len(ledger.revoked)} revokes each ended its run; restarts took "
        f"{min(broker.downtimes):.1f}-{max(broker.downtimes):.1f}s"
    )
