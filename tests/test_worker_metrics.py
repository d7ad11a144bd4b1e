"""Worker 0's `/metrics` under `serve --workers`: every worker's exposition merged into one
valid exposition, each sample labelled with its worker; a worker that does not answer, answers
too much or answers nonsense is left out within the bound and counted, never fails the scrape.
(tests/test_workers.py drives the same through a real `serve --workers 2`.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from broker.api.http import HttpServer, Request, Response, Routes
from broker.api.http.workermetrics import (
    EXPECTED,
    SCRAPED,
    WORKER_SCRAPED,
    Peer,
    WorkerScrape,
    merge,
)
from broker.api.workers import pick_loopback_ports

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition(issued: int, calls: int) -> bytes:
    """What one worker's Prometheus reader renders, in small."""
    return f"""# HELP tokenbroker_tokens_issued_total Tokens issued
# TYPE tokenbroker_tokens_issued_total counter
tokenbroker_tokens_issued_total{{tokenbroker_token_audience="api"}} {issued}.0
# HELP rpc_server_call_duration_seconds Duration of calls
# TYPE rpc_server_call_duration_seconds histogram
rpc_server_call_duration_seconds_bucket{{rpc_method="IssueToken",le="0.001"}} {calls}.0
rpc_server_call_duration_seconds_bucket{{rpc_method="IssueToken",le="+Inf"}} {calls}.0
rpc_server_call_duration_seconds_count{{rpc_method="IssueToken"}} {calls}.0
rpc_server_call_duration_seconds_sum{{rpc_method="IssueToken"}} 0.0005
# HELP tokenbroker_runs_active Active runs
# TYPE tokenbroker_runs_active gauge
tokenbroker_runs_active 1.0
""".encode()


def families_of(text: bytes) -> dict[str, list[Sample]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    matching = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matching) == 1, (name, labels, samples)
    return matching[0]


def test_merged_expositions_name_each_family_once_with_every_workers_samples_labelled() -> None:
    merged = merge([(0, exposition(3, 4)), (1, exposition(5, 6))], [0, 1])

    lines = merged.decode().splitlines()
    types = [line for line in lines if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert types.count("# TYPE tokenbroker_tokens_issued_total counter") == 1
    families = families_of(merged)
    issued = families["tokenbroker_tokens_issued"]
    name = "tokenbroker_tokens_issued_total"
    assert value(issued, name, tokenbroker_token_audience="api", worker="0") == 3
    assert value(issued, name, tokenbroker_token_audience="api", worker="1") == 5
    durations = families["rpc_server_call_duration_seconds"]
    count = "rpc_server_call_duration_seconds_count"
    assert value(durations, count, rpc_method="IssueToken", worker="0") == 4
    assert value(durations, count, rpc_method="IssueToken", worker="1") == 6
    assert value(families["tokenbroker_runs_active"], "tokenbroker_runs_active", worker="1") == 1
    assert value(families[EXPECTED], EXPECTED) == 2
    assert value(families[SCRAPED], SCRAPED) == 2


def test_an_exposition_that_does_not_parse_is_left_out_and_counted() -> None:
    merged = merge([(0, exposition(3, 4)), (1, b"this is { not an exposition\n")], [0, 1])

    families = families_of(merged)
    assert {s.labels["worker"] for s in families["tokenbroker_tokens_issued"]} == {"0"}
    assert value(families[SCRAPED], SCRAPED) == 1
    assert value(families[WORKER_SCRAPED], WORKER_SCRAPED, worker="0") == 1
    assert value(families[WORKER_SCRAPED], WORKER_SCRAPED, worker="1") == 0


def serving(body: bytes) -> HttpServer:
    def metrics(request: Request) -> Response:
        return Response(200, body, CONTENT_TYPE)

    routes = Routes()
    routes.add("GET", "/metrics", metrics)
    server = HttpServer("127.0.0.1", 0)
    server.mount(routes)
    server.start()
    return server


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers: a hung worker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A port nobody listens on: a worker between its death and its restart."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_scrape_holds_answering_workers_and_counts_hung_gone_and_oversized_ones_out(
    hung_port: int, closed_port: int
) -> None:
    answering = serving(exposition(5, 6))
    oversized = serving(exposition(7, 8) + b"# padding\n" * 2000)
    try:
        peers = [
            Peer(1, answering.port),
            Peer(2, hung_port),
            Peer(3, closed_port),
            Peer(4, oversized.port),
        ]
        scrape = WorkerScrape(peers, max_bytes=4096)  # the hung one costs FETCH_TIMEOUT
        merged = scrape.render(lambda: exposition(3, 4))
    finally:
        answering.stop()
        oversized.stop()

    families = families_of(merged)
    issued = families["tokenbroker_tokens_issued"]
    assert {s.labels["worker"]: s.value for s in issued} == {"0": 3, "1": 5}
    assert value(families[EXPECTED], EXPECTED) == 5
    assert value(families[SCRAPED], SCRAPED) == 2
    each = {s.labels["worker"]: s.value for s in families[WORKER_SCRAPED]}
    assert each == {"0": 1, "1": 1, "2": 0, "3": 0, "4": 0}


def test_more_peers_than_there_can_be_workers_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 64"):
        WorkerScrape([Peer(index, 1) for index in range(1, 66)])


def test_the_supervisor_picks_distinct_loopback_ports_that_workers_can_bind() -> None:
    ports = pick_loopback_ports(8, set())
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
