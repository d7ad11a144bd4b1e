"""A real `token-broker serve` process for the benchmark: SQLite default, loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT = 120.0  # a data dir holding 10^6 events opens in well under this


@dataclass
class BrokerProcess:
    process: subprocess.Popen[bytes]
    port: int
    issuer: str
    data_dir: Path
    log_path: Path
    # The processes that serve: the broker itself, or the workers of `serve --workers N`.
    serving_pids: tuple[int, ...] = ()

    @property
    def pids(self) -> list[int]:
        return list(self.serving_pids or (self.process.pid,))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_kib(self) -> dict[str, int]:
        """Resident memory now and at its peak (VmRSS, VmHWM), from /proc; {} elsewhere."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return {}
        found = {}
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
        return found

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start(
    data_dir: Path,
    policy: Path,
    log_path: Path,
    extra: tuple[str, ...] = (),
    *,
    source: Path | None = None,
) -> BrokerProcess:
    """Start a broker on `data_dir` and wait until it serves. `source`: run the broker of
    another checkout (an older commit, for a side-by-side baseline) with this interpreter;
    it is given only the flags every version knows."""
    limits = (
        ()
        if source is not None
        else (
            # The benchmark is one client driving the broker as hard as it can, with one
            # auditor holding many streams: the per-principal call rate and stream limits
            # would measure themselves, not the hot path.
            "--principal-rate",
            "0",
            "--audit-streams-per-principal",
            "1000",
        )
    )
    command = [
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--policy",
        str(policy),
        *limits,
        *extra,
    ]
    # JSON logs: the "serving" line gives the ports chosen for port 0 and the issuer.
    env = {**os.environ, "TOKEN_BROKER_LOG_FORMAT": "json"}
    if source is not None:
        # Before the installed package: that checkout's broker and client library.
        env["PYTHONPATH"] = os.pathsep.join([str(source), str(source / "clients")])
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: S603 (our own interpreter and flags)
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=source,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        serving = _serving_line(log_path)
        if serving is not None:
            return BrokerProcess(
                process,
                int(serving["port"]),
                serving["issuer"],
                data_dir,
                log_path,
                tuple(int(pid) for pid in serving.get("pids", ())),
            )
        if process.poll() is not None:
            raise RuntimeError(f"broker exited early:\n{log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"broker did not start in {START_TIMEOUT:g}s:\n{log_path.read_text()}")


def _serving_line(log_path: Path) -> dict[str, Any] | None:
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == "token-broker serving":
            return entry
    return None
