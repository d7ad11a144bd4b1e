"""The replicas section of `token-broker bench`: the real configurations side by side.

- `sqlite, 1 process`: the embedded default;
- `postgresql, 1 replica` and `postgresql, 2 replicas`: brokers on one throw-away PostgreSQL
  server (as the `postgres` user when run as root), every call balanced over the replicas.

For each: IssueToken and VerifyToken throughput from closed-loop client threads, and the
brokers' CPU time per call (all their processes and threads, from /proc). With two replicas,
revocation propagation: RevokeRun on one replica, then VerifyToken on the other until it
refuses the token, p50/p99.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from broker.bench import accounts, brokerproc
from broker.bench.accounts import API, ORCHESTRATOR
from broker.bench.pgcluster import create_database, running_cluster
from broker.bench.report import Figure
from tokenbroker.credentials import AssertionSigner
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2

ISSUER = "https://bench.replicas.invalid"
AUDIENCE = "api.example.com"
THREADS = 8
CEILING = [types_pb2.Permission(resource="artifacts", level="write")]
PERMISSIONS = [types_pb2.Permission(resource="artifacts", level="read")]


class Caller:
    """Stubs to every replica, calling as one bench account."""

    def __init__(self, targets: list[str], policy_dir: Path, account: accounts.BenchAccount):
        self._channels = [grpc.insecure_channel(t) for t in targets]
        self.stubs = [broker_pb2_grpc.TokenBrokerServiceStub(c) for c in self._channels]
        pem = accounts.private_key_pem(policy_dir, account)
        self._signer = AssertionSigner(account.name, pem, ISSUER, key_id=accounts.KEY_ID)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._signer.assertion()}"),)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, in seconds (Linux /proc); 0 elsewhere."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def closed_loop(calls: list[Callable[[], object]], seconds: float) -> tuple[int, list[float]]:
    """Each callable in its own thread, again and again for `seconds`: (calls, latencies)."""
    latencies: list[list[float]] = [[] for _ in calls]
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        call, mine = calls[index], latencies[index]
        while time.monotonic() < stop:
            began = time.perf_counter()
            call()
            mine.append(time.perf_counter() - began)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [latency for mine in latencies for latency in mine]
    return len(flat), flat


def measure(
    name: str, brokers: list[brokerproc.BrokerProcess], policy_dir: Path, seconds: float
) -> list[Figure]:
    targets = [b.target for b in brokers]
    pids = [b.pid for b in brokers]
    orchestrator = Caller(targets, policy_dir, ORCHESTRATOR)
    api = Caller(targets, policy_dir, API)
    try:
        runs, tokens = [], []
        for i in range(THREADS):
            stub = orchestrator.stubs[i % len(targets)]
            run = stub.StartRun(
                broker_pb2.StartRunRequest(
                    pipeline=types_pb2.PipelineRef(org=accounts.ORG, project="web", pipeline="d"),
                    permission_ceiling=CEILING,
                ),
                metadata=orchestrator.metadata(),
            ).run
            runs.append(run.run_id)
            tokens.append(_issue(stub, orchestrator, run.run_id))
        figures = []
        for kind in ("IssueToken", "VerifyToken"):
            calls = [_call(kind, i, orchestrator, api, runs[i], tokens[i]) for i in range(THREADS)]
            before = cpu_seconds(pids)
            count, latencies = closed_loop(calls, seconds)
            spent = cpu_seconds(pids) - before
            figure = Figure.measured(f"{kind}, {name}", [count / seconds], latencies)
            figure.cpu_us = spent / count * 1e6 if count else float("nan")
            figures.append(figure)
        if len(brokers) > 1:
            figures.append(_propagation(name, orchestrator, api))
        return figures
    finally:
        orchestrator.close()
        api.close()


def _call(
    kind: str, i: int, orchestrator: Caller, api: Caller, run_id: str, token: str
) -> Callable[[], object]:
    """Thread `i`'s call, spread over the replicas."""
    if kind == "IssueToken":
        stub = orchestrator.stubs[i % len(orchestrator.stubs)]
        return lambda: _issue(stub, orchestrator, run_id)
    verifier = api.stubs[i % len(api.stubs)]
    return lambda: _verify(verifier, api, token)


def _issue(stub: broker_pb2_grpc.TokenBrokerServiceStub, caller: Caller, run_id: str) -> str:
    request = broker_pb2.IssueTokenRequest(
        run_id=run_id, audience=AUDIENCE, permissions=PERMISSIONS
    )
    token: str = stub.IssueToken(request, metadata=caller.metadata(), timeout=30).token
    return token


def _verify(stub: broker_pb2_grpc.TokenBrokerServiceStub, caller: Caller, token: str) -> bool:
    request = broker_pb2.VerifyTokenRequest(token=token, audience=AUDIENCE)
    active: bool = stub.VerifyToken(request, metadata=caller.metadata(), timeout=30).active
    return active


def _propagation(name: str, orchestrator: Caller, api: Caller, rounds: int = 50) -> Figure:
    """RevokeRun on replica 0; VerifyToken on replica 1 until it refuses the token."""
    delays = []
    a, b = orchestrator.stubs[0], api.stubs[1]
    for _ in range(rounds):
        run = a.StartRun(
            broker_pb2.StartRunRequest(
                pipeline=types_pb2.PipelineRef(org=accounts.ORG, project="web", pipeline="d"),
                permission_ceiling=CEILING,
            ),
            metadata=orchestrator.metadata(),
        ).run
        token = _issue(a, orchestrator, run.run_id)
        a.RevokeRun(
            broker_pb2.RevokeRunRequest(run_id=run.run_id), metadata=orchestrator.metadata()
        )
        revoked = time.perf_counter()
        while _verify(b, api, token):
            if time.perf_counter() - revoked > 10:
                break
        delays.append(time.perf_counter() - revoked)
    figure = Figure.measured(f"revocation A → B, {name}", [], delays, unit="")
    return figure.judge("p99 ≤ 100 ms", figure.p99_ms <= 100)


@contextmanager
def _brokers(
    work: Path, policy: Path, store: str | None, count: int
) -> Iterator[list[brokerproc.BrokerProcess]]:
    started: list[brokerproc.BrokerProcess] = []
    work.mkdir(parents=True, exist_ok=True)
    extra = ("--issuer", ISSUER, *(("--store", store) if store else ()))
    try:
        for n in range(count):
            data_dir = work / f"replica-{n}"
            started.append(brokerproc.start(data_dir, policy, work / f"replica-{n}.log", extra))
        yield started
    finally:
        for broker in started:
            broker.stop()


def run(work: Path, policy: Path, seconds: float) -> list[Figure]:
    """Every configuration in turn (never two at once: they would share the two cores)."""
    figures: list[Figure] = []
    with _brokers(work / "sqlite", policy, None, 1) as brokers:
        figures += measure("sqlite, 1 process", brokers, policy.parent, seconds)
    with ExitStack() as stack:
        cluster = stack.enter_context(running_cluster())
        for count in (1, 2):
            dsn = create_database(cluster, f"bench{count}")
            with _brokers(work / f"pg{count}", policy, dsn, count) as brokers:
                label = f"postgresql, {count} replica{'s' if count > 1 else ''}"
                figures += measure(label, brokers, policy.parent, seconds)
    return figures
