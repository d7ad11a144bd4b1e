from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.server import BrokerServer, create_server
from broker.app import build_broker
from broker.bench.pgcluster import Cluster, create_database, running_cluster
from broker.settings import Settings
from tests.accounts import Callers, callers_of, standard_accounts, write_policy
from tests.otel_support import InMemorySdk, in_memory_sdk
from tests.support import ShiftedClock
from tokenbroker.defaults import SERVICE_NAME
from tokenbroker.samples.idp import TestIdentityProvider
from tokenbroker.v1 import broker_pb2_grpc

IDP_ISSUER = "https://idp.example.com"


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


def standard_policy(directory: Path) -> Path:
    """A policy file with the standard test accounts (see tests/accounts.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_policy(directory / "policy.toml", standard_accounts().values())


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest) -> str:
    """One URL per backend; a new backend adds its URL here and passes the same suites.
    PostgreSQL: a fresh database on the session's throw-away server."""
    if store_kind == "postgresql":
        return str(request.getfixturevalue("pg_dsn"))
    return f"{store_kind}:"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throw-away PostgreSQL server for the whole run (fails loudly if it cannot start)."""
    with running_cluster() as cluster:
        yield cluster


_databases = itertools.count(1)


@pytest.fixture
def pg_dsn(pg_cluster: Cluster) -> str:
    """A fresh, empty database on the throw-away server."""
    return create_database(pg_cluster, f"t{next(_databases)}")


@pytest.fixture
def clock() -> ShiftedClock:
    """The clock of the `server` fixture's broker: the wall clock until the test moves it
    (`clock.advance(seconds)`) past a deadline or lease; `tests.support.reap` then expires
    what is due, as the reaper would."""
    return ShiftedClock()


@pytest.fixture
def server(tmp_path: Path, clock: ShiftedClock) -> Iterator[BrokerServer]:
    """A broker on the SQLite default, on a loopback port, in this process, on `clock`.

    Its policy knows the standard accounts: ci-orchestrator, deploy-portal (delegator) and
    siem (auditor), each scoped to "acme/*/*"; ops-admin (admin); root (every role, "*/*/*").
    """
    settings = make_settings(tmp_path / "data", policy=standard_policy(tmp_path))
    running = create_server(settings, broker=build_broker(settings, clock=clock))
    running.start()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def channel(server: BrokerServer) -> Iterator[grpc.Channel]:
    """A plaintext channel with no credential (reflection, health, anonymous calls)."""
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def callers(server: BrokerServer) -> Iterator[Callers]:
    """Make a stub for any account: `callers.stub(account)`."""
    with callers_of(server) as made:
        yield made


@pytest.fixture
def stub(callers: Callers) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub calling as an orchestrator whose scope covers the org "acme"."""
    return callers.stub(standard_accounts()["orchestrator"])


@pytest.fixture
def delegator_stub(callers: Callers) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub calling as deploy-portal, a delegator scoped to "acme/*/*"."""
    return callers.stub(standard_accounts()["delegator"])


@pytest.fixture
def auditor_stub(callers: Callers) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub calling as siem, an auditor scoped to "acme/*/*"."""
    return callers.stub(standard_accounts()["auditor"])


@pytest.fixture
def admin_stub(callers: Callers) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub calling as ops-admin (role admin)."""
    return callers.stub(standard_accounts()["admin"])


@pytest.fixture
def root_stub(callers: Callers) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub calling as root: every role, every org."""
    return callers.stub(standard_accounts()["root"])


@pytest.fixture
def anonymous_stub(channel: grpc.Channel) -> broker_pb2_grpc.TokenBrokerServiceStub:
    """A stub presenting no credential at all."""
    return broker_pb2_grpc.TokenBrokerServiceStub(channel)


@pytest.fixture
def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerServer]:
    """A broker as `make run` starts one (a development policy and admin key written into its
    data dir), which the CLI under test talks to: TOKEN_BROKER_TARGET and
    TOKEN_BROKER_DATA_DIR point at it."""
    running = create_server(make_settings(tmp_path / "data"))
    running.start()
    monkeypatch.setenv("TOKEN_BROKER_TARGET", running.target)
    monkeypatch.setenv("TOKEN_BROKER_DATA_DIR", str(running.broker.settings.data_dir))
    yield running
    running.stop(grace=0.5)


@pytest.fixture(scope="module")
def idp() -> TestIdentityProvider:
    """A test OIDC identity provider, https://idp.example.com, that signs people's ID tokens."""
    return TestIdentityProvider(IDP_ISSUER)


@pytest.fixture
def broker_sdk() -> Iterator[InMemorySdk]:
    """An OpenTelemetry SDK recording in memory what the `traced` broker exports."""
    recorded = in_memory_sdk(SERVICE_NAME)
    yield recorded
    recorded.shutdown()


@pytest.fixture
def traced(tmp_path: Path, broker_sdk: InMemorySdk, clock: ShiftedClock) -> Iterator[BrokerServer]:
    """The `server` fixture's broker, its spans and metrics recorded in `broker_sdk`."""
    settings = make_settings(tmp_path / "data", policy=standard_policy(tmp_path))
    broker = build_broker(
        settings,
        clock=clock,
        tracer_provider=broker_sdk.tracer_provider,
        meter_provider=broker_sdk.meter_provider,
    )
    running = create_server(settings, broker=broker)
    running.start()
    yield running
    running.stop(grace=0.5)
