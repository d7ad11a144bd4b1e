"""`/metrics`: the broker's OpenTelemetry instruments in the Prometheus text format, read
through the MeterProvider's Prometheus reader (`broker.telemetry.scrape`) — the instruments
that OTLP pushes, never a second set.

Under `serve --workers N`, worker 0's `/metrics` answers for every worker
(`register_every_worker`, `broker.api.http.workermetrics`); each other worker serves its own
`register` route alone on a private loopback port for worker 0 to fetch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api.http.routes import Handler, Request, Response, Routes

if TYPE_CHECKING:
    from broker.api.http.workermetrics import WorkerScrape
    from broker.app import Broker

METRICS_PATH = "/metrics"
_OFF = "metrics are off (OTEL_SDK_DISABLED=true or OTEL_METRICS_EXPORTER=none)"
_NO_STORE = (("Cache-Control", "no-store"),)


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    routes.add("GET", METRICS_PATH, _handler(broker, None))


def register_every_worker(routes: Routes, broker: Broker, workers: WorkerScrape) -> None:
    """`/metrics` for worker 0 of `serve --workers`: its own and every other worker's."""
    routes.add("GET", METRICS_PATH, _handler(broker, workers))


def _handler(broker: Broker, workers: WorkerScrape | None) -> Handler:
    def metrics(request: Request) -> Response:
        scrape = broker.telemetry.scrape
        if scrape is None:
            return Response.json(404, {"error": _OFF})
        body = scrape.render() if workers is None else workers.render(scrape.render)
        return Response(200, body, scrape.content_type, _NO_STORE)

    return metrics
