"""Load and bookkeeping for the fault suites: a broker process on a fixed port that the test
stops, kills and restarts, clients of the client library that retry, and a ledger of what
the broker acknowledged, to check against afterwards."""

from __future__ import annotations

import collections
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import BrokerProcess, reached, start_broker_process
from tokenbroker import BrokerClient, RetryPolicy
from tokenbroker.credentials import dev_admin_credentials
from tokenbroker.errors import BrokerError

AUDIENCE = "api.example.com"
# Long enough to ride out a restart on a busy 2-core machine, short enough to fail a test.
# The deadline is the bound, not the attempts: a refused connection fails an attempt at
# once, and 60 attempts (~15 s of backoff) ran out under load while a restart took 5.8 s.
PATIENT_TIMEOUT = 60.0
PATIENT = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.5)


def env_int(name: str, default: int) -> int:
    """A size of a suite: `default` in `make test`, more through the environment."""
    return int(os.environ.get(name, default))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RestartableBroker:
    """`token-broker serve` on one data dir and one port, across stops, kills and restarts."""

    def __init__(self, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
        self.data_dir = tmp_path / "data"
        self.log_dir = tmp_path
        self.port = free_port()
        # A fixed issuer: clients' assertions stay valid across restarts.
        self.args = ("--listen", f"127.0.0.1:{self.port}", "--issuer", "http://broker.test", *extra)
        self.process: BrokerProcess | None = None
        self.starts = 0
        self.downtimes: list[float] = []  # seconds from each stop or kill to serving again
        self._down_since: float | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> BrokerProcess:
        self.process = start_broker_process(self.data_dir, self.args, log_dir=self.log_dir)
        self.starts += 1
        if self._down_since is not None:
            self.downtimes.append(time.monotonic() - self._down_since)
            self._down_since = None
        return self.process

    def kill(self) -> None:
        assert self.process is not None
        self._down_since = time.monotonic()
        os.kill(self.process.process.pid, signal.SIGKILL)
        self.process.process.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.process is not None
        self._down_since = time.monotonic()
        return self.process.terminate_and_wait(timeout)

    def client(self) -> BrokerClient:
        return BrokerClient(
            self.target,
            credentials=dev_admin_credentials(self.data_dir),
            retry=PATIENT,
            timeout=PATIENT_TIMEOUT,
        )

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.log_dir.glob("broker-*.log")))


@dataclass
class Ledger:
    """What the broker acknowledged (the call returned), and what failed, by operation."""

    runs: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    tokens: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, op: str, rpc: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`rpc(*args, **kwargs)`, counted; None (and a counted failure) if it failed."""
        started = time.monotonic()
        try:
            result = rpc(*args, **kwargs)
        except BrokerError as error:
            took = time.monotonic() - started
            with self.lock:
                self.failures[op] += 1
                self.examples.setdefault(op, f"{type(error).__name__} after {took:.1f}s: {error}")
            return None
        with self.lock:
            self.calls[op] += 1
            self.seconds[op] += time.monotonic() - started
        return result

    def merged(self, other: Ledger) -> Ledger:
        """Both ledgers' counts (for figures over several phases)."""
        merged = Ledger()
        for ledger in (self, other):
            merged.calls.update(ledger.calls)
            merged.failures.update(ledger.failures)
            for op, seconds in ledger.seconds.items():
                merged.seconds[op] += seconds
        merged.examples = {**other.examples, **self.examples}
        return merged

    def summary(self) -> str:
        return f"calls {dict(self.calls)}; failures {dict(self.failures)} e.g. {self.examples}"


def pipeline_worker(client: BrokerClient, ledger: Ledger, stop: threading.Event) -> None:
    """A pipeline, again and again: start (or be started for a person), mint a token, check
    it, end the run. Every answer the broker acknowledged goes into the ledger."""
    rng = random.Random()
    while not stop.is_set():
        if rng.random() < 0.25:
            started = ledger.call(
                "ExecuteOnBehalfOf",
                client.execute_on_behalf_of,
                "acme",
                "web",
                "deploy",
                ceiling={"artifacts": "write"},
                asserted={"subject": "u-1", "email": "alice@example.com"},
            )
        else:
            started = ledger.call(
                "StartRun",
                client.start_run,
                "acme",
                "web",
                "deploy",
                ceiling={"artifacts": "write"},
                idempotency_key=f"k-{rng.getrandbits(64):x}",
            )
        if started is None:
            continue
        run_id = started.run.run_id
        with ledger.lock:
            ledger.runs.add(run_id)
        issued = ledger.call(
            "IssueToken", client.issue_token, AUDIENCE, {"artifacts": "read"}, run_id=run_id
        )
        if issued is not None:
            with ledger.lock:
                ledger.tokens[run_id].append(issued.token)
            ledger.call("VerifyToken", client.verify_token, issued.token, AUDIENCE)
        if ledger.call("RevokeRun", client.revoke_run, run_id, "done") is not None:
            with ledger.lock:
                ledger.revoked.add(run_id)


class Subscriber:
    """Follows the whole audit log through the client library, which resumes by itself."""

    def __init__(self, client: BrokerClient) -> None:
        self.sequences: list[int] = []
        self.error: BaseException | None = None
        self._stream = client.stream_audit(0, follow=True)
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def start(self) -> Subscriber:
        self._thread.start()
        return self

    def _follow(self) -> None:
        try:
            for event in self._stream:
                self.sequences.append(event.sequence)
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc

    def wait_for(self, sequence: int, within: float = 60.0) -> bool:
        def caught_up() -> bool:
            return bool(self.sequences) and self.sequences[-1] >= sequence

        reached(lambda: self.error is not None or caught_up(), within=within)
        return caught_up()

    def stop(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=10)


def run_threads(count: int, target: Callable[[], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


@dataclass(frozen=True)
class Usage:
    """What a process holds: resident memory (KiB), threads, open fds and how many are sockets."""

    rss_kib: int
    threads: int
    fds: int
    sockets: int
    database: int  # the SQLite database and its WAL, open once per connection

    @property
    def other(self) -> int:
        """Descriptors that are neither sockets nor the database."""
        return self.fds - self.sockets - self.database

    def __str__(self) -> str:
        return (
            f"RSS {self.rss_kib // 1024} MiB, {self.threads} threads, {self.fds} fds "
            f"({self.sockets} sockets, {self.database} database, {self.other} other)"
        )


def process_usage(pid: int) -> Usage:
    """A process's usage now, from /proc."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except OSError:
            continue  # closed meanwhile
    return Usage(
        rss_kib=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"]),
        fds=len(targets),
        sockets=sum(t.startswith("socket:") for t in targets),
        database=sum(t.endswith(("/broker.db", "/broker.db-wal")) for t in targets),
    )
