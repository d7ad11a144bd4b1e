"""Prometheus scraping of the broker's OpenTelemetry instruments.

A `PrometheusMetricReader` is one more reader on the same MeterProvider that pushes over
OTLP, so one set of instruments serves both. Its collector lives in a registry of its own
(not prometheus_client's process-wide one: two brokers in one process, as in tests, never
mix), and the HTTP port's `/metrics` renders it — the exporter's own HTTP server is never
started.
"""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

# The classic text format (0.0.4), which every Prometheus-compatible scraper reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class PrometheusScrape:
    """A metric reader for a MeterProvider, and the text a scrape of it answers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.reader = PrometheusMetricReader(registry=self.registry)

    content_type = CONTENT_TYPE

    def render(self) -> bytes:
        """Collect now (observable gauges are read at this moment) and render as text."""
        return generate_latest(self.registry, escaping="underscores")
