from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.settings import Settings
from tokenbroker.v1 import broker_pb2_grpc


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "http_listen": "",
        "data_dir": data_dir,
        "reap_interval": 0.1,
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "memory"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BrokerServer]:
    """A broker on the SQLite default, on a loopback port, in this process."""
    running = create_server(make_settings(tmp_path / "data"))
    running.start()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def channel(server: BrokerServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub calling as an orchestrator whose scope covers the org "acme"."""
    return broker_pb2_grpc.TokenBrokerServiceStub(channel)


@pytest.fixture
def anonymous_stub(channel: grpc.Channel) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub presenting no credential at all."""
    return broker_pb2_grpc.TokenBrokerServiceStub(channel)
