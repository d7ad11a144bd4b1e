"""`/metrics` on a real `token-broker serve` process: after some calls, a Prometheus scrape
parses and counts them — through the same OpenTelemetry instruments that OTLP pushes — with
latency buckets that fit the broker's sub-millisecond to ~100 ms calls."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from broker.telemetry.setup import LATENCY_BUCKETS
from tests.support import start_broker_process, start_run_request
from tokenbroker.credentials import dev_admin_credentials, local_channel
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

pytestmark = pytest.mark.slow

AUDIENCE = "api.example.com"


def scrape(url: str) -> tuple[str, dict[str, list[Sample]]]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    families = {family.name: family.samples for family in text_string_to_metric_families(text)}
    return content_type, families


def only(samples: list[Sample], name: str, **labels: str) -> float:
    matching = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) == 1, (name, labels, samples)
    return matching[0]


def test_a_scrape_after_calls_counts_them_with_latency_buckets_that_fit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process = start_broker_process(data)
    try:
        with local_channel(process.target, dev_admin_credentials(data)) as channel:
            stub = broker_pb2_grpc.TokenBrokerServiceStub(channel)
            run_id = stub.StartRun(start_run_request(), timeout=10).run.run_id
            for _ in range(3):
                token = stub.IssueToken(
                    broker_pb2.IssueTokenRequest(run_id=run_id, audience=AUDIENCE), timeout=10
                ).token
                stub.VerifyToken(broker_pb2.VerifyTokenRequest(token=token), timeout=10)
            stub.VerifyToken(broker_pb2.VerifyTokenRequest(token="not.a.token"), timeout=10)
        content_type, families = scrape(process.http_url)
    finally:
        assert process.terminate_and_wait() == 0
    assert content_type.startswith("text/plain; version=0.0.4")
    issued = families["tokenbroker_tokens_issued"]
    assert only(issued, "tokenbroker_tokens_issued_total", tokenbroker_token_audience=AUDIENCE) == 3
    verifications = families["tokenbroker_tokens_verifications"]
    results = {
        s.labels["tokenbroker_verification_result"]: s.value
        for s in verifications
        if s.name.endswith("_total")
    }
    assert results["active"] == 3
    assert sum(results.values()) == 4
    assert only(families["tokenbroker_runs_active"], "tokenbroker_runs_active") == 1

    durations = families["rpc_server_call_duration_seconds"]
    issue_buckets = [
        s
        for s in durations
        if s.name.endswith("_bucket") and s.labels.get("rpc_method") == "IssueToken"
    ]
    bounds = [float(s.labels["le"]) for s in issue_buckets]
    assert bounds == [*LATENCY_BUCKETS, float("inf")]
    assert issue_buckets[-1].value == 3  # cumulative: every IssueToken in +Inf
    assert only(durations, "rpc_server_call_duration_seconds_count", rpc_method="IssueToken") == 3


def test_metrics_are_off_with_otel_metrics_exporter_none(tmp_path: Path) -> None:
    process = start_broker_process(tmp_path / "data", env={"OTEL_METRICS_EXPORTER": "none"})
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(process.http_url)
        assert refused.value.code == 404
        refused.value.close()
    finally:
        assert process.terminate_and_wait() == 0


def test_a_single_process_scrape_carries_no_worker_label_nor_worker_gauges(
    tmp_path: Path,
) -> None:
    process = start_broker_process(tmp_path / "data")
    try:
        _, families = scrape(process.http_url)
    finally:
        assert process.terminate_and_wait() == 0
    assert "tokenbroker_runs_active" in families
    assert not [s for samples in families.values() for s in samples if "worker" in s.labels]
    assert not [name for name in families if name.startswith("tokenbroker_worker")]
