"""The house rules, read from the code's own imports: the domain knows no transport, and the
store knows nothing above the values it stores."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BROKER = Path(__file__).resolve().parent.parent / "broker"
CLIENT = BROKER.parent / "clients" / "tokenbroker"

DOMAIN = ("runs", "auth", "policy", "audit", "telemetry")
SHARED = ("errors", "clock", "ids", "identity", "context", "settings", "limits", "keyfile")
TRANSPORTS = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "tokenbroker.v1")
ABOVE_DOMAIN = ("broker.api", "broker.cli", "broker.app", "broker.bench")
# What the client distribution (clients/pyproject.toml) requires; tracing and the samples
# may also use OpenTelemetry (its `tracing` extra).
CLIENT_REQUIRES = ("grpc", "google.protobuf", "google.rpc", "jwt", "cryptography", "tokenbroker")
TRACING_EXTRA = ("opentelemetry",)
# What the store may know: the value types it stores and the shared value modules.
STORE_MAY_IMPORT = (
    "broker.store",
    "broker.errors",
    "broker.clock",
    "broker.identity",
    "broker.runs.model",
    "broker.runs.permissions",
    "broker.audit.events",
    # The tree's maths (hashes and the frontier), stored beside the events they cover.
    "broker.audit.merkle",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(BROKER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_under(*packages: str) -> list[Path]:
    found: list[Path] = []
    for package in packages:
        target = BROKER / package
        found.extend(
            sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
        )
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", modules_under(*DOMAIN, *SHARED), ids=lambda p: module_name(p))
def test_domain_imports_no_transport_and_nothing_above_it(path: Path) -> None:
    wrong = [n for n in imports_of(path) if within(n, TRANSPORTS + ABOVE_DOMAIN)]
    assert wrong == [], f"{module_name(path)} imports {wrong}"


@pytest.mark.parametrize("path", modules_under("store"), ids=lambda p: module_name(p))
def test_store_imports_only_the_values_it_stores(path: Path) -> None:
    wrong = [
        n
        for n in imports_of(path)
        if n.startswith("broker")
        and not within(n, STORE_MAY_IMPORT)
        # `from broker.runs import model` names the module itself.
        and n not in {"broker.runs", "broker.audit"}
    ]
    assert wrong == [], f"{module_name(path)} imports {wrong}"


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted(BROKER.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init} has no docstring"


def test_top_level_stays_small() -> None:
    modules = sorted(p.name for p in BROKER.glob("*.py"))
    assert len(modules) <= 12, modules


def test_importing_the_domain_loads_no_grpc() -> None:
    probe = (
        "import sys\n"
        "import broker, broker.runs.lifecycle, broker.runs.delegation, broker.runs.issuance\n"
        "import broker.auth.authn, broker.auth.authz, broker.policy.source, broker.audit.feed\n"
        "import broker.audit.keeper, broker.telemetry.setup, broker.store.sqlite\n"
        "loaded = sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_public_surface_is_named_once_in_the_package() -> None:
    import broker
    from broker.api.server import create_server
    from broker.app import build_broker
    from broker.settings import Settings
    from broker.store import Store

    assert broker.create_server is create_server
    assert broker.build_broker is build_broker
    assert broker.Settings is Settings
    assert broker.Store is Store


def client_modules() -> list[Path]:
    return sorted(p for p in CLIENT.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", client_modules(), ids=lambda p: str(p.relative_to(CLIENT)))
def test_client_never_imports_the_server(path: Path) -> None:
    wrong = [n for n in imports_of(path) if within(n, ("broker",))]
    assert wrong == [], f"{path} imports {wrong}"


@pytest.mark.parametrize("path", client_modules(), ids=lambda p: str(p.relative_to(CLIENT)))
def test_client_imports_only_what_its_distribution_requires(path: Path) -> None:
    allowed: tuple[str, ...] = CLIENT_REQUIRES
    if path.name == "tracing.py" or "samples" in path.relative_to(CLIENT).parts:
        allowed += TRACING_EXTRA
    wrong = [
        n
        for n in imports_of(path)
        if n.split(".")[0] not in sys.stdlib_module_names and not within(n, allowed)
    ]
    assert wrong == [], f"{path} imports {wrong}, which tokenbroker-client does not require"
