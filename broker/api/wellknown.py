"""HTTP discovery for standard verifiers: `/.well-known/openid-configuration` and
`/.well-known/jwks.json`, so PyJWT's PyJWKClient or a cloud's workload-identity federation
verify broker tokens with no broker-specific code."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tokenbroker.defaults import SERVICE_NAME

log = logging.getLogger(__name__)

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"


def discovery_document(issuer: str, algorithms: list[str]) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_PATH,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
        "claims_supported": [
            "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "run_id", "org", "project",
            "pipeline", "step", "permissions", "on_behalf_of", "act",
        ],
    }  # fmt: skip


class WellKnownServer:
    """A small threaded HTTP server; binds at construction so the port is known early."""

    def __init__(self, host: str, port: int, jwks: Callable[[], dict[str, Any]]) -> None:
        self._jwks = jwks
        self.issuer = ""
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def set_jwks_source(self, jwks: Callable[[], dict[str, Any]]) -> None:
        self._jwks = jwks

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = SERVICE_NAME

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == JWKS_PATH:
                    self._send(200, outer._jwks())
                elif path == DISCOVERY_PATH:
                    algorithms = sorted({k["alg"] for k in outer._jwks()["keys"]})
                    self._send(200, discovery_document(outer.issuer, algorithms))
                else:
                    self._send(404, {"error": "not found"})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "public, max-age=60")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http " + format, *args)

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="wellknown-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
