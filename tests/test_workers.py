"""`token-broker serve --workers N`: several broker processes on one port over one SQLite store,
as an operator runs them — real processes, real signals, a worker killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from broker.api.http.workermetrics import EXPECTED, SCRAPED, WORKER_SCRAPED
from broker.api.interceptor import WORKER_HEADER
from tests.support import REPO, BrokerProcess, eventually, start_broker_process, start_run_request
from tokenbroker.credentials import dev_admin_credentials
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[BrokerProcess]:
    broker = start_broker_process(tmp_path / "data", ["--workers", "2"])
    yield broker
    if broker.process.poll() is None:
        broker.process.send_signal(signal.SIGTERM)
        try:
            broker.process.wait(30)
        except subprocess.TimeoutExpired:
            broker.process.kill()  # its workers stop by themselves when it is gone
            broker.process.wait(10)
    for pid in live_workers(broker).values():  # never leave a worker behind a failed test
        eventually(partial(_stopped, pid), within=30, what=f"worker {pid} to stop")


def worker_pids(broker: BrokerProcess) -> set[int]:
    """Every worker pid the supervisor reported serving, restarted ones included."""
    pids = set()
    for line in broker.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "worker serving":
            pids.add(int(entry["pid"]))
    return pids


def live_workers(broker: BrokerProcess) -> dict[int, int]:
    """worker index -> pid of the newest process the supervisor reported for it."""
    found: dict[int, int] = {}
    for line in broker.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "worker serving":
            found[int(entry["worker"])] = int(entry["pid"])
    return found


class Connection:
    """One TCP connection of its own (no subchannel shared with other channels), so that
    the kernel picks a worker for it; `worker` is the one that answered."""

    def __init__(self, broker: BrokerProcess) -> None:
        credentials = grpc.composite_channel_credentials(
            grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
            dev_admin_credentials(broker.data_dir),
        )
        self.channel = grpc.secure_channel(
            broker.target, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.stub = broker_pb2_grpc.TokenBrokerServiceStub(self.channel)
        self.worker = self.start_run()[1]

    def start_run(self) -> tuple[broker_pb2.StartRunResponse, str]:
        response, call = self.stub.StartRun.with_call(start_run_request(), timeout=10)
        return response, served_by(call)

    def close(self) -> None:
        self.channel.close()


def served_by(call: grpc.Call) -> str:
    return str(dict(call.trailing_metadata())[WORKER_HEADER])


def one_connection_per_worker(broker: BrokerProcess, stack: ExitStack) -> dict[str, Connection]:
    """Connections until each of the two workers answered one (the kernel spreads new
    connections at random: 40 all landing on one worker happens once in 2^39 runs)."""
    found: dict[str, Connection] = {}
    for _ in range(40):
        connection = Connection(broker)
        stack.callback(connection.close)
        found.setdefault(connection.worker, connection)
        if len(found) == 2:
            return found
    raise AssertionError(f"40 connections all served by worker(s) {sorted(found)}")


def test_two_workers_share_one_port_and_spread_connections_over_both(
    two_workers: BrokerProcess,
) -> None:
    with ExitStack() as stack:
        connections = one_connection_per_worker(two_workers, stack)
    assert set(connections) == {"0", "1"}
    pids = worker_pids(two_workers)
    assert len(pids) == 2 and two_workers.process.pid not in pids


def test_a_run_revoked_through_one_worker_is_rejected_by_verify_token_through_the_other(
    two_workers: BrokerProcess,
) -> None:
    with ExitStack() as stack:
        connections = one_connection_per_worker(two_workers, stack)
        revoker, verifier = connections["0"], connections["1"]
        delays = []
        for _ in range(7):
            started, _ = revoker.start_run()
            run_id = started.run.run_id
            token = revoker.stub.IssueToken(
                broker_pb2.IssueTokenRequest(run_id=run_id, audience="api", step="build"),
                timeout=10,
            ).token

            def verdict(token: str = token) -> broker_pb2.VerifyTokenResponse:
                response, call = verifier.stub.VerifyToken.with_call(
                    broker_pb2.VerifyTokenRequest(token=token), timeout=10
                )
                assert served_by(call) == "1"
                return response

            # The other worker learns of the new run from the log as well.
            eventually(partial(_active, verdict), within=10, what="the token active there")
            revoker.stub.RevokeRun(broker_pb2.RevokeRunRequest(run_id=run_id), timeout=10)
            revoked = time.monotonic()
            eventually(partial(_rejected, verdict), within=10, interval=0.01, what="the rejection")
            delays.append(time.monotonic() - revoked)
            assert verdict().reason == "run ended"
    # Without following each other's commits a worker would learn of them only when its
    # change feed's one-second wait ran out (0.5 s on average; the median of 7 such waits
    # is below 0.15 s once in ~80 runs).
    assert statistics.median(delays) < 0.15, delays


def test_a_worker_killed_with_sigkill_is_restarted_and_service_continues(
    two_workers: BrokerProcess,
) -> None:
    before = live_workers(two_workers)
    assert set(before) == {0, 1}
    os.kill(before[1], signal.SIGKILL)
    eventually(
        lambda: live_workers(two_workers).get(1) not in (None, before[1]),
        within=60,
        what="the supervisor to restart worker 1",
    )
    assert two_workers.process.poll() is None
    assert "worker died; restarting it" in two_workers.logs()
    with ExitStack() as stack:
        connections = one_connection_per_worker(two_workers, stack)
        assert set(connections) == {"0", "1"}
    assert live_workers(two_workers)[0] == before[0]  # the other worker served on


def test_sigterm_to_the_supervisor_stops_every_worker_and_exits_zero(
    two_workers: BrokerProcess,
) -> None:
    pids = live_workers(two_workers).values()
    two_workers.process.send_signal(signal.SIGTERM)
    assert two_workers.process.wait(30) == 0, two_workers.logs()
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived its supervisor"
    assert "token-broker stopped" in two_workers.logs()


def test_a_second_serve_on_the_same_sqlite_store_is_refused_while_workers_hold_it(
    two_workers: BrokerProcess,
) -> None:
    for workers in ("1", "2"):
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker",
                "serve",
                "--workers",
                workers,
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--data-dir",
                str(two_workers.data_dir),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1, second.stderr
        assert "in use by another broker" in second.stderr
        assert f"pid {two_workers.process.pid}" in second.stderr


def test_workers_over_the_memory_store_are_refused_with_the_reason(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--workers", "2", "--store", "memory:"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "memory: lives inside one process" in refused.stderr


def _active(verdict: Callable[[], broker_pb2.VerifyTokenResponse]) -> bool:
    return verdict().active


def _rejected(verdict: Callable[[], broker_pb2.VerifyTokenResponse]) -> bool:
    return not verdict().active


def _stopped(pid: int) -> bool:
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not serving; only its parent (gone) could reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_that_keeps_dying_stops_the_supervisor_with_a_non_zero_exit(
    two_workers: BrokerProcess,
) -> None:
    killed: set[int] = set()
    for _ in range(6):  # one more than the deaths in a row the supervisor tolerates
        pid = eventually(
            partial(_new_pid_of_worker, two_workers, 1, killed),
            within=60,
            what="worker 1 (re)started",
        )
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    assert two_workers.process.wait(60) == 1, two_workers.logs()
    assert "worker keeps dying; stopping every worker" in two_workers.logs()
    for pid in live_workers(two_workers).values():
        eventually(partial(_stopped, pid), within=30, what=f"worker {pid} to stop")


def _new_pid_of_worker(broker: BrokerProcess, index: int, seen: set[int]) -> int | None:
    pid = live_workers(broker).get(index)
    return pid if pid is not None and pid not in seen else None


# -- /metrics for every worker ------------------------------------------------------------


def scrape(broker: BrokerProcess) -> dict[str, list[Sample]]:
    """Worker 0's /metrics, parsed (a scrape that does not parse fails here); each family's
    HELP and TYPE said once. The timeout is far beyond the scrape's own bound on workers."""
    with urllib.request.urlopen(broker.http_url + "/metrics", timeout=15) as response:
        text = response.read().decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def calls(families: dict[str, list[Sample]], method: str, worker: str) -> float:
    return sum(
        s.value
        for s in families["rpc_server_call_duration_seconds"]
        if s.name == "rpc_server_call_duration_seconds_count"
        and s.labels.get("rpc_method") == method
        and s.labels.get("worker") == worker
    )


def coverage(families: dict[str, list[Sample]]) -> tuple[float, float]:
    """(workers in the scrape, workers expected)."""
    return families[SCRAPED][0].value, families[EXPECTED][0].value


def test_worker_0s_metrics_count_the_calls_made_through_each_worker_labelled_by_worker(
    two_workers: BrokerProcess,
) -> None:
    with ExitStack() as stack:
        connections = one_connection_per_worker(two_workers, stack)
        before = scrape(two_workers)
        made = {"0": 3, "1": 5}
        for worker, count in made.items():
            for _ in range(count):
                assert connections[worker].start_run()[1] == worker

    def counted() -> dict[str, list[Sample]] | None:
        families = scrape(two_workers)
        grown = {w: calls(families, "StartRun", w) - calls(before, "StartRun", w) for w in made}
        return families if grown == made else None

    families = eventually(counted, what="the calls through both workers in one scrape")
    assert coverage(families) == (2, 2)
    workers = {s.labels.get("worker") for f in families.values() for s in f}
    assert workers == {"0", "1", None}  # None: only the scrape's own coverage gauges
    assert {s.labels["worker"]: s.value for s in families[WORKER_SCRAPED]} == {"0": 1, "1": 1}


def test_metrics_leave_out_a_hung_worker_and_count_it_without_failing_the_scrape(
    two_workers: BrokerProcess,
) -> None:
    worker_1 = live_workers(two_workers)[1]
    os.kill(worker_1, signal.SIGSTOP)
    try:
        families = scrape(two_workers)  # answers within its bound: the fetch times out
        assert coverage(families) == (1, 2)
        assert {s.labels["worker"] for s in families["target_info"]} == {"0"}
        assert {s.labels["worker"] for s in families["tokenbroker_runs_active"]} == {"0"}
    finally:
        os.kill(worker_1, signal.SIGCONT)
    eventually(
        lambda: coverage(scrape(two_workers)) == (2, 2),
        within=30,
        what="worker 1, resumed, back in the scrape",
    )


def test_metrics_leave_out_a_worker_killed_with_sigkill_until_it_is_restarted(
    two_workers: BrokerProcess,
) -> None:
    before = live_workers(two_workers)
    # The supervisor held still, so that worker 1 stays dead while the scrape is checked.
    os.kill(two_workers.process.pid, signal.SIGSTOP)
    try:
        os.kill(before[1], signal.SIGKILL)
        eventually(partial(_stopped, before[1]), within=30, what="worker 1 to die")
        families = scrape(two_workers)
        assert coverage(families) == (1, 2)
        assert {s.labels["worker"] for s in families["tokenbroker_runs_active"]} == {"0"}
        assert {s.labels["worker"]: s.value for s in families[WORKER_SCRAPED]} == {
            "0": 1,
            "1": 0,
        }
    finally:
        os.kill(two_workers.process.pid, signal.SIGCONT)
    eventually(
        lambda: coverage(scrape(two_workers)) == (2, 2),
        within=60,
        what="the restarted worker 1 back in the scrape",
    )
    # The worker serves before its supervisor logs it: a new pid, once that is said.
    eventually(
        lambda: live_workers(two_workers)[1] != before[1], within=30, what="worker 1's new pid"
    )
