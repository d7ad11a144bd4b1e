"""Helpers shared by tests: real broker processes and servers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from tokenbroker.v1 import broker_pb2, types_pb2

REPO = Path(__file__).resolve().parent.parent
# A well-formed run id that no broker ever issued (ids are checked for their format first).
UNKNOWN_RUN_ID = "r-" + "0" * 26


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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "token-broker serving":
                return BrokerProcess(process, int(entry["port"]), log_path, data_dir)
        if process.poll() is not None:
            raise RuntimeError(f"broker exited early:\n{log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"broker did not start:\n{log_path.read_text()}")


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
