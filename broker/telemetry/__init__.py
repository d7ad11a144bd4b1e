"""Telemetry: what the domain reports (observer, a Protocol with a no-op default), its
OpenTelemetry implementation and the exporters set up from `OTEL_*` (otel), the broker's
metrics (metrics) and structured logs (logs).

May import: the shared value modules, `broker.runs.model`, `broker.settings` and
`broker.store`. Never `grpc`, `broker.api` or `broker.cli`.
"""
