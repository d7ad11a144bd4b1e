"""The broker's HTTP port: one small threaded server (server) and a router (routes) that each
concern registers its paths on — discovery and JWKS (wellknown), RFC 8693 token exchange
(exchange) and RFC 7662 introspection (introspection), which share their OAuth plumbing (oauth),
the probes `/healthz` and `/readyz` (health), the Prometheus scrape `/metrics` (metrics) and the
audit log's signed tree head (auditlog), its hash tiles (tiles) and its Merkle proofs
(proofs).

Every route module has `register(routes, broker, issuer)`; `ROUTE_MODULES` names them, so a new
endpoint is a new module and one line here. Handlers receive a bounded, parsed `Request` and
return a `Response`; the server owns sizes, timeouts, error answers and logging.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from broker.api.http import (
    auditlog,
    exchange,
    health,
    introspection,
    metrics,
    proofs,
    tiles,
    wellknown,
)
from broker.api.http.routes import Request, Response, Routes
from broker.api.http.server import HttpServer, tls_context

if TYPE_CHECKING:
    from broker.app import Broker

ROUTE_MODULES: tuple[ModuleType, ...] = (
    wellknown,
    exchange,
    introspection,
    health,
    metrics,
    auditlog,
    tiles,
    proofs,
)


def broker_routes(broker: Broker, issuer: str) -> Routes:
    """Every route the broker serves over HTTP, bound to `broker`."""
    routes = Routes()
    for module in ROUTE_MODULES:
        module.register(routes, broker, issuer)
    return routes


__all__ = ["HttpServer", "Request", "Response", "Routes", "broker_routes", "tls_context"]
