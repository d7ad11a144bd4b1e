"""The per-call counters (tokens issued, verifications) are tallied as integers and reported
at collection: still monotonic sums by the same labels, exact under concurrent calls, and
cumulative across collections like the counters they replaced."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics.export import Sum

from broker.telemetry.otel import Telemetry
from tests.otel_support import InMemorySdk, in_memory_sdk

AUDIENCE = "tokenbroker.token.audience"
OUTCOME = "tokenbroker.token.outcome"
RESULT = "tokenbroker.verification.result"


@pytest.fixture
def sdk() -> Iterator[InMemorySdk]:
    sdk = in_memory_sdk("tallied")
    yield sdk
    sdk.shutdown()


def sum_of(sdk: InMemorySdk, metric: str) -> Sum:
    data = sdk.reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for found in scope.metrics:
                if found.name == metric:
                    assert isinstance(found.data, Sum)
                    return found.data
    raise AssertionError(f"{metric} was not collected")


def test_tokens_issued_is_still_a_monotonic_sum_by_audience_and_outcome(
    sdk: InMemorySdk,
) -> None:
    telemetry = Telemetry(meter_provider=sdk.meter_provider)
    telemetry.token_issued("payments-api", "issued")
    telemetry.token_issued("payments-api", "issued")
    telemetry.token_issued("ledger-api", "refused")
    issued = sum_of(sdk, "tokenbroker.tokens.issued")
    assert issued.is_monotonic
    points = {
        (p.attributes[AUDIENCE], p.attributes[OUTCOME]): p.value
        for p in issued.data_points
        if p.attributes is not None
    }
    assert points == {("payments-api", "issued"): 2, ("ledger-api", "refused"): 1}


def test_counts_from_concurrent_calls_are_exact_and_cumulative_across_collections(
    sdk: InMemorySdk,
) -> None:
    telemetry = Telemetry(meter_provider=sdk.meter_provider)
    threads, calls = 8, 500

    def call() -> None:
        for _ in range(calls):
            telemetry.token_issued("payments-api", "issued")
            telemetry.token_verified("valid")

    def run_all() -> None:
        workers = [threading.Thread(target=call) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    run_all()
    assert sdk.total("tokenbroker.tokens.issued") == threads * calls
    run_all()
    # A second collection reports the running total, not what came since the first.
    assert sdk.total("tokenbroker.tokens.issued", **{OUTCOME: "issued"}) == 2 * threads * calls
    assert sdk.total("tokenbroker.tokens.verifications", **{RESULT: "valid"}) == 2 * threads * calls


def test_audiences_beyond_the_bound_are_counted_as_other(sdk: InMemorySdk) -> None:
    telemetry = Telemetry(meter_provider=sdk.meter_provider, max_audiences=1)
    telemetry.token_issued("first-api", "issued")
    telemetry.token_issued("second-api", "issued")
    telemetry.token_issued("third-api", "issued")
    assert sdk.total("tokenbroker.tokens.issued", **{AUDIENCE: "first-api"}) == 1
    assert sdk.total("tokenbroker.tokens.issued", **{AUDIENCE: "other"}) == 2
