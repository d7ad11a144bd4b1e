"""Structured logs: one JSON object per line (or readable text), with any `extra=` fields.

Never pass a token, credential or key to a log call; log its id (jti, kid) or a hash.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry._logs import LoggerProvider, SeverityNumber

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TraceContext(logging.Filter):
    """Stamp `trace_id` and `span_id` of the span active where the line is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = trace.format_trace_id(span_context.trace_id)
            record.span_id = trace.format_span_id(span_context.span_id)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}" + (
            f"  {extras}" if extras else ""
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class Stamp(logging.Filter):
    """Stamp fixed fields on every line (e.g. which worker process of `serve --workers`)."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        super().__init__()
        self._fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self._fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def configure(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    fields: Mapping[str, object] | None = None,
) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TraceContext())
    if fields:
        handler.addFilter(Stamp(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


_SEVERITY = (
    (logging.CRITICAL, SeverityNumber.FATAL, "FATAL"),
    (logging.ERROR, SeverityNumber.ERROR, "ERROR"),
    (logging.WARNING, SeverityNumber.WARN, "WARN"),
    (logging.INFO, SeverityNumber.INFO, "INFO"),
    (logging.DEBUG, SeverityNumber.DEBUG, "DEBUG"),
)


def _severity(levelno: int) -> tuple[SeverityNumber, str]:
    for level, number, text in _SEVERITY:
        if levelno >= level:
            return number, text
    return SeverityNumber.TRACE, "TRACE"


def _attribute(value: Any) -> str | bool | int | float:
    return value if isinstance(value, str | bool | int | float) else str(value)


class OpenTelemetryHandler(logging.Handler):
    """Sends each log line to an OpenTelemetry LoggerProvider (OTLP with
    OTEL_LOGS_EXPORTER=otlp): the message as body, the `extra=` fields as attributes, in the
    context of the span current where it was logged.

    Lines of OpenTelemetry's own loggers stay local: an exporter that cannot reach its
    collector must not feed its complaints back into the export.
    """

    def __init__(self, provider: LoggerProvider) -> None:
        super().__init__()
        self._provider = provider

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("opentelemetry"):
            return
        try:
            number, text = _severity(record.levelno)
            attributes = {key: _attribute(value) for key, value in _extras(record).items()}
            if record.exc_info and record.exc_info[0] is not None:
                attributes["exception.type"] = record.exc_info[0].__name__
                attributes["exception.stacktrace"] = logging.Formatter().formatException(
                    record.exc_info
                )
            self._provider.get_logger(record.name).emit(
                timestamp=int(record.created * 1e9),
                context=context_api.get_current(),
                severity_number=number,
                severity_text=text,
                body=record.getMessage(),
                attributes=attributes,
            )
        except Exception:  # telemetry never breaks logging
            self.handleError(record)


def export_to(provider: LoggerProvider) -> Callable[[], None]:
    """Send the root logger's lines to `provider` as well; returns what undoes it."""
    handler = OpenTelemetryHandler(provider)
    root = logging.getLogger()
    root.addHandler(handler)
    return lambda: root.removeHandler(handler)
