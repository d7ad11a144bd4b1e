"""`token-broker serve --workers N`: N broker processes on one address, over one store.

One Python process serves on one core at most (the interpreter lock); N processes use N. Each
worker is a whole broker — registry, change feed, reaper, keeper — on the shared store, and
follows the committed audit log like a replica (docs/design.md, "Follow the log"), so what one
worker commits every other knows within the change feed's bound: on PostgreSQL through
LISTEN/NOTIFY, on SQLite by a look at the file's data version every few milliseconds.

The process `serve` started as becomes their supervisor. It serves nothing itself:

- it checks what one broker checks before writing anything (the policy file, an external
  signing key, the TLS files, both addresses) and fails the same way;
- it reserves the gRPC port for the group: a socket bound with SO_REUSEPORT that never
  listens, so that port 0 becomes one port for every worker, the workers bind it beside it
  and the kernel spreads connections over them, and no process outside the group (one that
  does not set SO_REUSEPORT) can take it;
- HTTP (JWKS and discovery: small, rare reads of what the store holds) is served by worker 0
  alone; the supervisor picks its port (port 0) and names every worker the same issuer;
- so that worker 0's `/metrics` answers for every worker, it picks a private loopback port
  for each other worker, where that worker serves its own `/metrics` and nothing else, and
  tells worker 0 where they are (broker.api.http.workermetrics);
- it holds the store for the group: on SQLite the store's lock, whose descriptor each worker
  inherits and adopts, so that another `serve` on the same file is still refused;
- it starts worker 0 and waits until it serves (a first start creates the schema, the
  development policy and a key), then the others;
- it forwards SIGTERM/SIGINT (stop, each worker draining as one broker does) and SIGHUP
  (reload the policy) to every worker;
- it restarts a worker that dies, after a back-off (0.25 s, doubling to 8 s; reset once the
  worker stayed up 30 s), and gives up — stops every worker and exits 1 — when one worker
  dies MAX_FAILURES times in a row without staying up.

A worker is `python -m broker.api.workers`: it reads its part (settings, index, inherited
descriptors) as one JSON line on stdin, serves, and writes "ready" on its ready pipe. Its
stdin stays open as a lifeline: end of file (the supervisor is gone, even by SIGKILL) stops it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

from broker.api.server import ListenError, WorkerSlot, _check_signing_key, _credentials
from broker.app import store_options
from broker.policy.file import load_policy
from broker.settings import Settings, SettingsError, is_loopback, split_host_port
from broker.store import factory

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # a store holding 10^6 events opens well within this
STABLE = 30.0  # a worker up this long has recovered: its back-off starts again
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 8.0
MAX_FAILURES = 5
STOP_TIMEOUT = 10.0  # beyond the shutdown grace, before a worker is killed
TICK = 0.1


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_pipe: int = -1
    ready: bool = False
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    lifeline: IO[bytes] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.workers
        self.stopping = threading.Event()
        self._workers = [_Worker(i) for i in range(self.count)]
        self._reserved: socket.socket | None = None
        self._hold: factory.Hold | None = None
        self.port = 0
        self.http_port: int | None = None
        self.metrics_ports: dict[int, int] = {}  # worker index (not 0) -> private /metrics
        self.worker_settings: list[Settings] = []

    # -- before any worker ---------------------------------------------------------------

    def prepare(self) -> None:
        """Everything one broker checks before writing, then the ports and the store."""
        settings = self.settings
        if settings.policy is not None:
            load_policy(settings.policy)
        _check_signing_key(settings)
        _credentials(settings)  # the TLS files are readable and a key pair
        host, _ = split_host_port(settings.listen, "--listen")
        self._reserved, self.port = reserve_shared_port(settings.listen, "--listen")
        listen = f"{_shown(host)}:{self.port}"
        http_listen = ""
        issuer = settings.effective_issuer
        if settings.http_listen:
            http_host, _ = split_host_port(settings.http_listen, "--http-listen")
            self.http_port = pick_port(settings.http_listen, "--http-listen")
            http_listen = f"{_shown(http_host)}:{self.http_port}"
            issuer = settings.issuer.rstrip("/") or f"http://{http_listen}"
            taken = {self.port, self.http_port}
            ports = pick_loopback_ports(self.count - 1, taken)
            self.metrics_ports = dict(zip(range(1, self.count), ports, strict=True))
        self.worker_settings = [
            replace(
                settings,
                listen=listen,
                http_listen=http_listen if index == 0 else "",
                issuer=issuer,
            )
            for index in range(self.count)
        ]
        self._hold = factory.hold_for_workers(settings.store, store_options(settings))

    # -- the workers ---------------------------------------------------------------------

    def start(self) -> int | None:
        """Start every worker, the first alone; None once all serve, else an exit code."""
        for worker in self._workers:
            self._spawn(worker)
            code = self._wait_ready(worker)
            if code is not None:
                return code
        return None

    def _spawn(self, worker: _Worker) -> None:
        read_end, write_end = os.pipe()
        held = self._hold.fileno() if self._hold is not None else None
        spec = {
            "settings": encode_settings(self.worker_settings[worker.index]),
            "index": worker.index,
            "count": self.count,
            "held_lock": held,
            "ready_fd": write_end,
            "metrics_port": self.metrics_ports.get(worker.index),
            "metrics_peers": sorted(self.metrics_ports.items()) if worker.index == 0 else [],
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "broker.api.workers"],
            stdin=subprocess.PIPE,
            pass_fds=[write_end] + ([held] if held is not None else []),
        )
        os.close(write_end)
        assert process.stdin is not None
        process.stdin.write(json.dumps(spec).encode() + b"\n")
        process.stdin.flush()
        worker.process = process
        worker.lifeline = process.stdin  # kept open: its end tells the worker to stop
        worker.ready_pipe = read_end
        worker.ready = False
        worker.started = time.monotonic()
        worker.restart_at = None

    def _wait_ready(self, worker: _Worker) -> int | None:
        deadline = time.monotonic() + START_TIMEOUT
        while not worker.ready:
            if self.stopping.is_set():
                return 0
            self._poll_ready([worker], TICK)
            assert worker.process is not None
            if not worker.ready and worker.process.poll() is not None:
                code = worker.process.returncode
                log.error(
                    "worker could not start",
                    extra={"worker": worker.index, "exit_code": code},
                )
                return code if code and code > 0 else 1
            if time.monotonic() > deadline:
                log.error("worker did not start in time", extra={"worker": worker.index})
                return 1
        return None

    def _poll_ready(self, workers: list[_Worker], timeout: float) -> None:
        pipes = {w.ready_pipe: w for w in workers if w.ready_pipe >= 0 and not w.ready}
        if not pipes:
            self.stopping.wait(timeout)
            return
        readable, _, _ = select.select(list(pipes), [], [], timeout)
        for fd in readable:
            worker = pipes[fd]
            said = os.read(fd, 64)
            os.close(fd)
            worker.ready_pipe = -1
            if said.startswith(b"ready"):
                worker.ready = True
                assert worker.process is not None
                log.info(
                    "worker serving", extra={"worker": worker.index, "pid": worker.process.pid}
                )

    def supervise(self) -> int:
        """Until told to stop: restart workers that die; the exit code."""
        while not self.stopping.is_set():
            self._poll_ready(self._workers, TICK)
            now = time.monotonic()
            for worker in self._workers:
                if self.stopping.is_set():
                    break
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self._spawn(worker)
                    continue
                assert worker.process is not None
                if worker.process.poll() is None:
                    continue
                if not self._schedule_restart(worker, now):
                    return 1
        return 0

    def _schedule_restart(self, worker: _Worker, now: float) -> bool:
        assert worker.process is not None
        lived = now - worker.started
        worker.failures = 1 if lived >= STABLE else worker.failures + 1
        self._close_pipes(worker)
        if worker.failures > MAX_FAILURES:
            log.error(
                "worker keeps dying; stopping every worker",
                extra={
                    "worker": worker.index,
                    "exit_code": worker.process.returncode,
                    "deaths": worker.failures,
                },
            )
            return False
        delay = min(FIRST_BACKOFF * 2 ** (worker.failures - 1), MAX_BACKOFF)
        log.error(
            "worker died; restarting it",
            extra={
                "worker": worker.index,
                "pid": worker.process.pid,
                "exit_code": worker.process.returncode,
                "seconds_up": round(lived, 1),
                "restart_in": delay,
            },
        )
        worker.restart_at = now + delay
        return True

    def _close_pipes(self, worker: _Worker) -> None:
        if worker.ready_pipe >= 0:
            os.close(worker.ready_pipe)
            worker.ready_pipe = -1
        if worker.lifeline is not None:
            with contextlib.suppress(OSError):
                worker.lifeline.close()
            worker.lifeline = None

    def signal_all(self, signum: int) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM to every worker, each draining as one broker does; 0 if all stopped so."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + STOP_TIMEOUT
        clean = True
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            try:
                code = process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            clean = clean and (code == 0 or worker.restart_at is not None)
            self._close_pipes(worker)
        if self._hold is not None:
            self._hold.release()
        if self._reserved is not None:
            self._reserved.close()
        return 0 if clean else 1

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]


def supervise(settings: Settings) -> int:
    """Run `settings.workers` broker processes until SIGTERM or SIGINT; the exit code.
    Raises what one broker raises before it writes anything (ListenError, PolicyError,
    StoreRefused, SettingsError, OSError)."""
    if not settings.tls_enabled and not is_loopback(settings.listen):
        log.warning(
            "INSECURE: serving plaintext gRPC on a non-loopback address; credentials and "
            "tokens cross the network unencrypted",
            extra={"listen": settings.listen},
        )
    supervisor = Supervisor(settings)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        supervisor.stopping.set()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        log.info("reloading the policy in every worker", extra={"signal": "SIGHUP"})
        supervisor.signal_all(signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        supervisor.prepare()
        failed = supervisor.start()
        if failed is None and not supervisor.stopping.is_set():
            log.info(
                "token-broker serving",
                extra={
                    "listen": settings.listen,
                    "port": supervisor.port,
                    "store": settings.store,
                    "data_dir": str(settings.data_dir),
                    "tls": settings.tls_enabled,
                    "http_port": supervisor.http_port,
                    # 127.0.0.1 ports where workers 1.. serve their metrics to worker 0
                    "metrics_ports": sorted(supervisor.metrics_ports.values()),
                    "issuer": supervisor.worker_settings[0].issuer,
                    "workers": settings.workers,
                    "pids": supervisor.pids,
                },
            )
            failed = supervisor.supervise()
    finally:
        stopped = supervisor.stop()
    log.info("token-broker stopped")
    return failed if failed else stopped


# -- addresses ----------------------------------------------------------------------------


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _address(address: str, flag: str) -> tuple[Any, ...]:
    host, port = split_host_port(address, flag)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address} ({flag}): {exc.strerror}") from None
    family, kind, proto, _, where = infos[0]
    return family, kind, proto, where


def pick_port(address: str, flag: str) -> int:
    """A port of `address` nobody holds now (port 0: one the kernel picks)."""
    family, kind, proto, where = _address(address, flag)
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {address} ({flag}): {reason}") from None
        return int(probe.getsockname()[1])


def pick_loopback_ports(count: int, taken: set[int]) -> list[int]:
    """`count` distinct ports of 127.0.0.1 that nobody holds now and that are not `taken`:
    the workers' private metrics endpoints, which no other machine can reach."""
    from broker.api.http.workermetrics import PRIVATE_HOST

    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            # Held open until all are picked, so that the kernel never hands one out twice.
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                probe.bind((PRIVATE_HOST, 0))
            except OSError as exc:
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                where = f"{PRIVATE_HOST} (worker metrics)"
                raise ListenError(f"cannot listen on {where}: {reason}") from None
            port = int(probe.getsockname()[1])
            if port not in taken:
                ports.append(port)
        return ports


def reserve_shared_port(address: str, flag: str) -> tuple[socket.socket, int]:
    """A socket holding the port of `address` for the workers (SO_REUSEPORT, never
    listening), and the port. The port is first bound without SO_REUSEPORT, so that one
    another process holds is refused rather than shared with it."""
    family, kind, proto, where = _address(address, flag)
    port = pick_port(address, flag)
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((where[0], port, *where[2:]))
    except OSError as exc:
        held.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {address} ({flag}): {reason}") from None
    return held, port


# -- settings across the process boundary -------------------------------------------------


def encode_settings(settings: Settings) -> dict[str, Any]:
    return {
        f.name: str(value) if isinstance(value, Path) else value
        for f in fields(settings)
        for value in [getattr(settings, f.name)]
    }


def decode_settings(data: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        value = data[f.name]
        if f.type in ("Path", "Path | None") and value is not None:
            value = Path(value)
        values[f.name] = value
    return Settings(**values)


# -- the worker's side --------------------------------------------------------------------


def report_ready(slot: WorkerSlot, stopping: threading.Event) -> None:
    """Tell the supervisor this worker serves; stop when the supervisor is gone."""
    if slot.ready_fd >= 0:
        os.write(slot.ready_fd, b"ready\n")
        os.close(slot.ready_fd)

    def lifeline() -> None:
        # The raw descriptor, not sys.stdin: a daemon thread blocked in a buffered reader
        # stops the interpreter from exiting cleanly.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        if not stopping.is_set():
            log.warning("the supervisor is gone; stopping")
            stopping.set()

    threading.Thread(target=lifeline, name="lifeline", daemon=True).start()


def main() -> int:
    """A worker process: its part on stdin, then serve until told to stop."""
    from broker.api.server import serve
    from broker.cli import common
    from broker.store import StoreRefused
    from broker.telemetry import logs

    spec = json.loads(_read_line(0))
    settings = decode_settings(spec["settings"])
    slot = WorkerSlot(
        spec["index"],
        spec["count"],
        spec["held_lock"],
        spec["ready_fd"],
        metrics_port=spec["metrics_port"],
        metrics_peers=tuple((index, port) for index, port in spec["metrics_peers"]),
    )
    logs.configure(settings.log_level, settings.log_format, fields={"worker": slot.index})
    try:
        return serve(settings, slot)
    except (ListenError, StoreRefused) as exc:
        return common.report("token-broker serve", common.CliError(str(exc), 1), "")
    except (SettingsError, Exception) as exc:
        return common.report("token-broker serve", exc, "")


def _read_line(fd: int) -> bytes:
    """One line from `fd`, read unbuffered so nothing after it is taken from the pipe."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line


if __name__ == "__main__":
    sys.exit(main())
