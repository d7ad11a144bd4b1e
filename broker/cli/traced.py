"""A span for each CLI command that calls a broker, in the trace of whoever started it.

A CI runner that traces its pipeline passes its context to each step in the environment
(`TRACEPARENT`, `TRACESTATE`, `BAGGAGE`: OpenTelemetry's environment-variable carrier). With
spans exported (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...), the command records a span of its own
in that trace — service `token-broker-cli` — with a CLIENT span per call below it, which
the broker's SERVER span continues. Without an exporter there is no span of the CLI, but
the calls still carry the runner's context to the broker (`BrokerClient` joins it), so the
broker's spans land in the pipeline's trace either way.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry.trace import Span, SpanKind

from broker import __version__

CLI_SERVICE_NAME = "token-broker-cli"
EXIT_CODE = "process.exit.code"


@contextmanager
def command_span(args: argparse.Namespace, environ: Mapping[str, str]) -> Iterator[Span | None]:
    """The command's span while it runs (None when nothing is exported or the command calls
    no broker); its provider is flushed, for at most 2 s, when the command ends."""
    provider = None
    # Only the commands with connection flags; the SDK is imported only when configured.
    if hasattr(args, "target") and any(name.startswith("OTEL_") for name in environ):
        from broker.telemetry.setup import tracer_provider_from_env

        provider = tracer_provider_from_env(environ, CLI_SERVICE_NAME)
    if provider is None:
        yield None
        return
    from broker.telemetry.setup import Providers
    from tokenbroker import tracing

    args.tracer_provider = provider
    tracer = provider.get_tracer("broker.cli", __version__)
    try:
        with tracer.start_as_current_span(
            str(args.command),
            context=tracing.environment_context(environ),
            kind=SpanKind.INTERNAL,
        ) as span:
            yield span
    finally:
        Providers(tracer_provider=provider).shutdown()
