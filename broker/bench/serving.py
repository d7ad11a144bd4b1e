"""Sync or grpc.aio serving? A small experiment: `python -m broker.bench.serving`.

The same two handlers are served by a grpcio sync server (thread pool, as the broker does)
and by a grpc.aio server, each in a process of its own, and driven from this process by the
same grpc.aio client (8 calls in flight):

- noop: return a constant response (the floor of each serving model);
- issue: what IssueToken adds to it at its core: sign an ES256 JWT and durably commit one
  audit event through the broker's own SqliteStore (group commit, synchronous=FULL). The aio
  handler hands the blocking commit to the default executor, as an aio broker would have to.

It prints throughput, p50/p99 and the server's CPU time per call (all threads).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.audit import Action, Outcome, draft
from broker.bench.report import percentile
from broker.bench.worker import process_cpu_seconds
from broker.context import CallContext
from broker.store import Write
from broker.store.sqlite import SqliteStore

RESPONSE = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
ROUNDS = 3
SECONDS = 2.0
CONCURRENCY = 8


class _Issuer:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.store = SqliteStore(Path(tempfile.mkdtemp(prefix="serving-")))

    def sign_and_commit(self) -> None:
        now = time.time()
        token = jwt.encode({"sub": "run:x", "iat": int(now)}, self.key, algorithm="ES256")
        event = draft(
            CallContext(), now, Action.TOKEN_ISSUED, Outcome.SUCCESS, None, {"n": len(token)}
        )
        self.store.commit(Write([event]))


def _serve_sync(handler: str) -> None:
    issuer = _Issuer() if handler == "issue" else None

    class Servicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
        def Check(self, request: Any, context: Any) -> Any:
            if issuer is not None:
                issuer.sign_and_commit()
            return RESPONSE

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    health_pb2_grpc.add_HealthServicer_to_server(Servicer(), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


def _serve_aio(handler: str) -> None:
    issuer = _Issuer() if handler == "issue" else None

    class Servicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> Any:
            if issuer is not None:
                await asyncio.get_running_loop().run_in_executor(None, issuer.sign_and_commit)
            return RESPONSE

    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Servicer(), server)
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def _drive(target: str, pid: int) -> list[tuple[float, float, list[float]]]:
    """(calls/s, server CPU µs per call, latencies) for each round after a warm-up."""
    request = health_pb2.HealthCheckRequest()
    rounds = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for n in range(ROUNDS + 1):
            latencies: list[float] = []
            stop_at = time.perf_counter() + (0.5 if n == 0 else SECONDS)

            async def loop(stop_at: float = stop_at, latencies: list[float] = latencies) -> None:
                while time.perf_counter() < stop_at:
                    sent = time.perf_counter()
                    await stub.Check(request, timeout=30)
                    latencies.append(time.perf_counter() - sent)

            cpu, began = process_cpu_seconds(pid), time.perf_counter()
            await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
            elapsed, cpu = time.perf_counter() - began, process_cpu_seconds(pid) - cpu
            if n:
                rounds.append((len(latencies) / elapsed, cpu / len(latencies) * 1e6, latencies))
    return rounds


def _measure(mode: str, handler: str) -> str:
    server = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
        [sys.executable, "-m", "broker.bench.serving", "serve", mode, handler],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        rounds = asyncio.run(_drive(f"127.0.0.1:{port}", server.pid))
    finally:
        server.terminate()
        server.wait(10)
    latencies = [x for r in rounds for x in r[2]]
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    return (
        f"{mode:5s} {handler:6s} {statistics.median(r[0] for r in rounds):7,.0f} calls/s  "
        f"p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  "
        f"server CPU {statistics.median(r[1] for r in rounds):5.0f} µs/call"
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        (_serve_sync if argv[1] == "sync" else _serve_aio)(argv[2])
        return 0
    print(f"{os.cpu_count()} CPUs, grpcio {grpc.__version__}, {CONCURRENCY} calls in flight")
    for handler in ("noop", "issue"):
        for mode in ("sync", "aio"):
            print(_measure(mode, handler), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
