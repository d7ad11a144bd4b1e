"""`/metrics`: the broker's OpenTelemetry instruments in the Prometheus text format, read
through the MeterProvider's Prometheus reader (`broker.telemetry.scrape`) — the instruments
that OTLP pushes, never a second set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api.http.routes import Request, Response, Routes

if TYPE_CHECKING:
    from broker.app import Broker

METRICS_PATH = "/metrics"
_OFF = "metrics are off (OTEL_SDK_DISABLED=true or OTEL_METRICS_EXPORTER=none)"


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    def metrics(request: Request) -> Response:
        scrape = broker.telemetry.scrape
        if scrape is None:
            return Response.json(404, {"error": _OFF})
        headers = (("Cache-Control", "no-store"),)
        return Response(200, scrape.render(), scrape.content_type, headers)

    routes.add("GET", METRICS_PATH, metrics)
