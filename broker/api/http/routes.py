"""What an HTTP handler sees and answers, and the table from (method, path) to handler.

Exact paths and path prefixes (for trees of static-looking resources such as tiles); an exact
match wins over a prefix, the longest prefix over a shorter one."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

MAX_FORM_FIELDS = 32


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    peer: str

    @classmethod
    def parse_target(cls, target: str) -> tuple[str, dict[str, list[str]]]:
        path, _, query = target.partition("?")
        return path, parse_qs(query, keep_blank_values=True)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def form(self, max_fields: int = MAX_FORM_FIELDS) -> dict[str, list[str]]:
        """An `application/x-www-form-urlencoded` body (RFC 6749 requests), strictly parsed:
        ASCII on the wire, UTF-8 once decoded, at most `max_fields` fields. ValueError (or
        its UnicodeDecodeError) for anything else."""
        text = self.body.decode("ascii")
        if not text:
            return {}
        return parse_qs(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=max_fields,
        )


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def json(
        cls, status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        return cls(status, json.dumps(document).encode(), "application/json", headers)

    @classmethod
    def text(
        cls,
        status: int,
        text: str,
        content_type: str = "text/plain; charset=utf-8",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        return cls(status, text.encode(), content_type, headers)


Handler = Callable[[Request], Response]


class Routes:
    def __init__(self) -> None:
        self._exact: dict[tuple[str, str], Handler] = {}
        self._prefixes: list[tuple[str, str, Handler]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        key = (method.upper(), path)
        if key in self._exact:
            raise ValueError(f"route registered twice: {method} {path}")
        self._exact[key] = handler

    def add_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        self._prefixes.append((method.upper(), prefix, handler))
        self._prefixes.sort(key=lambda route: len(route[1]), reverse=True)

    def resolve(self, method: str, path: str) -> Handler | None:
        handler = self._exact.get((method, path))
        if handler is not None:
            return handler
        for route_method, prefix, prefix_handler in self._prefixes:
            if route_method == method and path.startswith(prefix):
                return prefix_handler
        return None

    def allowed_methods(self, path: str) -> list[str]:
        """For a 405's `Allow` header: the methods some route answers at `path`."""
        methods = {m for (m, p) in self._exact if p == path}
        methods |= {m for (m, prefix, _) in self._prefixes if path.startswith(prefix)}
        return sorted(methods)

    def paths(self) -> list[tuple[str, str]]:
        return sorted(self._exact) + [(m, p + "*") for (m, p, _) in self._prefixes]
