"""Probes where operators look: `/healthz` (the process answers) and `/readyz` (ready for all
of its work: store writable, policy loaded, a signing key, not draining), the latter from
the same `Broker.readiness()` the gRPC health service reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api.http.routes import Request, Response, Routes

if TYPE_CHECKING:
    from broker.app import Broker

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
_NO_STORE = (("Cache-Control", "no-store"),)


def register(routes: Routes, broker: Broker, issuer: str) -> None:
    def healthz(request: Request) -> Response:
        return Response.json(200, {"status": "alive"}, _NO_STORE)

    def readyz(request: Request) -> Response:
        readiness = broker.readiness()
        document = {
            "ready": readiness.ready,
            "checks": {
                "store_writable": readiness.store_writable,
                "policy_loaded": readiness.policy_loaded,
                "keys_present": readiness.keys_present,
                "draining": readiness.draining,
            },
            "reasons": readiness.reasons,
        }
        return Response.json(200 if readiness.ready else 503, document, _NO_STORE)

    routes.add("GET", HEALTHZ_PATH, healthz)
    routes.add("GET", READYZ_PATH, readyz)
