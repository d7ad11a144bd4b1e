"""A small threaded HTTP/1.1 server in front of `Routes`.

It binds at construction so the port (and so the issuer URL) is known before the broker is
built; until routes are mounted every path answers 503. Hostile input is bounded here, once,
for every route: request line and headers by the standard library's limits, the body by
`MAX_BODY_BYTES` (413), a slow client by `REQUEST_TIMEOUT` (the socket times out). A handler
that raises answers 500 with a short message and logs the traceback; no response carries one."""

from __future__ import annotations

import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from broker.api.http.routes import Request, Response, Routes
from tokenbroker.defaults import SERVICE_NAME

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT = 10.0
_NOT_READY = Response.json(503, {"error": "temporarily_unavailable"}, (("Retry-After", "1"),))


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) from PEM files; OSError or ssl.SSLError names
    what is wrong with them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class HttpServer:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """With `tls`, every connection is TLS (the scheme is https)."""
        self.routes: Routes | None = None
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        if tls is not None:
            # The handshake runs on the connection's own thread (see Handler.handle), never
            # in the accepting one, where a client that stalls it would hold up every other.
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.scheme = "https" if tls is not None else "http"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def mount(self, routes: Routes) -> None:
        self.routes = routes

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="broker-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def answer(self, request: Request) -> Response:
        routes = self.routes
        if routes is None:
            return _NOT_READY
        handler = routes.resolve(request.method, request.path)
        if handler is None:
            allowed = routes.allowed_methods(request.path)
            if allowed:
                return Response.json(
                    405, {"error": "method not allowed"}, (("Allow", ", ".join(allowed)),)
                )
            return Response.json(404, {"error": "not found"})
        try:
            return handler(request)
        except Exception:
            log.exception("HTTP handler failed", extra={"path": request.path})
            return Response.json(500, {"error": "server_error"})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = SERVICE_NAME
            protocol_version = "HTTP/1.1"
            timeout = REQUEST_TIMEOUT

            def handle(self) -> None:
                connection = self.connection
                if isinstance(connection, ssl.SSLSocket):
                    try:
                        connection.do_handshake()  # bounded by `timeout`, set in setup()
                    except (ssl.SSLError, OSError) as exc:
                        # Plain HTTP to the TLS port, a scanner, a client giving up: no answer.
                        log.debug("TLS handshake failed", extra={"error": str(exc)})
                        self.close_connection = True
                        return
                super().handle()

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_HEAD(self) -> None:
                self._dispatch("HEAD")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_PUT(self) -> None:
                self._dispatch("PUT")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

            def _dispatch(self, method: str) -> None:
                body = self._read_body()
                if body is None:
                    return
                path, query = Request.parse_target(self.path)
                request = Request(
                    method="GET" if method == "HEAD" else method,
                    path=path,
                    query=query,
                    headers={name.lower(): value for name, value in self.headers.items()},
                    body=body,
                    peer=str(self.client_address[0]),
                )
                self._send(outer.answer(request), head_only=method == "HEAD")

            def _read_body(self) -> bytes | None:
                if "transfer-encoding" in {name.lower() for name in self.headers}:
                    self._send(Response.json(411, {"error": "length required"}))
                    self.close_connection = True
                    return None
                raw = self.headers.get("Content-Length", "0") or "0"
                if not raw.isdigit():
                    self._send(Response.json(400, {"error": "bad Content-Length"}))
                    self.close_connection = True
                    return None
                length = int(raw)
                if length > MAX_BODY_BYTES:
                    self._send(Response.json(413, {"error": "body too large"}))
                    self.close_connection = True
                    return None
                return self.rfile.read(length) if length else b""

            def _send(self, response: Response, head_only: bool = False) -> None:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                for name, value in response.headers:
                    self.send_header(name, value)
                self.end_headers()
                if not head_only:
                    self.wfile.write(response.body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http " + format, *args)

        return Handler
