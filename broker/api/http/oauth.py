"""What the OAuth endpoints (exchange, introspection) share: a strictly parsed, bounded form,
the call's request id, trace and caller — authenticated and rate-limited exactly as a gRPC
call is (`broker.api.credentials.admitted`) — and one way to answer: JSON, `no-store`, and
every refusal through the one error mapping (`broker.api.oauth_status`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker import limits
from broker.api.credentials import admitted
from broker.api.http.routes import MAX_FORM_FIELDS, Request, Response
from broker.api.oauth_status import (
    Endpoint,
    OAuthError,
    invalid_request,
    oauth_error_for,
    server_error,
)
from broker.auth.authn import Presented
from broker.context import CallContext
from broker.errors import BrokerError, FieldViolation, InvalidArgument
from broker.ids import new_request_id
from broker.settings import Settings, is_loopback
from broker.telemetry import otel as telemetry

if TYPE_CHECKING:
    from broker.app import Broker

log = logging.getLogger(__name__)

FORM_TYPE = "application/x-www-form-urlencoded"
# A form of an OAuth request has a handful of parameters; none is longer than a token.
MAX_FIELDS = MAX_FORM_FIELDS
MAX_VALUE_CHARS = limits.TOKEN.max_chars
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# RFC 6749 §5.1: responses carrying tokens (or saying anything about them) are never cached.
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
_PROPAGATOR = TraceContextTextMapPropagator()


class Refusal(Exception):
    """An OAuth error decided by the endpoint itself (not by the domain)."""

    def __init__(self, error: OAuthError) -> None:
        super().__init__(error.description)
        self.error = error


@dataclass
class OAuthCall:
    """One request to an OAuth endpoint, being served."""

    broker: Broker
    request: Request
    form: dict[str, list[str]]
    context: CallContext

    @property
    def peer(self) -> str:
        # Not gRPC's "ipv4:…:port": the HTTP port is rate-limited and audited per address.
        return f"http:{self.request.peer}"

    def single(self, name: str, *, required: bool = False) -> str:
        """The one value of parameter `name` ("" when absent and not required); RFC 6749 §3.2:
        a parameter sent twice is an invalid request."""
        values = self.form.get(name, [])
        if len(values) > 1:
            raise Refusal(invalid_request(f"{name}: sent more than once"))
        if required and not (values and values[0]):
            raise Refusal(invalid_request(f"{name}: required"))
        return values[0] if values else ""

    def authenticate(self, presented: Presented, method: str) -> CallContext:
        """Who presented this credential (audited and rate-limited like a gRPC call); the
        call's context from now on."""
        principal = admitted(
            self.broker.authn,
            self.broker.throttle,
            presented,
            self.context,
            method,
            required=True,
        )
        self.context = replace(self.context, principal=principal)
        telemetry.annotate_call(self.context)
        return self.context


Handler = Callable[[OAuthCall], dict[str, Any]]


def carries_credentials_safely(settings: Settings) -> bool:
    """Whether the HTTP port may take credentials and hand out tokens: over TLS
    (--http-tls-cert), on loopback, or with --insecure when something in front (a proxy, a
    mesh sidecar) terminates TLS — the rule gRPC's port follows too."""
    if not settings.http_listen:
        return False
    return settings.http_tls_enabled or settings.insecure or is_loopback(settings.http_listen)


PLAINTEXT_REFUSAL = invalid_request(
    "not served over plaintext HTTP on a non-loopback address: credentials and tokens would "
    "cross the network in clear text; serve HTTPS (--http-tls-cert), or terminate TLS in front "
    "of the broker and start it with --insecure, or use the gRPC port"
)


def serve(broker: Broker, endpoint: Endpoint, handler: Handler) -> Callable[[Request], Response]:
    """A route answering `handler`'s document as JSON, or the OAuth error of its refusal."""
    safe = carries_credentials_safely(broker.settings)

    def route(request: Request) -> Response:
        if not safe:
            return Response.json(400, PLAINTEXT_REFUSAL.document(), NO_STORE)
        request_id = _request_id(request)
        headers = (*NO_STORE, ("X-Request-Id", request_id))
        tracer = broker.telemetry.tracer_provider.get_tracer("broker.api.http")
        with tracer.start_as_current_span(
            f"POST {request.path}",
            context=_PROPAGATOR.extract(carrier=dict(request.headers)),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path},
        ) as span:
            context = CallContext(request_id=request_id, trace_id=telemetry.current_trace_id())
            status, document, more = _answer(broker, request, endpoint, handler, context)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(trace.StatusCode.ERROR)
            return Response.json(status, document, (*headers, *more))

    return route


def _answer(
    broker: Broker,
    request: Request,
    endpoint: Endpoint,
    handler: Handler,
    context: CallContext,
) -> tuple[int, dict[str, Any], tuple[tuple[str, str], ...]]:
    call: OAuthCall | None = None
    try:
        call = OAuthCall(broker, request, form_of(request), context)
        return 200, handler(call), ()
    except Refusal as refusal:
        error = refusal.error
    except BrokerError as refused:
        error = oauth_error_for(refused, endpoint, context.request_id)
    except Exception:
        log.exception(
            "HTTP call failed", extra={"path": request.path, "request_id": context.request_id}
        )
        error = server_error(context.request_id)
    principal = call.context.principal.name if call is not None else ""
    log.info(
        "call refused",
        extra={
            "method": request.path,
            "error": error.error,
            "reason": limits.shown(error.description, 512),
            "request_id": context.request_id,
            "principal": principal,
        },
    )
    return error.status, error.document(), error.headers


def form_of(request: Request) -> dict[str, list[str]]:
    """The request's form, or Refusal(invalid_request): wrong method or content type, not
    UTF-8, malformed, too many fields or a value too long."""
    if request.method != "POST":
        raise Refusal(invalid_request("use POST"))
    media_type = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    if media_type != FORM_TYPE:
        raise Refusal(invalid_request(f"Content-Type must be {FORM_TYPE}"))
    try:
        form = request.form(MAX_FIELDS)
    except ValueError:  # UnicodeDecodeError is one
        raise Refusal(
            invalid_request(f"not a form: name=value pairs joined by '&', at most {MAX_FIELDS}")
        ) from None
    for name, values in form.items():
        if len(name) > 64 or any(len(v) > MAX_VALUE_CHARS for v in values):
            raise Refusal(
                invalid_request(
                    f"{limits.shown(name, 64)}: at most {MAX_VALUE_CHARS} characters per value"
                )
            )
        if "\x00" in name or any("\x00" in v for v in values):
            raise Refusal(invalid_request(f"{limits.shown(name, 64)}: contains NUL"))
    return form


def renamed(error: InvalidArgument, names: Mapping[str, str]) -> InvalidArgument:
    """`error` with its fields named as the form names them ('permissions[2].level' →
    'scope[2]'), so that the caller reads the parameter it sent."""
    violations = []
    for violation in error.violations:
        head, sep, rest = violation.field.partition("[")
        base = head.split(".", 1)[0]
        name = names.get(base, base)
        index = f"[{rest.split(']', 1)[0]}]" if sep else ""
        violations.append(FieldViolation(name + index, violation.rule))
    return InvalidArgument(violations)


def _request_id(request: Request) -> str:
    given = request.header(REQUEST_ID_HEADER) or ""
    return given if _REQUEST_ID_PATTERN.match(given) else new_request_id()
