"""OTLP over gRPC and over HTTP, logs over OTLP, and a collector that takes traces only: a
real `token-broker serve` process against test receivers on 127.0.0.1 port 0."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.telemetry.setup import GRPC, HTTP, Otlp, otlp_config
from tests.otel_support import (
    OtlpReceiver,
    otlp_attributes,
    start_http_otlp_receiver,
    start_otlp_receiver,
)
from tests.support import BrokerProcess, start_broker_process, start_run_request
from tokenbroker.credentials import dev_admin_credentials, local_channel
from tokenbroker.defaults import SERVICE_NAME
from tokenbroker.v1 import broker_pb2_grpc

START_RUN = "tokenbroker.v1.TokenBrokerService/StartRun"
RECEIVERS: dict[str, Callable[..., OtlpReceiver]] = {
    GRPC: start_otlp_receiver,
    HTTP: start_http_otlp_receiver,
}
METRICS_REFUSED = "metrics could not be exported"


def start_run(broker: BrokerProcess) -> str:
    credentials = dev_admin_credentials(broker.data_dir)
    with local_channel(broker.target, credentials) as channel:
        stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
        return stub.StartRun(start_run_request(), timeout=10).run.run_id


def log_entries(broker: BrokerProcess) -> list[dict[str, object]]:
    entries = []
    for line in broker.logs().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            entries.append({"msg": line, "level": "unparsed"})
    return entries


@pytest.fixture
def stopping() -> Iterator[list[Callable[[], None]]]:
    """Things to stop at the end, in reverse order, whatever happened."""
    stops: list[Callable[[], None]] = []
    yield stops
    for stop in reversed(stops):
        stop()


def serve(tmp_path: Path, env: dict[str, str], stopping: list[Callable[[], None]]) -> BrokerProcess:
    broker = start_broker_process(tmp_path / "data", env=env)

    def stop() -> None:
        if broker.process.poll() is None:
            broker.terminate_and_wait()

    stopping.append(stop)
    return broker


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_spans_metrics_and_logs_reach_a_collector_over_the_configured_protocol(
    tmp_path: Path, protocol: str, stopping: list[Callable[[], None]]
) -> None:
    receiver = RECEIVERS[protocol]()
    stopping.append(receiver.stop)
    broker = serve(
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_LOGS_EXPORTER": "otlp",
        },
        stopping,
    )

    run_id = start_run(broker)
    assert broker.terminate_and_wait() == 0, broker.logs()

    # Shutdown flushed every signal: nothing is waited for on a schedule.
    resource, span = receiver.wait_for_span(START_RUN, timeout=5)
    assert resource["service.name"] == SERVICE_NAME
    assert otlp_attributes(span.attributes)["cicd.pipeline.run.id"] == run_id
    assert "tokenbroker.runs.started" in receiver.metric_names()
    log_resource, serving = receiver.wait_for_log("token-broker serving", timeout=5)
    assert log_resource["service.name"] == SERVICE_NAME
    assert serving.severity_text == "INFO"
    assert otlp_attributes(serving.attributes)["port"] == broker.port
    receiver.wait_for_log("token-broker stopped", timeout=5)


@pytest.mark.slow
def test_logs_are_not_exported_unless_otel_logs_exporter_says_otlp(
    tmp_path: Path, stopping: list[Callable[[], None]]
) -> None:
    receiver = start_otlp_receiver()
    stopping.append(receiver.stop)
    broker = serve(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}, stopping)

    start_run(broker)
    assert broker.terminate_and_wait() == 0, broker.logs()

    receiver.wait_for_span(START_RUN, timeout=5)
    assert receiver.log_records() == []


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_a_traces_only_collector_gets_one_warning_about_metrics_then_quiet(
    tmp_path: Path, protocol: str, stopping: list[Callable[[], None]]
) -> None:
    receiver = RECEIVERS[protocol](accept_metrics=False)
    stopping.append(receiver.stop)
    broker = serve(
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_METRIC_EXPORT_INTERVAL": "50",  # milliseconds: many refusals quickly
        },
        stopping,
    )

    run_id = start_run(broker)
    receiver.wait_for_refused_metrics(5, timeout=60)
    assert broker.terminate_and_wait() == 0, broker.logs()

    _, span = receiver.wait_for_span(START_RUN, timeout=5)  # traces are unaffected
    assert otlp_attributes(span.attributes)["cicd.pipeline.run.id"] == run_id
    entries = log_entries(broker)
    warnings = [e for e in entries if str(e["msg"]).startswith(METRICS_REFUSED)]
    assert len(warnings) == 1, broker.logs()
    assert warnings[0]["level"] == "warning"
    path = "/v1/metrics" if protocol == HTTP else ""
    assert warnings[0]["endpoint"] == receiver.endpoint + path
    reason = str(warnings[0]["reason"])
    assert ("UNIMPLEMENTED" in reason) if protocol == GRPC else ("404" in reason), reason
    others = [e for e in entries if e not in warnings]
    noisy = [e for e in others if e["level"] in ("error", "unparsed") or "otlp" in str(e)]
    assert noisy == [], broker.logs()


# --- which exporter the variables choose ----------------------------------------------------------


def test_http_protocol_posts_each_signal_below_the_shared_endpoint() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20x,tenant=acme",
    }
    headers = {"authorization": "Bearer x", "tenant": "acme"}
    assert otlp_config(environ, "TRACES") == Otlp(
        HTTP, "http://collector:4318/v1/traces", headers, insecure=True
    )
    assert otlp_config(environ, "METRICS") == Otlp(
        HTTP, "http://collector:4318/v1/metrics", headers, insecure=True
    )


def test_a_signals_own_endpoint_and_protocol_win_over_the_shared_ones() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://metrics.example/otlp/v1/metrics",
    }
    assert otlp_config(environ, "TRACES") == Otlp(GRPC, "https://collector:4317", {}, False)
    metrics = otlp_config(environ, "METRICS")
    assert metrics is not None
    assert (metrics.protocol, metrics.endpoint) == (HTTP, "https://metrics.example/otlp/v1/metrics")


def test_logs_asked_for_without_an_endpoint_go_to_the_default_collector() -> None:
    assert otlp_config({}, "LOGS") is None
    logs = otlp_config({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "LOGS", required=True)
    assert logs is not None and logs.endpoint == "http://localhost:4318/v1/logs"


def test_an_unsupported_protocol_exports_nothing_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
    }
    with caplog.at_level(logging.WARNING):
        assert otlp_config(environ, "TRACES") is None
    assert [r.getMessage() for r in caplog.records] == [
        "unsupported OTLP protocol: this signal is not exported"
    ]
