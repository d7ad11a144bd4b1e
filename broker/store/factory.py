"""Open a store from its URL: the one place that knows which backends exist.

A store is named by one URL-like string (setting `--store`, env TOKEN_BROKER_STORE):

    memory:                 ephemeral, inside this process (tests, throw-away brokers)
    sqlite:PATH             the SQLite database file PATH, created on first start
    sqlite:                 the data dir's broker.db (the default)
    sqlite:PATH?busy_timeout=SECONDS
                            how long a write waits for another process's write lock
    postgresql://USER@HOST[:PORT]/DATABASE[?sslmode=...]
                            a PostgreSQL database shared by several replicas (a libpq URL;
                            `pip install token-broker[postgresql]`)

`sqlite` and `memory` alone are aliases of `sqlite:` and `memory:`.

A backend is a module in broker/store/ (plus its migrations folder under
broker/store/migrations/) with two functions, `check_url(url)` and
`open_url(url, options)`, registered by one line in BACKENDS. It is imported only when a URL
names it, so that a backend's driver is needed only by those who use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, cast
from urllib.parse import parse_qsl

from broker.store import Store, StoreUrlInvalid

# scheme -> module implementing `Backend`.
BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "memory": "broker.store.memory",
        "sqlite": "broker.store.sqlite",
        "postgresql": "broker.store.postgres",
        "postgres": "broker.store.postgres",
    }
)


@dataclass(frozen=True)
class StoreUrl:
    """A parsed store URL: `scheme:location?options`."""

    scheme: str
    location: str = ""
    options: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.scheme}:{self.location}" + (f"?{query}" if query else "")


@dataclass(frozen=True)
class OpenOptions:
    """How to open a store.

    `data_dir`: the broker's data directory (where `sqlite:` keeps broker.db).
    `read_only`: for offline tools: never write, migrate, lock or create anything; read one
    consistent snapshot.
    `create`: allow an empty store to be created although `history` shows that this data
    dir held a broker before (`--init-store`).
    `history`: paths whose presence shows that the data dir was used before (keys, the
    development policy); the store adds its own marks. An empty store is created without
    `create` only where none exists.
    `held_lock`: a descriptor, inherited from the supervisor of `serve --workers`, that holds
    the store for this process's group (see `hold_for_workers`): the store is then shared
    with sibling processes, which it follows.
    """

    data_dir: Path = Path("var")
    read_only: bool = False
    create: bool = False
    history: tuple[Path, ...] = ()
    held_lock: int | None = None


class Hold(Protocol):
    """A store held for a group of worker processes (see `hold_for_workers`)."""

    def fileno(self) -> int: ...

    def release(self) -> None: ...


class Backend(Protocol):
    def check_url(self, url: StoreUrl) -> None:
        """Raise StoreUrlInvalid if the URL cannot name a store of this backend."""
        ...

    def open_url(self, url: StoreUrl, options: OpenOptions) -> Store:
        """Open (or, where allowed, create) the store; raise StoreRefused if it must not be."""
        ...


def parse(text: str) -> StoreUrl:
    """Parse and check a store URL (without opening anything); raise StoreUrlInvalid."""
    url = _split(text.strip())
    backend(url.scheme).check_url(url)
    return url


def open_store(url: str | StoreUrl, options: OpenOptions | None = None) -> Store:
    """Open the store the URL names. Raises StoreRefused (nothing changed) if it must not be."""
    parsed = parse(url) if isinstance(url, str) else url
    return backend(parsed.scheme).open_url(parsed, options or OpenOptions())


def hold_for_workers(url: str | StoreUrl, options: OpenOptions) -> Hold | None:
    """Hold the store for the workers of one `serve --workers` (they inherit the descriptor
    and pass it back as `OpenOptions.held_lock`), so that any other broker is refused as
    before. None for a backend that admits several brokers anyway (PostgreSQL)."""
    parsed = parse(url) if isinstance(url, str) else url
    hold = getattr(backend(parsed.scheme), "hold_for_workers", None)
    return None if hold is None else cast(Hold, hold(parsed, options))


def backend(scheme: str) -> Backend:
    module = BACKENDS.get(scheme)
    if module is None:
        known = ", ".join(f"{name}:" for name in BACKENDS)
        raise StoreUrlInvalid(f"unknown store {scheme + ':'!r}: use one of {known}")
    return cast(Backend, importlib.import_module(module))


def _split(text: str) -> StoreUrl:
    if text in BACKENDS:  # the aliases `sqlite` and `memory`
        return StoreUrl(text)
    scheme, colon, rest = text.partition(":")
    if not colon or not scheme:
        raise StoreUrlInvalid(
            f"store {text!r} is not a store URL: use memory:, sqlite: or sqlite:PATH"
        )
    location, question, query = rest.partition("?")
    options: dict[str, str] = {}
    if question:
        try:
            options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            raise StoreUrlInvalid(f"store {text!r}: malformed options after '?'") from None
    return StoreUrl(scheme.lower(), location, options)
