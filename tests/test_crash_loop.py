"""Crash loop (issue 14 §5): a broker process under concurrent load — runs started and
started on behalf of a person, tokens issued and verified, runs revoked, audit subscribers
following — killed with SIGKILL at random moments and restarted, again and again. Then:
every acknowledged write is there, no token of an acknowledged revocation verifies, the
audit chain verifies, and each subscriber saw every event exactly once.

TOKEN_BROKER_CRASH_KILLS sets how many kills (default 10)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from broker.cli import main as cli
from tests.faults_support import (
    AUDIENCE,
    Ledger,
    RestartableBroker,
    Subscriber,
    env_int,
    pipeline_worker,
)
from tests.support import hold_load
from tokenbroker.v1 import broker_pb2, types_pb2

pytestmark = pytest.mark.slow

CLIENTS = 6
SUBSCRIBERS = 2
PATIENCE = 90.0


def test_acknowledged_writes_survive_sigkill_at_random_moments_under_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = RestartableBroker(tmp_path)
    broker.start()
    ledger = Ledger()
    stop = threading.Event()
    clients = [broker.client() for _ in range(CLIENTS + SUBSCRIBERS + 1)]
    subscribers = [Subscriber(c).start() for c in clients[CLIENTS : CLIENTS + SUBSCRIBERS]]
    workers = [
        threading.Thread(target=pipeline_worker, args=(c, ledger, stop), daemon=True)
        for c in clients[:CLIENTS]
    ]
    for worker in workers:
        worker.start()
    kills = env_int("TOKEN_BROKER_CRASH_KILLS", 10)
    try:
        for _ in range(kills):
            hold_load(random.uniform(0.2, 1.2))  # a random moment under load
            broker.kill()
            broker.start()
        hold_load(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=PATIENCE)
    checker = clients[-1]
    try:
        assert not any(w.is_alive() for w in workers), ledger.summary()
        assert ledger.calls["RevokeRun"] >= kills, ledger.summary()
        # Retried through every kill, except what the client library must not retry: an
        # ExecuteOnBehalfOf the broker had received may have started a run (tokenbroker.retry).
        assert set(ledger.failures) <= {"ExecuteOnBehalfOf"}, ledger.summary()
        for run_id in sorted(ledger.runs):  # every acknowledged start
            checker.get_run(run_id)
        for run_id in sorted(ledger.revoked):  # every acknowledged revocation
            assert checker.get_run(run_id).run.state == types_pb2.RUN_STATE_ENDED, run_id
            for token in ledger.tokens.get(run_id, []):
                verdict = checker.verify_token(token, AUDIENCE)
                assert verdict.status == broker_pb2.TOKEN_STATUS_RUN_ENDED, run_id
        head = max(e.sequence for e in checker.stream_audit(0, follow=False, timeout=30))
        for subscriber in subscribers:
            assert subscriber.wait_for(head), (subscriber.error, len(subscriber.sequences))
            subscriber.stop()
            seen = [s for s in subscriber.sequences if s <= head]
            assert seen == list(range(1, head + 1)), "a gap or a duplicate"
    finally:
        for client in clients:
            client.close()
        assert broker.terminate() == 0
    capsys.readouterr()
    assert cli.main(["audit", "verify", "--data-dir", str(broker.data_dir)]) == 0
    assert "chain intact" in capsys.readouterr().out
    print(  # the figures docs/reliability.md quotes (pytest -s shows them)
        f"crash loop: {kills} kills survived, {len(ledger.runs)} runs, "
        f"{sum(len(t) for t in ledger.tokens.values())} tokens, {len(ledger.revoked)} revokes "
        f"acknowledged and checked, {head} audit events followed by {SUBSCRIBERS} subscribers; "
        f"restarts took {min(broker.downtimes):.1f}-{max(broker.downtimes):.1f}s; "
        f"calls failed after retries: {dict(ledger.failures)}"
    )
