"""The benchmark run: pre-fill two data dirs, start two brokers, drive them from worker
processes, judge the figures against the targets, print the table and write the JSON.

Two brokers run side by side for the whole run: "small" holds 10^3 stored events and
answers every figure; "large" holds 10^6 (10^5 with --quick) and answers the growth figures.
Rounds of every unary figure are interleaved (no-op, IssueToken, VerifyToken, ... on both
brokers, then the next round), so a slow moment of the machine spreads over all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import multiprocessing
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from broker.bench import accounts, baseline, brokerproc, merkle, replicas, report, worker
from broker.bench.prefill import prefill
from broker.bench.report import Figure
from broker.store.sqlite import DB_FILENAME
from tokenbroker.messages import EVENTS_PER_MESSAGE

SECTIONS = ("unary", "offline", "revocation", "audit", "replicas", "workers", "merkle")
# Sections that start brokers of their own instead of the pre-filled pair.
OWN_BROKERS = ("replicas", "workers")
SMALL = "small"
LARGE = "large"
NOOP_DESCRIPTION = (
    "no-op: grpc.health.v1.Health/Check served by the same broker process and port (same "
    "grpc server, thread pool and interceptor list; the interceptors pass it through), "
    "sent with the same authorization header"
)


@dataclass(frozen=True)
class Plan:
    quick: bool
    rounds: int
    seconds: float
    concurrency: int
    clients: int
    small_events: int
    large_events: int
    offline_seconds: float
    revocation_samples: int
    catchup_rounds: int
    catchup_events: int
    fanout_subscribers: int
    fanout_seconds: float
    sections: tuple[str, ...]
    workers: int = 2  # the N of `serve --workers N` in the workers section
    baseline: str = ""  # a commit whose broker runs beside this one (workers section)
    compare: str = ""  # serve flags of one more single-process broker (workers section)
    runs: int = 8  # active runs whose credentials IssueToken load cycles through
    tokens: int = 64  # step tokens that verification cycles through


def plan_from_args(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    sections = tuple(s for s in (args.only or ",".join(SECTIONS)).split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"token-broker bench: unknown section(s) {sorted(unknown)}")
    return Plan(
        quick=quick,
        rounds=args.rounds or (3 if quick else 5),
        seconds=args.seconds or (0.6 if quick else 2.0),
        concurrency=args.concurrency,
        clients=args.clients,
        small_events=1_000,
        large_events=args.large or (100_000 if quick else 1_000_000),
        offline_seconds=0.4 if quick else 1.0,
        revocation_samples=50 if quick else 200,
        catchup_rounds=2 if quick else 3,
        catchup_events=20_000 if quick else 100_000,
        fanout_subscribers=max(args.fanout_subscribers, 1),
        fanout_seconds=args.fanout_seconds or (10.0 if quick else 60.0),
        sections=sections,
        workers=args.workers or max(os.cpu_count() or 2, 2),
        baseline=args.baseline or "",
        compare=args.compare or "",
    )


def run_from_args(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    out_dir = Path(args.out)
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        return run(plan, work, out_dir)
    with tempfile.TemporaryDirectory(prefix="token-broker-bench-") as tmp:
        return run(plan, Path(tmp), out_dir)


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- worker processes -------------------------------------------------------------------------


class Workers:
    """Client processes (spawned, so they share nothing with this one but a pipe each)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[Any] = []
        for i in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=worker.serve, args=(child,), name=f"bench-client-{i}", daemon=True
            )
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)

    def send(self, index: int, job: worker.Job) -> None:
        self._pipes[index].send(job)

    def receive(self, index: int, timeout: float = 600.0) -> worker.Job:
        pipe = self._pipes[index]
        if not pipe.poll(timeout):
            raise TimeoutError(f"client process {index} did not answer in {timeout:g}s")
        answer: worker.Job = pipe.recv()
        if not answer.get("ok"):
            raise RuntimeError(f"client process {index}: {answer.get('error')}")
        return answer

    def ask(self, index: int, job: worker.Job) -> worker.Job:
        self.send(index, job)
        return self.receive(index)

    def ask_all(self, indexes: Sequence[int], job: worker.Job) -> list[worker.Job]:
        for i in indexes:
            self.send(i, job)
        return [self.receive(i) for i in indexes]

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send({"op": "stop"})
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()


# -- the run ----------------------------------------------------------------------------------


def run(plan: Plan, work: Path, out_dir: Path) -> int:
    began = time.monotonic()
    policy = accounts.write_policy(work / "policy")
    if set(plan.sections) <= set(OWN_BROKERS):  # their own brokers only: no pre-filled stores
        alone: list[Figure] = []
        if "workers" in plan.sections:
            alone += _workers(plan, work / "workers", policy)
        if "replicas" in plan.sections:
            alone += replicas.run(work / "replicas", policy, plan.seconds * plan.rounds)
        print(report.table(alone, _own_header(plan)))
        meta = _meta(plan, {}, {}, time.monotonic() - began)
        path = out_dir / f"{_stamp()}-{meta['commit'][:10]}-{'-'.join(plan.sections)}.json"
        report.write_json(path, alone, meta)
        say(f"wrote {path}")
        return 0
    say(f"pre-filling {plan.small_events:,} and {plan.large_events:,} stored events")
    fill_seconds = {
        SMALL: prefill(work / SMALL, plan.small_events),
        LARGE: prefill(work / LARGE, plan.large_events),
    }
    brokers: dict[str, brokerproc.BrokerProcess] = {}
    figures: list[Figure] = []
    memory: dict[str, dict[str, dict[str, int]]] = {}
    if "merkle" in plan.sections:
        say("merkle: appends and proofs on the pre-filled stores, in this process")
        figures += merkle.measure({SMALL: work / SMALL, LARGE: work / LARGE}, plan.quick)
        if set(plan.sections) == {"merkle"}:
            print(report.table(figures, ["merkle: the audit tree in-process, no brokers"]))
            return 0
    try:
        for name in (SMALL, LARGE):
            # Room for every fan-out subscriber, the revocation followers and the catch-up
            # readers at once.
            threads = ("--max-audit-streams", str(plan.fanout_subscribers + 32))
            brokers[name] = b = brokerproc.start(work / name, policy, work / f"{name}.log", threads)
            say(f"broker {name}: pid {b.pid}, {b.target} (attach a profiler here)")
        memory["start"] = {name: b.memory_kib() for name, b in brokers.items()}
        workers = Workers(plan.clients + 1)
        try:
            figures += _measure(plan, workers, brokers, policy.parent)
        finally:
            workers.close()
        memory["end"] = {name: b.memory_kib() for name, b in brokers.items()}
    finally:
        for b in brokers.values():
            b.stop()
    figures += _memory_figures(memory)
    if "workers" in plan.sections:
        figures += _workers(plan, work / "workers", policy)
    if "replicas" in plan.sections:
        say("replicas: sqlite with one process, postgresql with one and two replicas")
        figures += replicas.run(work / "replicas", policy, plan.seconds * plan.rounds)
    meta = _meta(plan, fill_seconds, memory, time.monotonic() - began)
    print(report.table(figures, _header(plan, meta)))
    stamp = _stamp()
    path = out_dir / f"{stamp}-{meta['commit'][:10]}{'-quick' if plan.quick else ''}.json"
    report.write_json(path, figures, meta)
    say(f"wrote {path} ({meta['seconds']:.0f} s in all)")
    return 0


def _stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def _measure(
    plan: Plan, workers: Workers, brokers: dict[str, brokerproc.BrokerProcess], policy_dir: Path
) -> list[Figure]:
    load = list(range(plan.clients))
    observer = plan.clients  # the last process: subscribers and the revocation watcher
    specs = _specs(brokers)
    workers.ask_all(
        [*load, observer], {"op": "setup", "brokers": specs, "policy_dir": str(policy_dir)}
    )
    for name in brokers:
        workers.ask_all(
            [*load, observer],
            {"op": "prepare", "broker": name, "runs": plan.runs, "tokens": plan.tokens},
        )
    figures: list[Figure] = []
    if "unary" in plan.sections:
        figures += _unary(plan, workers, load)
    if "offline" in plan.sections:
        figures += _offline(plan, workers, load[0])
    if "revocation" in plan.sections:
        figures += _revocation(plan, workers, observer)
    if "audit" in plan.sections:
        figures += _audit(plan, workers, load, observer, brokers)
    return figures


def _specs(brokers: dict[str, brokerproc.BrokerProcess]) -> dict[str, dict[str, Any]]:
    return {n: {"target": b.target, "issuer": b.issuer, "pids": b.pids} for n, b in brokers.items()}


# -- unary RPCs -------------------------------------------------------------------------------

UNARY_NAMES = {
    "noop": "no-op (Health/Check)",
    "issue": "IssueToken",
    "issue_bound": "IssueToken, bound to the step's key",
    "issue_dpop": "IssueToken by a bound run credential (proof per call)",
    "verify": "VerifyToken (online)",
    "execute": "ExecuteOnBehalfOf",
    "revoke": "RevokeRun",
}
SMALL_KINDS = ("noop", "issue", "issue_bound", "issue_dpop", "verify", "execute", "revoke")
LARGE_KINDS = ("noop", "issue", "verify")


def _unary(plan: Plan, workers: Workers, load: list[int]) -> list[Figure]:
    schedule = [(SMALL, k) for k in SMALL_KINDS] + [(LARGE, k) for k in LARGE_KINDS]
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in schedule}
    latencies: dict[tuple[str, str], list[float]] = {key: [] for key in schedule}
    errors: dict[tuple[str, str], dict[str, int]] = {key: {} for key in schedule}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in schedule}
    for round_number in range(plan.rounds + 1):
        say(
            f"unary round {round_number}/{plan.rounds}" + (" (warm-up)" if not round_number else "")
        )
        for broker, kind in schedule:
            job = {
                "op": "unary",
                "broker": broker,
                "kind": kind,
                "seconds": plan.seconds,
                "concurrency": plan.concurrency,
                "prepare_seconds": plan.seconds,
            }
            answers = workers.ask_all(load, job)
            if round_number == 0:
                continue
            calls = sum(len(a["latencies"]) for a in answers)
            rates[(broker, kind)].append(calls / max(a["seconds"] for a in answers))
            # Concurrent clients each read the broker's whole CPU time: take the largest.
            cpu[(broker, kind)].append(max(a["broker_cpu"] for a in answers) / max(calls, 1))
            for a in answers:
                latencies[(broker, kind)].extend(a["latencies"])
                for code, n in a["errors"].items():
                    errors[(broker, kind)][code] = errors[(broker, kind)].get(code, 0) + n
    made = {
        key: Figure.measured(UNARY_NAMES[key[1]], rates[key], latencies[key]) for key in schedule
    }
    for key, counted in errors.items():
        made[key].cpu_us = statistics.median(cpu[key]) * 1e6 if cpu[key] else math.nan
        if counted:
            made[key].note = f"errors: {counted}"
    return _judge_unary(plan, made)


def _judge_unary(plan: Plan, made: dict[tuple[str, str], Figure]) -> list[Figure]:
    noop = made[(SMALL, "noop")]
    issue = made[(SMALL, "issue")].against(noop)
    issue.judge(
        "≥0.80× ops, p99 ≤2× no-op",
        issue.ratio >= 0.8 and issue.p99_ms <= 2 * noop.p99_ms,
    )
    issue.note = (issue.note + "; " if issue.note else "") + (
        f"p99 is {issue.p99_ms / noop.p99_ms:.2f}× the no-op's; caller: the run's credential"
    )
    verify = made[(SMALL, "verify")].against(noop)
    verify.judge("≥0.90× ops", verify.ratio >= 0.9)
    execute = made[(SMALL, "execute")].against(noop)
    revoke = made[(SMALL, "revoke")].against(noop)
    bound = made[(SMALL, "issue_bound")].against(made[(SMALL, "issue")])
    bound.judge("within 1.2× of IssueToken", bound.ratio >= 1 / 1.2)
    bound.note = (bound.note + "; " if bound.note else "") + (
        "dpop_jwk in the request, cnf.jkt in the token; ratio against unbound IssueToken"
    )
    dpop = made[(SMALL, "issue_dpop")].against(made[(SMALL, "issue")])
    dpop.note = (dpop.note + "; " if dpop.note else "") + (
        "the proof is checked and its jti committed to the store (replay across replicas) "
        "before IssueToken runs; ratio against IssueToken with an unbound credential"
    )
    figures = [noop, issue, verify, execute, revoke, bound, dpop]
    large = _stored(plan.large_events)
    large_noop = made[(LARGE, "noop")]
    large_noop.name = f"no-op, {large} stored"
    figures.append(large_noop)
    for kind in ("issue", "verify"):
        small, grown = made[(SMALL, kind)], made[(LARGE, kind)]
        grown.name = f"{small.name}, {large} stored"
        grown.ratio = grown.rate / small.rate if small.rate else math.nan
        grown.reference = f"{small.name}, 10^3 stored"
        slower = small.rate / grown.rate if grown.rate else math.inf
        grown.judge("within 1.2× of 10^3", slower <= 1.2)
        grown.note = (grown.note + "; " if grown.note else "") + (
            f"{slower:.2f}× slower than with 10^3 stored (p50 {grown.p50_ms:.2f} vs "
            f"{small.p50_ms:.2f} ms); {grown.rate / large_noop.rate:.2f}× its broker's no-op"
        )
        figures.append(grown)
    return figures


def _stored(n: int) -> str:
    """10^k for powers of ten, else the number."""
    k = round(math.log10(n)) if n > 0 else 0
    return f"10^{k}" if 10**k == n else f"{n:,}"


# -- offline verification ---------------------------------------------------------------------


def _offline(plan: Plan, workers: Workers, index: int) -> list[Figure]:
    say("offline verification")
    answer = workers.ask(
        index,
        {"op": "offline", "broker": SMALL, "rounds": plan.rounds, "seconds": plan.offline_seconds},
    )
    bare = Figure.measured(
        "bare PyJWT jwt.decode", answer["rates"]["pyjwt"], answer["latencies"]["pyjwt"]
    )
    bare.note = "ES256, same tokens, aud+iss checked; one thread in a client process"
    checked = Figure.measured(
        "offline TokenVerifier.check", answer["rates"]["verifier"], answer["latencies"]["verifier"]
    ).against(bare)
    checked.judge("≥0.80× PyJWT", checked.ratio >= 0.8)
    checked.note = "with a RevocationFollower; ratio against the bare decode"
    bound = Figure.measured(
        "offline TokenVerifier.check, bound token + DPoP proof",
        answer["rates"]["bound"],
        answer["latencies"]["bound"],
    )
    paired = Figure.measured(
        "unbound, interleaved", answer["rates"]["paired"], answer["latencies"]["paired"]
    )
    # Judged on the medians of calls interleaved one by one: on a shared machine a round's
    # rate swings with other processes' load, a median of paired calls much less.
    bound.ratio = paired.p50_ms / bound.p50_ms if bound.p50_ms else math.nan
    bound.reference = "unbound checks interleaved call by call"
    bound.judge("≥0.50× unbound", bound.ratio >= 0.5)
    bound.note = (
        "proof checked in full (signature, htm/htu, iat, ath, jkt, replay cache); ratio of "
        f"p50s against unbound checks by the same verifier interleaved call by call (p50 "
        f"{paired.p50_ms:.3f} vs {bound.p50_ms:.3f} ms; rates {paired.rate:,.0f} vs "
        f"{bound.rate:,.0f} ops/s)"
    )
    return [bare, checked, bound]


# -- revocation -------------------------------------------------------------------------------


def _revocation(plan: Plan, workers: Workers, index: int) -> list[Figure]:
    say("revocation latency")
    answer = workers.ask(
        index,
        {
            "op": "revocation",
            "broker": SMALL,
            "samples": plan.revocation_samples,
            "poll": 0.0002,
            "limit": 5.0,
        },
    )
    figure = Figure.measured("revocation → offline rejection", [], answer["latencies"], unit="")
    figure.judge("p99 ≤50 ms", figure.p99_ms <= 50)
    revoke_p50 = report.percentile(answer["revoke_calls"], 50) * 1e3
    figure.note = (
        f"from RevokeRun's return until TokenVerifier.check rejects (RevocationFollower, "
        f"polled every 0.2 ms); RevokeRun itself p50 {revoke_p50:.2f} ms; idle broker"
    )
    return [figure]


# -- audit streams ----------------------------------------------------------------------------


def _head(data_dir: Path) -> int:
    """The newest audit sequence, read from the broker's file (WAL readers never block it)."""
    conn = sqlite3.connect(f"file:{data_dir / DB_FILENAME}?mode=ro", uri=True)
    try:
        return int(
            conn.execute("SELECT COALESCE(MAX(sequence), 0) FROM audit_events").fetchone()[0]
        )
    finally:
        conn.close()


def _audit(
    plan: Plan,
    workers: Workers,
    load: list[int],
    observer: int,
    brokers: dict[str, brokerproc.BrokerProcess],
) -> list[Figure]:
    say("audit catch-up")
    stored = _head(brokers[LARGE].data_dir)
    step = max(stored // plan.catchup_rounds, 1)
    # One event per message (what old clients ask for) and pages, interleaved in one run.
    rates: dict[int, list[float]] = {0: [], EVENTS_PER_MESSAGE: []}
    cpu: dict[int, list[float]] = {0: [], EVENTS_PER_MESSAGE: []}  # broker CPU µs per event
    for r in range(plan.catchup_rounds):
        for per_message, measured in rates.items():
            answer = workers.ask(
                load[0],
                {
                    "op": "catchup",
                    "broker": LARGE,
                    "after": r * step,
                    "limit": min(plan.catchup_events, stored - r * step),
                    "per_message": per_message,
                },
            )
            measured.append(answer["events"] / answer["seconds"])
            cpu[per_message].append(answer["broker_cpu"] / max(answer["events"], 1) * 1e6)
    single = Figure.measured("StreamAudit catch-up, 1 event/message", rates[0], [], unit="events/s")
    single.cpu_us = statistics.median(cpu[0])
    single.note = "what clients before pages ask for; not judged"
    catchup = Figure.measured(
        f"StreamAudit catch-up, pages of {EVENTS_PER_MESSAGE}",
        rates[EVENTS_PER_MESSAGE],
        [],
        unit="events/s",
    )
    catchup.cpu_us = statistics.median(cpu[EVENTS_PER_MESSAGE])
    catchup.judge("≥50,000 events/s", catchup.rate >= 50_000)
    catchup.note = (
        f"{plan.catchup_rounds} reads of up to {plan.catchup_events:,} stored events, "
        "one stream, no filter"
    )
    return [single, catchup, _fanout(plan, workers, load, observer, brokers[SMALL])]


FANOUT_RATE = 420.0  # IssueToken per second while the subscribers follow (target: ≥ 400)


def _fanout(
    plan: Plan, workers: Workers, load: list[int], observer: int, broker: brokerproc.BrokerProcess
) -> Figure:
    say(
        f"live fan-out to {plan.fanout_subscribers} subscribers, IssueToken at "
        f"{FANOUT_RATE:g}/s for {plan.fanout_seconds:g} s"
    )
    after = _head(broker.data_dir)
    workers.ask(
        observer,
        {
            "op": "fanout_start",
            "broker": SMALL,
            "after": after,
            "subscribers": plan.fanout_subscribers,
        },
    )
    writes = workers.ask_all(
        load,
        {
            "op": "unary",
            "broker": SMALL,
            "kind": "issue",
            "seconds": plan.fanout_seconds,
            "concurrency": plan.concurrency,
            "rate": FANOUT_RATE / len(load),
        },
    )
    until = _head(broker.data_dir)
    answer = workers.ask(observer, {"op": "fanout_finish", "until": until, "timeout": 60.0})
    expected = until - after
    subs = answer["subscribers"]
    lossless = answer["complete"] and all(
        s["count"] == expected and s["gaps"] == 0 and s["last"] == until for s in subs
    )
    delivered = sum(s["count"] for s in subs)
    written = sum(len(w["latencies"]) for w in writes)
    write_rate = written / max(w["seconds"] for w in writes)
    cpu_per_write = max(w["broker_cpu"] for w in writes) / max(written, 1) * 1e6
    figure = Figure.measured(
        f"live fan-out, {plan.fanout_subscribers} subscribers",
        [delivered / answer["seconds"]] if answer["seconds"] > 0 else [],
        answer["delays"],
        unit="events/s",
    )
    # Growth: the p99 of the last third of the run against the first third's.
    thirds = [_p99_of_third(answer["timed"], k, plan.fanout_seconds) for k in (0, 2)]
    steady = thirds[1] <= 50 and figure.p99_ms <= 50
    figure.judge(
        f"{plan.fanout_subscribers} × all in order, p99 ≤50 ms, not growing, ≥400 writes/s",
        lossless and steady and write_rate >= 400,
    )
    got = sorted({s["count"] for s in subs})
    figure.note = (
        f"{expected} events written ({written} IssueToken at {write_rate:,.0f}/s, "
        f"{plan.fanout_seconds:g} s, broker CPU {cpu_per_write:,.0f} µs per IssueToken and "
        f"its fan-out); each subscriber received {got} of {expected}, "
        f"{sum(s['gaps'] for s in subs)} gaps, {answer['dropped']} streams dropped; latency = "
        f"event time → received, p99 {thirds[0]:.1f} ms in the first third of the run, "
        f"{thirds[1]:.1f} ms in the last; pages of {EVENTS_PER_MESSAGE}"
    )
    return figure


def _p99_of_third(timed: list[tuple[float, float]], third: int, seconds: float) -> float:
    """p99 in ms of the delays received in that third (0, 1, 2) of the writing time."""
    chosen = [delay for at, delay in timed if third <= 3 * at / seconds < third + 1]
    return report.percentile(chosen, 99) * 1e3


# -- worker processes (`serve --workers N`) and the baseline ------------------------------

WORKER_KINDS = ("noop", "issue", "verify")


def _workers(plan: Plan, work: Path, policy: Path) -> list[Figure]:
    """`serve --workers 1` beside `--workers N` (and the baseline commit's broker), each on a
    fresh SQLite data dir: the no-op, IssueToken and VerifyToken, rounds interleaved; broker
    CPU per call summed over every worker process."""
    work.mkdir(parents=True, exist_ok=True)
    configs: list[tuple[str, tuple[str, ...], Path | None, int]] = [
        ("1 worker", ("--workers", "1"), None, 1)
    ]
    if plan.workers > 1:
        configs.append(
            (f"{plan.workers} workers", ("--workers", str(plan.workers)), None, plan.workers)
        )
    if plan.compare:
        configs.append((f"1 worker {plan.compare}", tuple(plan.compare.split()), None, 1))
    if plan.baseline:
        exported = baseline.export(plan.baseline, work / "baseline-source")
        configs.insert(0, (f"{plan.baseline} (baseline)", (), exported, 1))
    brokers: dict[str, brokerproc.BrokerProcess] = {}
    try:
        for n, (name, extra, source, _) in enumerate(configs):
            given = policy if source is None else _baseline_policy(policy)
            brokers[name] = b = brokerproc.start(
                work / f"data-{n}", given, work / f"broker-{n}.log", extra, source=source
            )
            say(f"workers section: {name}: pids {b.pids}, {b.target}")
        clients = Workers(plan.clients)
        try:
            made = _workers_rounds(plan, clients, brokers, configs, policy.parent)
            across = _revocation_across(plan, clients, f"{plan.workers} workers")
        finally:
            clients.close()
    finally:
        for b in brokers.values():
            b.stop()
    return _judge_workers(plan, made, configs) + across


def _baseline_policy(policy: Path) -> Path:
    """The bench policy as an older broker reads it: before the least-privilege `verifier`
    role existed, what an offline verifier needed was the `auditor` role (same accounts,
    same keys, in the same directory)."""
    older = policy.with_name("policy-baseline.toml")
    older.write_text(policy.read_text().replace('roles = ["verifier"]', 'roles = ["auditor"]'))
    return older


def _revocation_across(plan: Plan, clients: Workers, name: str) -> list[Figure]:
    """RevokeRun through worker 0 → an offline verifier following worker 1's log rejects."""
    if plan.workers < 2:
        return []
    say(f"revocation across workers ({name})")
    job = {
        "op": "revocation",
        "broker": name,
        "samples": plan.revocation_samples,
        "poll": 0.0002,
        "limit": 5.0,
        "across": True,
    }
    answer = clients.ask(0, job)
    figure = Figure.measured(
        f"revocation → offline rejection, across {name}", [], answer["latencies"], unit=""
    )
    figure.judge("p99 ≤50 ms", figure.p99_ms <= 50)
    figure.note = (
        "RevokeRun through worker 0; TokenVerifier with a RevocationFollower streaming from "
        "worker 1, polled every 0.2 ms; " + report.excess(figure.p99_ms / 50, 1.0)
    )
    return [figure]


def _workers_rounds(
    plan: Plan,
    clients: Workers,
    brokers: dict[str, brokerproc.BrokerProcess],
    configs: list[tuple[str, tuple[str, ...], Path | None, int]],
    policy_dir: Path,
) -> dict[tuple[str, str], Figure]:
    load = list(range(plan.clients))
    specs = _specs(brokers)
    clients.ask_all(load, {"op": "setup", "brokers": specs, "policy_dir": str(policy_dir)})
    for name in brokers:
        clients.ask_all(
            load, {"op": "prepare", "broker": name, "runs": plan.runs, "tokens": plan.tokens}
        )
    schedule = [(name, kind) for name, *_ in configs for kind in WORKER_KINDS]
    processes = {name: count for name, _, _, count in configs}
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in schedule}
    latencies: dict[tuple[str, str], list[float]] = {key: [] for key in schedule}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in schedule}
    for round_number in range(plan.rounds + 1):
        say(f"workers round {round_number}/{plan.rounds}" + ("" if round_number else " (warm-up)"))
        for name, kind in schedule:
            job = {
                "op": "unary",
                "broker": name,
                "kind": kind,
                "seconds": plan.seconds,
                "concurrency": plan.concurrency,
                # Two connections per worker process, the same for every configuration.
                "connections": 2 * plan.workers,
                "workers": processes[name],
            }
            answers = clients.ask_all(load, job)
            if round_number == 0:
                continue
            calls = sum(len(a["latencies"]) for a in answers)
            rates[(name, kind)].append(calls / max(a["seconds"] for a in answers))
            cpu[(name, kind)].append(max(a["broker_cpu"] for a in answers) / max(calls, 1))
            for a in answers:
                latencies[(name, kind)].extend(a["latencies"])
    made = {}
    for name, kind in schedule:
        key = (name, kind)
        figure = Figure.measured(f"{UNARY_NAMES[kind]}, {name}", rates[key], latencies[key])
        figure.cpu_us = statistics.median(cpu[key]) * 1e6 if cpu[key] else math.nan
        made[key] = figure
    return made


def _judge_workers(
    plan: Plan,
    made: dict[tuple[str, str], Figure],
    configs: list[tuple[str, tuple[str, ...], Path | None, int]],
) -> list[Figure]:
    figures: list[Figure] = []
    base_name = configs[0][0] if plan.baseline else ""
    single = "1 worker"
    for name, *_ in configs:
        noop = made[(name, "noop")]
        issue = made[(name, "issue")].against(noop)
        verify = made[(name, "verify")].against(noop)
        figures += [noop, issue, verify]
        if name == base_name:
            continue  # the old commit is the reference, not judged
        issue.judge(
            "≥0.80× ops, p99 ≤2× no-op", issue.ratio >= 0.8 and issue.p99_ms <= 2 * noop.p99_ms
        )
        issue.note = report.shortfall(issue.ratio, 0.8) + (
            f"; p99 {issue.p99_ms / noop.p99_ms:.2f}× the no-op's"
        )
        verify.judge("≥0.90× ops", verify.ratio >= 0.9)
        verify.note = report.shortfall(verify.ratio, 0.9)
        if name != single:
            for kind in WORKER_KINDS:
                one, many = made[(single, kind)], made[(name, kind)]
                scale = f"{many.rate / one.rate:.2f}× the throughput of 1 worker"
                many.note = f"{many.note}; {scale}" if many.note else scale
        if base_name:
            for kind in ("issue", "verify"):
                figures.append(_cpu_against(made[(name, kind)], made[(base_name, kind)]))
    return figures


def _cpu_against(now: Figure, base: Figure) -> Figure:
    """Broker CPU per call against the baseline's, same run: the target is at most half."""
    figure = Figure(name=f"{now.name}: CPU per call", unit="µs/call", rate=now.cpu_us)
    figure.cpu_us = now.cpu_us
    figure.ratio = now.cpu_us / base.cpu_us if base.cpu_us else math.nan
    figure.reference = base.name
    figure.judge("≤0.50× the baseline's", figure.ratio <= 0.5)
    figure.note = f"baseline {base.cpu_us:,.0f} µs/call; " + report.excess(figure.ratio, 0.5)
    return figure


def _own_header(plan: Plan) -> list[str]:
    return [
        f"token-broker bench --only {','.join(plan.sections)}: {plan.rounds} rounds × "
        f"{plan.seconds:g} s, {plan.clients} client process(es) × {plan.concurrency} calls in "
        f"flight, {2 * plan.workers} connections spread evenly over each broker's processes",
        "cpu: all of a broker's processes (every worker), per call",
        "",
    ]


# -- memory and the environment ---------------------------------------------------------------


def _memory_figures(memory: dict[str, dict[str, dict[str, int]]]) -> list[Figure]:
    end = memory.get("end", {})
    small = end.get(SMALL, {}).get("VmRSS")
    large = end.get(LARGE, {}).get("VmRSS")
    if not small or not large:
        return []
    start = memory["start"]
    figure = Figure(name="broker RSS, large vs small", unit="MiB", rate=large / 1024)
    figure.ratio = large / small
    figure.reference = "the 10^3 broker's RSS"
    figure.judge("≤1.2× the 10^3 broker", large <= 1.2 * small)
    figure.note = (
        f"at the end: {large / 1024:.0f} MiB (large) vs {small / 1024:.0f} MiB (small); at start "
        f"{start[LARGE].get('VmRSS', 0) / 1024:.0f} vs {start[SMALL].get('VmRSS', 0) / 1024:.0f} "
        "MiB; history of ended runs stays on disk"
    )
    return [figure]


def _git(*args: str) -> str:
    git = shutil.which("git")
    if git is None:
        return ""
    try:
        return subprocess.run(  # noqa: S603 (fixed arguments)
            [git, *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _meta(
    plan: Plan,
    fill_seconds: dict[str, float],
    memory: dict[str, dict[str, dict[str, int]]],
    seconds: float,
) -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    return {
        "commit": commit,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
        "plan": asdict(plan),
        "prefill_seconds": fill_seconds,
        "memory_kib": memory,
        "noop": NOOP_DESCRIPTION,
        "seconds": seconds,
    }


def _header(plan: Plan, meta: dict[str, Any]) -> list[str]:
    mode = "--quick" if plan.quick else "full"
    dirty = " (uncommitted changes)" if meta["dirty"] else ""
    return [
        f"token-broker bench ({mode}) — commit {meta['commit'][:10]}{dirty}, {meta['cpus']} CPUs, "
        f"Python {meta['python']}, grpcio {meta['grpcio']}",
        "broker: `token-broker serve`, SQLite default (WAL, synchronous=FULL), "
        f"{plan.small_events:,} stored events; growth broker: {plan.large_events:,}"
        + (" (--quick; the full run uses 1,000,000)" if plan.quick else ""),
        f"load: {plan.clients} client process(es) × {plan.concurrency} calls in flight (grpc.aio), "
        f"{plan.rounds} rounds × {plan.seconds:g} s after a warm-up round, interleaved",
        NOOP_DESCRIPTION,
        "rate: median of rounds; p50/p99: all samples; ratio: rate ÷ no-op rate unless noted; "
        "cpu: the broker process's CPU time per call (all its threads, gRPC's included)",
        "",
    ]
