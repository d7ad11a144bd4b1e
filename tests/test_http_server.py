"""The broker's HTTP port answers hostile or unexpected requests with a status, never a
traceback: unknown paths, wrong methods, oversized or unframed bodies, failing handlers."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest

from broker.api.http import HttpServer, Request, Response, Routes
from broker.api.http.server import MAX_BODY_BYTES


@pytest.fixture
def server() -> Iterator[HttpServer]:
    http_server = HttpServer("127.0.0.1", 0)
    http_server.start()
    yield http_server
    http_server.stop()


def _routes() -> Routes:
    def echo(request: Request) -> Response:
        return Response.json(200, {"body": request.body.decode(), "q": dict(request.query)})

    def broken(request: Request) -> Response:
        raise RuntimeError("secret detail")

    routes = Routes()
    routes.add("POST", "/echo", echo)
    routes.add("GET", "/broken", broken)
    routes.add_prefix("GET", "/tiles/", lambda r: Response.text(200, r.path))
    return routes


def _call(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_every_path_answers_503_until_routes_are_mounted(server: HttpServer) -> None:
    status, headers, _ = _call(server.port, "GET", "/.well-known/jwks.json")
    assert status == 503
    assert headers["Retry-After"] == "1"


def test_a_mounted_route_gets_its_body_and_query(server: HttpServer) -> None:
    server.mount(_routes())
    status, _, body = _call(server.port, "POST", "/echo?a=1", b"hello")
    assert status == 200
    assert json.loads(body) == {"body": "hello", "q": {"a": ["1"]}}


def test_prefix_routes_serve_every_path_beneath_them(server: HttpServer) -> None:
    server.mount(_routes())
    assert _call(server.port, "GET", "/tiles/0/x001")[2] == b"/tiles/0/x001"


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(server: HttpServer) -> None:
    server.mount(_routes())
    assert _call(server.port, "GET", "/nothing")[0] == 404
    status, headers, _ = _call(server.port, "GET", "/echo")
    assert status == 405
    assert headers["Allow"] == "POST"


def test_a_body_over_the_limit_is_refused_with_413(server: HttpServer) -> None:
    server.mount(_routes())
    status, _, _ = _call(server.port, "POST", "/echo", b"x" * (MAX_BODY_BYTES + 1))
    assert status == 413


def test_a_chunked_body_is_refused_with_411(server: HttpServer) -> None:
    server.mount(_routes())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")


def test_a_failing_handler_answers_500_without_its_details(server: HttpServer) -> None:
    server.mount(_routes())
    status, _, body = _call(server.port, "GET", "/broken")
    assert status == 500
    assert b"secret detail" not in body and b"Traceback" not in body
