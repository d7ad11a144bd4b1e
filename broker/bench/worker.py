"""The benchmark's client side, run in worker processes of its own.

A Python gRPC client costs about as much CPU per call as the server does, so load comes from
separate processes (never the broker's, never the coordinator's) and client and server do
not share one GIL. Each worker serves jobs sent over a pipe, one at a time, and answers
with raw samples; the coordinator does the statistics.

Unary load is a closed loop: `concurrency` calls in flight on one grpc.aio channel, each
timed from just before it is sent until its response is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import jwt
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.bench import accounts
from broker.bench.accounts import API, AUDITOR, DELEGATOR, ORCHESTRATOR, ORG, BenchAccount
from tokenbroker import messages
from tokenbroker.credentials import AssertionSigner
from tokenbroker.dpop import DPoPKey, MemoryReplayCache
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc, types_pb2
from tokenbroker.verifier import JwksCache, RevocationFollower, TokenVerifier, jwks_from_broker

AUDIENCE = "api.example.com"
CALL_TIMEOUT = 30.0
Metadata = tuple[tuple[str, str], ...]
Job = dict[str, Any]


@dataclass
class Broker:
    """What a worker knows about one broker under test."""

    target: str
    issuer: str
    pids: list[int]
    signers: dict[str, AssertionSigner]
    runs: list[str] = field(default_factory=list)  # active runs to issue tokens for
    credentials: list[str] = field(default_factory=list)  # their run credentials
    tokens: list[str] = field(default_factory=list)  # step tokens to verify
    # A step's key, and step tokens bound to it (cnf.jkt), for the bound figures.
    step_key: DPoPKey = field(default_factory=DPoPKey.generate)
    bound_tokens: list[str] = field(default_factory=list)
    # A runner's key, and run credentials bound to it: every call needs a fresh proof.
    runner_key: DPoPKey = field(default_factory=DPoPKey.generate)
    bound_credentials: list[str] = field(default_factory=list)

    def metadata(self, account: BenchAccount) -> Metadata:
        return (("authorization", f"Bearer {self.signers[account.name].assertion()}"),)


def pipeline(name: str = "deploy") -> types_pb2.PipelineRef:
    return types_pb2.PipelineRef(org=ORG, project="web", pipeline=name)


CEILING = [types_pb2.Permission(resource="artifacts", level="write")]
PERMISSIONS = [types_pb2.Permission(resource="artifacts", level="read")]


def start_run_request() -> broker_pb2.StartRunRequest:
    return broker_pb2.StartRunRequest(
        pipeline=pipeline(), permission_ceiling=CEILING, deadline=Duration(seconds=6 * 3600)
    )


class Worker:
    def __init__(self) -> None:
        self.brokers: dict[str, Broker] = {}
        self.fanout: FanOut | None = None

    # -- set-up ---------------------------------------------------------------------------

    def setup(self, job: Job) -> Job:
        policy_dir = Path(job["policy_dir"])
        for name, spec in job["brokers"].items():
            signers = {
                a.name: AssertionSigner(
                    a.name,
                    accounts.private_key_pem(policy_dir, a),
                    spec["issuer"],
                    key_id=accounts.KEY_ID,
                )
                for a in accounts.ACCOUNTS
            }
            self.brokers[name] = Broker(spec["target"], spec["issuer"], spec["pids"], signers)
        return {}

    def prepare(self, job: Job) -> Job:
        """Active runs (with their credentials) and step tokens that the load jobs use."""
        broker = self.brokers[job["broker"]]
        with grpc.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            for _ in range(job["runs"]):
                started = stub.StartRun(start_run_request(), metadata=broker.metadata(ORCHESTRATOR))
                broker.runs.append(started.run.run_id)
                broker.credentials.append(started.run_credential)
                bound_run = start_run_request()
                bound_run.dpop_jwk = broker.runner_key.public_jwk_json
                started = stub.StartRun(bound_run, metadata=broker.metadata(ORCHESTRATOR))
                broker.bound_credentials.append(started.run_credential)
            for i in range(job["tokens"]):
                issued = stub.IssueToken(
                    broker_pb2.IssueTokenRequest(
                        run_id=broker.runs[i % len(broker.runs)],
                        audience=AUDIENCE,
                        permissions=PERMISSIONS,
                        ttl=Duration(seconds=3600),
                    ),
                    metadata=broker.metadata(ORCHESTRATOR),
                )
                broker.tokens.append(issued.token)
                bound = stub.IssueToken(
                    broker_pb2.IssueTokenRequest(
                        run_id=broker.runs[i % len(broker.runs)],
                        audience=AUDIENCE,
                        permissions=PERMISSIONS,
                        ttl=Duration(seconds=3600),
                        dpop_jwk=broker.step_key.public_jwk_json,
                    ),
                    metadata=broker.metadata(ORCHESTRATOR),
                )
                broker.bound_tokens.append(bound.token)
        return {"runs": len(broker.runs), "tokens": len(broker.tokens)}

    # -- unary load -----------------------------------------------------------------------

    def unary(self, job: Job) -> Job:
        broker = self.brokers[job["broker"]]
        kind = job["kind"]
        return asyncio.run(
            _closed_loop(
                broker,
                kind,
                seconds=job["seconds"],
                concurrency=job["concurrency"],
                prepare_seconds=job.get("prepare_seconds", 0.0),
                connections=job.get("connections", 1),
                workers=job.get("workers", 1),
                rate=job.get("rate", 0.0),
            )
        )

    # -- offline verification -------------------------------------------------------------

    def offline(self, job: Job) -> Job:
        """TokenVerifier.check vs a bare jwt.decode of the same tokens, alternating rounds."""
        broker = self.brokers[job["broker"]]
        with grpc.insecure_channel(broker.target) as channel:
            follower = RevocationFollower(channel, org=ORG, metadata=broker.metadata(API)).start()
            try:
                keys = JwksCache(jwks_from_broker(channel))
                verifier = TokenVerifier(
                    issuer=broker.issuer, audience=AUDIENCE, keys=keys, revocations=follower
                )

                def bound_verifier() -> TokenVerifier:
                    # A fresh replay cache per round: each round's proofs are new anyway.
                    return TokenVerifier(
                        issuer=broker.issuer,
                        audience=AUDIENCE,
                        keys=keys,
                        revocations=follower,
                        replay=MemoryReplayCache(max_entries=1_000_000),
                    )

                return _offline_rounds(
                    verifier, bound_verifier, keys, broker, job["rounds"], job["seconds"]
                )
            finally:
                follower.stop()

    # -- revocation latency ---------------------------------------------------------------

    def revocation(self, job: Job) -> Job:
        """RevokeRun returns → the offline verifier (following the stream) rejects."""
        broker = self.brokers[job["broker"]]
        latencies: list[float] = []
        revoke_calls: list[float] = []
        # Across workers (`across`): revoke through worker 0, follow the log on worker 1.
        across = job.get("across", False)
        with contextlib.ExitStack() as stack:
            revoking = stack.enter_context(_channel_to(broker, "0" if across else ""))
            channel = stack.enter_context(_channel_to(broker, "1")) if across else revoking
            stub = broker_pb2_grpc.TokenBrokerServiceStub(revoking)
            follower = RevocationFollower(channel, org=ORG, metadata=broker.metadata(API)).start()
            try:
                verifier = TokenVerifier(
                    issuer=broker.issuer,
                    audience=AUDIENCE,
                    keys=JwksCache(jwks_from_broker(channel)),
                    revocations=follower,
                )
                for _ in range(job["samples"]):
                    sample = _revoke_and_watch(stub, broker, verifier, job["poll"], job["limit"])
                    revoke_calls.append(sample[0])
                    latencies.append(sample[1])
            finally:
                follower.stop()
        return {"latencies": latencies, "revoke_calls": revoke_calls}

    # -- audit streams --------------------------------------------------------------------

    def catchup(self, job: Job) -> Job:
        """Read `limit` stored events from `after` as fast as the stream delivers them."""
        broker = self.brokers[job["broker"]]
        request = broker_pb2.StreamAuditRequest(
            after_sequence=job["after"],
            stop_at_head=True,
            max_events_per_message=job.get("per_message", 0),
        )
        received = 0
        first = last = 0
        with grpc.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            cpu_before = processes_cpu_seconds(broker.pids)
            began = time.perf_counter()
            call = stub.StreamAudit(request, metadata=broker.metadata(AUDITOR))
            for item in call:
                events = messages.events_of(item)
                if not events:
                    continue
                received += len(events)
                last = events[-1].sequence
                first = first or events[0].sequence
                if received >= job["limit"]:
                    break
            elapsed = time.perf_counter() - began
            cpu = processes_cpu_seconds(broker.pids) - cpu_before
            call.cancel()
        return {
            "events": received,
            "seconds": elapsed,
            "first": first,
            "last": last,
            "broker_cpu": cpu,
        }

    def fanout_start(self, job: Job) -> Job:
        broker = self.brokers[job["broker"]]
        self.fanout = FanOut(broker, job["after"], job["subscribers"])
        self.fanout.start()
        return {}

    def fanout_finish(self, job: Job) -> Job:
        assert self.fanout is not None
        result = self.fanout.finish(job["until"], job["timeout"])
        self.fanout = None
        return result


# -- closed-loop unary load -----------------------------------------------------------------


Call = Callable[[int], Awaitable[Any]]


async def _closed_loop(
    broker: Broker,
    kind: str,
    *,
    seconds: float,
    concurrency: int,
    prepare_seconds: float,
    connections: int = 1,
    workers: int = 1,
    rate: float = 0.0,
) -> Job:
    """`connections` > 1: that many connections of their own, as many to each of `workers`
    broker processes (a worker process serves whole connections), the calls spread over them.
    `rate` > 0: at most that many calls per second, evenly spaced (an open loop as long as
    the broker keeps up)."""
    async with contextlib.AsyncExitStack() as stack:
        if connections > 1:
            channels = await _balanced_channels(broker, connections, workers, stack)
        else:
            channels = [await stack.enter_async_context(grpc.aio.insecure_channel(broker.target))]
        callers = [
            await _caller(channel, broker, kind, prepare_seconds, concurrency)
            for channel in channels
        ]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        counter = itertools.count()
        cpu_before = processes_cpu_seconds(broker.pids)
        began = time.perf_counter()
        stop_at = began + seconds
        exhausted = False

        async def loop(call: Call) -> None:
            nonlocal exhausted
            while not exhausted and time.perf_counter() < stop_at:
                i = next(counter)
                if rate > 0:
                    due = began + i / rate
                    if due >= stop_at:
                        return
                    await asyncio.sleep(max(due - time.perf_counter(), 0))
                sent = time.perf_counter()
                try:
                    await call(i)
                except IndexError:
                    exhausted = True  # a prepared pool ran out (RevokeRun)
                    return
                except grpc.RpcError as error:
                    code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else "?"
                    errors[code] = errors.get(code, 0) + 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(loop(callers[n % len(callers)]) for n in range(concurrency)))
        elapsed = time.perf_counter() - began
        cpu = processes_cpu_seconds(broker.pids) - cpu_before
    return {"latencies": latencies, "seconds": elapsed, "errors": errors, "broker_cpu": cpu}


async def _balanced_channels(
    broker: Broker, connections: int, workers: int, stack: contextlib.AsyncExitStack
) -> list[grpc.aio.Channel]:
    """Connections until each worker process has its share (the kernel picks a worker per
    connection at random; `x-broker-worker` says which one answered)."""
    share = max(connections // max(workers, 1), 1)
    kept: dict[str, list[grpc.aio.Channel]] = {}
    for _ in range(connections * 20):
        channel = grpc.aio.insecure_channel(
            broker.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        call = broker_pb2_grpc.TokenBrokerServiceStub(channel).GetSigningKeys(
            broker_pb2.GetSigningKeysRequest(), timeout=CALL_TIMEOUT
        )
        await call
        served_by = str(dict(await call.trailing_metadata()).get("x-broker-worker", "0"))
        mine = kept.setdefault(served_by, [])
        if len(mine) < share:
            mine.append(await stack.enter_async_context(channel))
        else:
            await channel.close()
        if sum(len(c) for c in kept.values()) >= share * max(workers, 1):
            break
    return [channel for group in kept.values() for channel in group]


def processes_cpu_seconds(pids: list[int]) -> float:
    """The CPU time of every process serving a broker (its workers), summed."""
    return sum(process_cpu_seconds(pid) for pid in pids)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc); NaN where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _caller(
    channel: grpc.aio.Channel, broker: Broker, kind: str, prepare_seconds: float, concurrency: int
) -> Call:
    """The call to time for `kind`, warmed up once (and, for revoke, the runs to end)."""
    stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    orchestrator = broker.metadata(ORCHESTRATOR)

    async def noop(i: int) -> Any:
        # The same authorization header as the broker's calls: the same bytes on the wire.
        return await health.Check(
            health_pb2.HealthCheckRequest(), metadata=orchestrator, timeout=CALL_TIMEOUT
        )

    async def issue(i: int) -> Any:
        # As a pipeline step asks: with its run's own credential.
        n = i % len(broker.runs)
        request = broker_pb2.IssueTokenRequest(
            audience=AUDIENCE, permissions=PERMISSIONS, step=f"step-{i % 16}"
        )
        credential = (("authorization", f"Bearer {broker.credentials[n]}"),)
        return await stub.IssueToken(request, metadata=credential, timeout=CALL_TIMEOUT)

    step_jwk = broker.step_key.public_jwk_json

    async def issue_bound(i: int) -> Any:
        # The same, asking for a token bound to the step's key (cnf.jkt).
        n = i % len(broker.runs)
        request = broker_pb2.IssueTokenRequest(
            audience=AUDIENCE, permissions=PERMISSIONS, step=f"step-{i % 16}", dpop_jwk=step_jwk
        )
        credential = (("authorization", f"Bearer {broker.credentials[n]}"),)
        return await stub.IssueToken(request, metadata=credential, timeout=CALL_TIMEOUT)

    issue_method = "/tokenbroker.v1.TokenBrokerService/IssueToken"

    async def issue_dpop(i: int) -> Any:
        # As a runner holding a bound run credential asks: a fresh proof with every call.
        credential = broker.bound_credentials[i % len(broker.bound_credentials)]
        proof = broker.runner_key.proof("POST", issue_method, token=credential)
        request = broker_pb2.IssueTokenRequest(
            audience=AUDIENCE, permissions=PERMISSIONS, step=f"step-{i % 16}"
        )
        metadata = (("authorization", f"DPoP {credential}"), ("dpop", proof))
        return await stub.IssueToken(request, metadata=metadata, timeout=CALL_TIMEOUT)

    api = broker.metadata(API)

    async def verify(i: int) -> Any:
        token = broker.tokens[i % len(broker.tokens)]
        request = broker_pb2.VerifyTokenRequest(token=token, audience=AUDIENCE)
        response = await stub.VerifyToken(request, metadata=api, timeout=CALL_TIMEOUT)
        if not response.active:
            raise AssertionError(f"token not active: {response.reason}")
        return response

    portal = broker.metadata(DELEGATOR)

    async def execute(i: int) -> Any:
        request = broker_pb2.ExecuteOnBehalfOfRequest(
            pipeline=pipeline("release"),
            permission_ceiling=CEILING,
            deadline=Duration(seconds=3600),
            idempotency_key=uuid.uuid4().hex,
            asserted=broker_pb2.AssertedPerson(
                subject=f"user-{i % 1000}", email=f"user-{i % 1000}@{accounts.PERSON_DOMAIN}"
            ),
        )
        return await stub.ExecuteOnBehalfOf(request, metadata=portal, timeout=CALL_TIMEOUT)

    to_end: list[str] = []

    async def revoke(i: int) -> Any:
        run_id = to_end.pop()  # IndexError ends the round
        request = broker_pb2.RevokeRunRequest(run_id=run_id, reason="bench")
        return await stub.RevokeRun(request, metadata=orchestrator, timeout=CALL_TIMEOUT)

    calls: dict[str, Call] = {
        "noop": noop,
        "issue": issue,
        "issue_bound": issue_bound,
        "issue_dpop": issue_dpop,
        "verify": verify,
        "execute": execute,
        "revoke": revoke,
    }
    call = calls[kind]
    if kind == "revoke":
        to_end.extend(await _start_runs(stub, orchestrator, 0, 1))
    await call(-1)  # warm-up (the channel connects); for revoke it ends that one run
    if kind == "revoke":
        to_end.extend(await _start_runs(stub, orchestrator, prepare_seconds, concurrency))
    return call


async def _start_runs(
    stub: broker_pb2_grpc.TokenBrokerServiceAsyncStub,
    metadata: Metadata,
    seconds: float,
    concurrency: int,
) -> list[str]:
    """Start runs for `seconds` (at least one): RevokeRun's round ends each of them once."""
    started: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        while True:
            response = await stub.StartRun(
                start_run_request(), metadata=metadata, timeout=CALL_TIMEOUT
            )
            started.append(response.run.run_id)
            if time.perf_counter() >= stop_at:
                return

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return started


# -- offline verification -------------------------------------------------------------------


def _offline_rounds(
    verifier: TokenVerifier,
    bound_verifier: Callable[[], TokenVerifier],
    keys: JwksCache,
    broker: Broker,
    rounds: int,
    seconds: float,
) -> Job:
    tokens = broker.tokens
    first = tokens[0]
    kid = jwt.get_unverified_header(first)["kid"]
    key = keys.find(kid)
    assert key is not None and verifier.check(first).active

    def checked(token: str) -> None:
        if not verifier.check(token).active:
            raise AssertionError("offline verifier rejected a valid token")

    def bare(token: str) -> None:
        jwt.decode(token, key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=broker.issuer)

    samples: dict[str, list[float]] = {"verifier": [], "pyjwt": [], "bound": [], "paired": []}
    throughput: dict[str, list[float]] = {"verifier": [], "pyjwt": [], "bound": [], "paired": []}
    for _ in range(rounds + 1):  # the first round warms up
        for name, verify in (("verifier", checked), ("pyjwt", bare)):
            latencies, rate = _time_loop(verify, tokens, seconds)
            samples[name].extend(latencies)
            throughput[name].append(rate)
        for name, (latencies, rate) in _bound_loop(bound_verifier(), broker, seconds).items():
            samples[name].extend(latencies)
            throughput[name].append(rate)
    return {
        "latencies": {k: v[len(v) // (rounds + 1) :] for k, v in samples.items()},
        "rates": {k: v[1:] for k, v in throughput.items()},
    }


BOUND_URL = "https://api.example.com/deploy"


def _bound_loop(
    verifier: TokenVerifier, broker: Broker, seconds: float
) -> dict[str, tuple[list[float], float]]:
    """TokenVerifier.check of bound tokens, each with a fresh proof made beforehand (making
    one is the client's cost, not the verifier's), against a fresh replay cache per round —
    alternating, call by call, with the check of an unbound token by the same verifier
    ("paired"), so that both see the same load on a shared machine. Rates are calls per
    second of time spent in each."""
    pool_size = max(200, int(seconds * 20_000))
    tokens = broker.bound_tokens
    pool = [
        (token, broker.step_key.proof("POST", BOUND_URL, token=token))
        for token in itertools.islice(itertools.cycle(tokens), pool_size)
    ]
    latencies: list[float] = []
    paired: list[float] = []
    unbound = itertools.cycle(broker.tokens)
    clock = time.perf_counter
    stop_at = clock() + seconds
    for token, proof in pool:
        sent = clock()
        result = verifier.check(token, proof=proof, method="POST", url=BOUND_URL)
        done = clock()
        if not result.active:
            raise AssertionError(f"offline verifier rejected a bound token: {result.reason}")
        latencies.append(done - sent)
        sent = clock()
        if not verifier.check(next(unbound)).active:
            raise AssertionError("offline verifier rejected a valid token")
        finished = clock()
        paired.append(finished - sent)
        if finished >= stop_at:
            break
    return {
        "bound": (latencies, len(latencies) / sum(latencies)),
        "paired": (paired, len(paired) / sum(paired)),
    }


def _time_loop(
    verify: Callable[[str], None], tokens: list[str], seconds: float
) -> tuple[list[float], float]:
    latencies: list[float] = []
    clock = time.perf_counter
    began = clock()
    stop_at = began + seconds
    n = len(tokens)
    i = 0
    while True:
        sent = clock()
        verify(tokens[i % n])
        done = clock()
        latencies.append(done - sent)
        i += 1
        if done >= stop_at:
            break
    return latencies, i / (done - began)


# -- revocation latency ---------------------------------------------------------------------


def _channel_to(broker: Broker, worker: str, attempts: int = 64) -> grpc.Channel:
    """A channel on a connection of its own to worker process `worker` of `serve --workers`
    ("" : whichever answers)."""
    for _ in range(attempts):
        channel = grpc.insecure_channel(
            broker.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        if not worker:
            return channel
        stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
        _, call = stub.GetSigningKeys.with_call(
            broker_pb2.GetSigningKeysRequest(), timeout=CALL_TIMEOUT
        )
        if dict(call.trailing_metadata() or ()).get("x-broker-worker") == worker:
            return channel
        channel.close()
    raise RuntimeError(f"no connection reached worker {worker} in {attempts} attempts")


def _revoke_and_watch(
    stub: broker_pb2_grpc.TokenBrokerServiceStub,
    broker: Broker,
    verifier: TokenVerifier,
    poll: float,
    limit: float,
) -> tuple[float, float]:
    """(RevokeRun's own latency, time from its return until the verifier rejects)."""
    orchestrator = broker.metadata(ORCHESTRATOR)
    run_id = stub.StartRun(
        start_run_request(), metadata=orchestrator, timeout=CALL_TIMEOUT
    ).run.run_id
    token = stub.IssueToken(
        broker_pb2.IssueTokenRequest(run_id=run_id, audience=AUDIENCE, permissions=PERMISSIONS),
        metadata=orchestrator,
    ).token
    if not verifier.check(token).active:
        raise AssertionError("a fresh token was rejected before its run ended")
    sent = time.perf_counter()
    stub.RevokeRun(
        broker_pb2.RevokeRunRequest(run_id=run_id, reason="bench"),
        metadata=orchestrator,
        timeout=CALL_TIMEOUT,
    )
    returned = time.perf_counter()
    while verifier.check(token).active:
        if time.perf_counter() - returned > limit:
            raise AssertionError(f"the verifier still accepts a revoked run's token after {limit}s")
        time.sleep(poll)
    return returned - sent, time.perf_counter() - returned


# -- live fan-out -----------------------------------------------------------------------------


@dataclass
class _Subscriber:
    first: int = 0
    last: int = 0
    count: int = 0
    gaps: int = 0
    dropped: bool = False
    delays: list[float] = field(default_factory=list)
    # (seconds since the subscribers connected, delay) of each delay, for its growth
    timed: list[tuple[float, float]] = field(default_factory=list)


class FanOut:
    """`subscribers` live StreamAudit followers from `after`, on their own event loop."""

    def __init__(self, broker: Broker, after: int, subscribers: int) -> None:
        self._broker = broker
        self._after = after
        self._subs = [_Subscriber() for _ in range(subscribers)]
        self._until: int | None = None
        self._open = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fanout", daemon=True)
        self._began = 0.0
        self._ended = 0.0

    def start(self) -> None:
        self._thread.start()
        if not self._open.wait(30):
            raise TimeoutError("subscribers did not connect")

    def finish(self, until: int, timeout: float) -> Job:
        self._until = until
        self._thread.join(timeout)
        complete = not self._thread.is_alive()
        self._done.set()
        self._thread.join(5)
        return {
            "complete": complete,
            "seconds": self._ended - self._began,
            "subscribers": [
                {"first": s.first, "last": s.last, "count": s.count, "gaps": s.gaps}
                for s in self._subs
            ],
            "delays": [d for s in self._subs for d in s.delays],
            "timed": [pair for s in self._subs for pair in s.timed],
            "dropped": sum(s.dropped for s in self._subs),
        }

    def _run(self) -> None:
        asyncio.run(self._follow_all())

    async def _follow_all(self) -> None:
        metadata = self._broker.metadata(AUDITOR)
        async with grpc.aio.insecure_channel(self._broker.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            # Pages, as the client library asks for them.
            request = broker_pb2.StreamAuditRequest(
                after_sequence=self._after, max_events_per_message=messages.EVENTS_PER_MESSAGE
            )
            calls = [stub.StreamAudit(request, metadata=metadata) for _ in self._subs]
            for call in calls:
                await call.initial_metadata()  # each stream is authorized and open
            self._began = time.perf_counter()
            self._open.set()
            await asyncio.gather(
                *(self._follow(c, s) for c, s in zip(calls, self._subs, strict=True))
            )
            self._ended = time.perf_counter()

    async def _follow(self, call: Any, sub: _Subscriber) -> None:
        expected = self._after + 1
        reading: asyncio.Future[Any] | None = None
        while not self._done.is_set():
            # One read at a time, never cancelled: cancelling a read ends the whole call.
            reading = reading or asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({reading}, timeout=0.2)
            if not done:
                if self._until is not None and sub.last >= self._until:
                    break
                continue
            try:
                item = reading.result()
            except grpc.aio.AioRpcError:
                sub.dropped = True  # e.g. dropped for falling behind: counted, not resumed
                break
            finally:
                reading = None
            if item is grpc.aio.EOF:
                break
            received = time.time()
            for event in messages.events_of(item):
                if event.sequence != expected:
                    sub.gaps += 1
                expected = event.sequence + 1
                sub.first = sub.first or event.sequence
                sub.last = event.sequence
                sub.count += 1
                if event.action == "token.issued":
                    delay = received - event.time.ToNanoseconds() / 1e9
                    sub.delays.append(delay)
                    sub.timed.append((time.perf_counter() - self._began, delay))
            if self._until is not None and sub.last >= self._until:
                break
        call.cancel()


# -- the process ------------------------------------------------------------------------------


def serve(conn: Connection) -> None:
    """A worker process's main: answer jobs until told to stop."""
    worker = Worker()
    handlers: dict[str, Callable[[Job], Job]] = {
        "setup": worker.setup,
        "prepare": worker.prepare,
        "unary": worker.unary,
        "offline": worker.offline,
        "revocation": worker.revocation,
        "catchup": worker.catchup,
        "fanout_start": worker.fanout_start,
        "fanout_finish": worker.fanout_finish,
    }
    while True:
        job: Job = conn.recv()
        if job["op"] == "stop":
            conn.send({"ok": True})
            return
        try:
            conn.send({"ok": True, **handlers[job["op"]](job)})
        except Exception as exc:
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
