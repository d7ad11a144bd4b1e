"""Exporting: providers from the OTEL_* variables, and spans arriving at an OTLP receiver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import __version__
from broker.api.server import create_server
from broker.telemetry.setup import providers_from_env
from tests.accounts import root_channel
from tests.conftest import make_settings, standard_policy
from tests.otel_support import OtlpReceiver, otlp_attributes, start_otlp_receiver
from tests.support import start_broker_process, start_run_request
from tokenbroker.credentials import dev_admin_credentials, local_channel
from tokenbroker.defaults import SERVICE_NAME
from tokenbroker.v1 import broker_pb2_grpc

START_RUN = "tokenbroker.v1.TokenBrokerService/StartRun"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    running = start_otlp_receiver()
    yield running
    running.stop()


def test_no_exporter_is_configured_by_default(tmp_path: Path) -> None:
    providers = providers_from_env(make_settings(tmp_path), {})
    assert providers.tracer_provider is None
    assert providers.meter_provider is None


def test_console_flag_configures_spans_only(tmp_path: Path) -> None:
    providers = providers_from_env(make_settings(tmp_path, otel_console=True), {})
    try:
        assert providers.tracer_provider is not None
        assert providers.meter_provider is None
    finally:
        providers.shutdown()


def test_sdk_disabled_wins_over_an_endpoint(tmp_path: Path) -> None:
    environ = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    providers = providers_from_env(make_settings(tmp_path, otel_console=True), environ)
    assert providers.tracer_provider is None and providers.meter_provider is None


def test_spans_and_metrics_reach_the_otlp_endpoint_from_the_environment(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    settings = make_settings(tmp_path / "data", policy=standard_policy(tmp_path))
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    }
    providers = providers_from_env(settings, environ)
    server = create_server(
        settings,
        tracer_provider=providers.tracer_provider,
        meter_provider=providers.meter_provider,
    )
    server.start()
    try:
        with root_channel(server) as channel:
            run = broker_pb2_grpc.TokenBrokerServiceStub(channel).StartRun(
                start_run_request(), timeout=5
            )
    finally:
        server.stop(grace=0.5)
        providers.shutdown(timeout=10)  # flushes both exporters
    resource, span = receiver.wait_for_span(START_RUN)
    assert resource["service.name"] == SERVICE_NAME
    assert resource["service.version"] == __version__
    assert resource["deployment.environment"] == "test"
    attributes = otlp_attributes(span.attributes)
    assert attributes["cicd.pipeline.run.id"] == run.run.run_id
    assert attributes["rpc.method"] == "StartRun"
    assert {"rpc.server.call.duration", "tokenbroker.runs.started"} <= receiver.metric_names()


@pytest.mark.slow
def test_served_broker_exports_spans_to_the_configured_endpoint(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    broker = start_broker_process(
        tmp_path / "data",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_METRICS_EXPORTER": "none"},
    )
    try:
        credentials = dev_admin_credentials(tmp_path / "data")
        with local_channel(broker.target, credentials) as channel:
            run = broker_pb2_grpc.TokenBrokerServiceStub(channel).StartRun(
                start_run_request(), timeout=10
            )
    finally:
        assert broker.terminate_and_wait() == 0, broker.logs()
    # Shutdown flushed the batch: the span is there without waiting for the schedule.
    resource, span = receiver.wait_for_span(START_RUN, timeout=5)
    assert resource["service.name"] == SERVICE_NAME
    assert otlp_attributes(span.attributes)["cicd.pipeline.run.id"] == run.run.run_id
    assert not receiver.metric_names()
