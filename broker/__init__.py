"""token-broker: short-lived, run-scoped tokens for CI/CD pipelines.

The public surface, named here once: `create_server` (the gRPC server on a port, what tests and
embedders use), `build_broker` (the domain without a transport), `Settings` (read once, frozen)
and the `Store` protocol. Each is imported on first use, so `import broker.errors` does not load
gRPC: the domain packages below must stay importable without a transport.

Packages, from the ground up (each `__init__` says what it owns and what it may import):

    errors, clock, ids, identity, context   value types every layer shares
    limits       the limit of every request field, and how caller text is shown
    keyfile      private keys on disk: written once, 0600, fsynced
    store/       the Store protocol, the factory and one module per backend
    runs/        runs, permissions, delegation, tokens and signing keys
    auth/        who is calling (authn) and may it (authz)
    policy/      accounts, roles, scopes, the file format, reload
    audit/       events, the hash chain, checkpoints, the live feed, export and verify
    telemetry/   OpenTelemetry set-up, the domain's observer, metrics, logs
    app          composition root: Settings -> every component
    api/         the gRPC and HTTP edge
    cli/         every `token-broker` sub-command
    bench/       `token-broker bench`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from broker.api.server import create_server
    from broker.app import build_broker
    from broker.settings import Settings
    from broker.store import Store

__all__ = ["Settings", "Store", "__version__", "build_broker", "create_server"]

_PUBLIC = {
    "create_server": "broker.api.server",
    "build_broker": "broker.app",
    "Settings": "broker.settings",
    "Store": "broker.store",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
