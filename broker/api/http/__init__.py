"""The broker's HTTP port: one small threaded server (server) and a router (routes) that each
concern registers its paths on — discovery and JWKS (wellknown), RFC 8693 token exchange
(exchange) and RFC 7662 introspection (introspection), which share their OAuth plumbing (oauth),
the probes `/healthz` and `/readyz` (health), the Prometheus scrape `/metrics` (metrics; for
every worker of `serve --workers` on worker 0: workermetrics) and the
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
    from broker.api.http.workermetrics import WorkerScrape
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


def broker_routes(
    broker: Broker, issuer: str, *, every_worker: WorkerScrape | None = None
) -> Routes:
    """Every route the broker serves over HTTP, bound to `broker`. `every_worker`: this is
    worker 0 of `serve --workers`, whose `/metrics` answers for all of them."""
    routes = Routes()
    for module in ROUTE_MODULES:
        if module is metrics and every_worker is not None:
            metrics.register_every_worker(routes, broker, every_worker)
        else:
            module.register(routes, broker, issuer)
    return routes


def metrics_routes(broker: Broker) -> Routes:
    """The private endpoint of a worker of `serve --workers`: its own `/metrics`, alone."""
    routes = Routes()
    metrics.register(routes, broker, "")
    return routes


__all__ = [
    "HttpServer",
    "Request",
    "Response",
    "Routes",
    "broker_routes",
    "metrics_routes",
    "tls_context",
]
