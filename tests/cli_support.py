"""Running `token-broker` in-process against live brokers, the way a shell would."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.api.server import BrokerServer, create_server
from broker.cli import main as cli
from tests.conftest import make_settings


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """`token-broker ARGS`: the exit code and what it printed. Whatever happens, stderr
    holds at most one line and never a traceback."""
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exited:  # argparse: --help, usage errors
        code = exited.code if isinstance(exited.code, int) else 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert len(err.splitlines()) <= 1, err
    if err:
        assert err.startswith("token-broker "), err
    return Result(code, out, err)


@contextmanager
def local_broker(data_dir: Path, **settings: object) -> Iterator[BrokerServer]:
    """A broker on a loopback port, in this process. Without `policy=...` it runs as
    `make run` does: a development policy and admin key written into `data_dir`."""
    running = create_server(make_settings(data_dir, **settings))
    running.start()
    try:
        yield running
    finally:
        running.stop(grace=0.5)


def point_at(monkeypatch: pytest.MonkeyPatch, server: BrokerServer) -> None:
    """Make `server` the broker the CLI talks to, through the environment."""
    monkeypatch.setenv("TOKEN_BROKER_TARGET", server.target)
    monkeypatch.setenv("TOKEN_BROKER_DATA_DIR", str(server.broker.settings.data_dir))


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
