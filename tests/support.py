"""Helpers shared by tests: real broker processes and servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from broker.api.server import BrokerServer
from broker.context import CallContext
from broker.identity import BROKER
from tokenbroker.v1 import broker_pb2, types_pb2

REPO = Path(__file__).resolve().parent.parent
# A well-formed run id that no broker ever issued (ids are checked for their format first).
UNKNOWN_RUN_ID = "r-" + "0" * 26

T = TypeVar("T")


def eventually(
    condition: Callable[[], T | None],
    *,
    within: float = 10.0,
    interval: float = 0.01,
    what: str = "",
) -> T:
    """Poll `condition` until it returns something truthy, and return that.

    For real asynchrony only: another thread, a stream, a subprocess. Broker time never
    needs waiting for: move the broker's clock (the `clock` fixture) instead. Fails after
    `within` seconds naming `what` was awaited and the last value seen.
    """
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {within}s: {what or condition}; last: {value!r}")
        time.sleep(interval)


def reached(condition: Callable[[], object], *, within: float, interval: float = 0.05) -> bool:
    """`eventually` for callers that report rather than fail: whether `condition` became
    true within `within` seconds (checked once more at the end)."""
    try:
        eventually(condition, within=within, interval=interval)
    except AssertionError:
        return bool(condition())
    return True


def hold_load(seconds: float) -> None:
    """Let real concurrent work (load threads, subprocesses) run for `seconds`.

    Not a wait for a condition, and never for broker time (move the broker's clock for
    that): fault and soak suites put a broker under load for a while before they act."""
    time.sleep(seconds)


async def eventually_async(
    condition: Callable[[], T | None],
    *,
    within: float = 10.0,
    interval: float = 0.01,
    what: str = "",
) -> T:
    """`eventually` inside an event loop: polls without blocking the loop."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {within}s: {what or condition}; last: {value!r}")
        await asyncio.sleep(interval)


class FakeClock:
    """A clock that stands still until the test moves it (`now` may be set directly)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ShiftedClock:
    """The wall clock, shifted forward by however far the test has advanced it.

    A broker on this clock behaves as on the real one (its tokens and callers' assertions,
    checked against the wall clock, stay valid), and a test passes a run's deadline or lease
    with `advance` instead of sleeping. Token signatures and times are checked against the
    wall clock with 30 s of leeway, callers' assertions live 5 minutes: shift less than that.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class BrokerProcess:
    """A `token-broker serve` subprocess on a free loopback port."""

    process: subprocess.Popen[str]
    port: int
    log_path: Path
    data_dir: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text()

    @property
    def http_url(self) -> str:
        """The HTTP port's base URL (discovery, OAuth endpoints), from the serving log line."""
        for line in self.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "token-broker serving" and entry.get("http_port"):
                return f"http://127.0.0.1:{entry['http_port']}"
        raise AssertionError("the broker serves no HTTP port")

    def terminate_and_wait(self, timeout: float = 10) -> int:
        self.process.terminate()
        return self.process.wait(timeout)


def start_broker_process(
    data_dir: Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> BrokerProcess:
    """`log_dir`: where the log goes (default beside the data dir, e.g. not on a full disk)."""
    log_path = (log_dir or data_dir.parent) / f"broker-{time.monotonic_ns()}.log"
    with log_path.open("w") as log_file:  # the child keeps its own copy of the descriptor
        process = _popen(data_dir, log_file, extra_args, env)

    def serving_port() -> int | None:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited early:\n{log_path.read_text()}")
        return _logged_port(log_path)

    try:
        port = eventually(serving_port, within=30, interval=0.05, what="the broker serving")
    except AssertionError:
        process.kill()
        raise RuntimeError(f"broker did not start:\n{log_path.read_text()}") from None
    return BrokerProcess(process, port, log_path, data_dir)


def _logged_port(log_path: Path) -> int | None:
    """The port of the "token-broker serving" log line, once written."""
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "token-broker serving":
            return int(entry["port"])
    return None


def _popen(
    data_dir: Path, log_file: TextIO, extra_args: Sequence[str], env: dict[str, str] | None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
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
            *extra_args,
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def pipeline(
    org: str = "acme", project: str = "payments", name: str = "deploy"
) -> types_pb2.PipelineRef:
    return types_pb2.PipelineRef(org=org, project=project, pipeline=name)


def perms(**levels: str) -> list[types_pb2.Permission]:
    return [types_pb2.Permission(resource=r, level=lvl) for r, lvl in levels.items()]


def start_run_request(**overrides: object) -> broker_pb2.StartRunRequest:
    request = broker_pb2.StartRunRequest(
        pipeline=pipeline(), permission_ceiling=perms(pipelines="execute", artifacts="write")
    )
    for key, value in overrides.items():
        if isinstance(value, Message):
            getattr(request, key).CopyFrom(value)
        else:
            setattr(request, key, value)
    return request


def rpc_error(call: object) -> grpc.RpcError:
    """The RpcError a callable raises (fails the test if it does not)."""
    assert callable(call)
    try:
        call()
    except grpc.RpcError as error:
        return error
    raise AssertionError("expected the call to fail")


def details(error: grpc.RpcError) -> str:
    """The status message of a failed call."""
    return error.details() or ""


def as_dict(struct: Struct) -> dict[str, Any]:
    """A google.protobuf.Struct (claims, audit details) as plain Python values."""
    return json_format.MessageToDict(struct)


def reap(server: BrokerServer) -> None:
    """One expiry pass, as the broker's reaper makes every `reap_interval`: every run past
    its deadline or lease (by the broker's clock) is expired now."""
    server.broker.runs.expire_due(CallContext(principal=BROKER))
