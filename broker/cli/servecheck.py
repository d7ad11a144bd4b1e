"""`token-broker serve --check`: validate what `serve` would start with, print what it would
serve, and exit — like `nginx -t`. Deployment manifests run it before the broker starts.

It checks the settings, the policy file (or the development policy the data dir holds),
the TLS files, the signing keys (an external `--signing-key`, or the key files in the data
dir) and that the store can be reached and opened. It writes nothing and binds nothing: the
store is opened read-only (no migration, no lock, no file created), so it can run beside a
broker that is serving. Exit 0 when `serve` would start; 2 for a configuration problem (a
bad setting, an invalid policy, a missing TLS file, a bad key); 1 when the store cannot be
reached or must not be opened — the same codes `serve` itself exits with.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from broker.app import KEY_DIR, store_options
from broker.cli import common
from broker.policy import dev as devpolicy
from broker.policy.file import load_policy
from broker.policy.model import Policy
from broker.runs.keys import key_id, load_private_key
from broker.settings import Settings, SettingsError, is_loopback, split_host_port
from broker.store import Store, StoreNotFound, StoreRefused, StoreUnavailable
from broker.store.factory import open_store, parse


@dataclass(frozen=True)
class Plan:
    """What `serve` would serve, one line each."""

    lines: tuple[tuple[str, str], ...]

    def text(self) -> str:
        width = max(len(name) for name, _ in self.lines) + 1
        return "\n".join(f"{name + ':':<{width}} {value}" for name, value in self.lines)


def check(settings: Settings) -> Plan:
    """What `serve` would serve; raises (as `serve` would) on the first problem found."""
    lines = [*_addresses(settings), ("policy", _policy(settings))]
    local_keys = _local_keys(settings)
    store_line, published = _store(settings)
    lines.append(("store", store_line))
    lines.append(("signing keys", _keys(settings, local_keys, published)))
    return Plan(tuple(lines))


def _addresses(settings: Settings) -> list[tuple[str, str]]:
    split_host_port(settings.listen, "--listen")
    security = "TLS" if settings.tls_enabled else "plaintext"
    if settings.client_ca is not None:
        security += ", client certificates required"
    for flag, path in (
        ("--tls-cert", settings.tls_cert),
        ("--tls-key", settings.tls_key),
        ("--client-ca", settings.client_ca),
    ):
        if path is not None and not path.is_file():
            raise SettingsError(f"{flag} {path}: no such file")
    if not settings.tls_enabled and not is_loopback(settings.listen):
        security += " on a non-loopback address (--insecure)"
    lines = [("grpc", f"{settings.listen} ({security})")]
    if settings.http_listen:
        _, port = split_host_port(settings.http_listen, "--http-listen")
        served = "discovery, JWKS, /oauth2/token, /oauth2/introspect, /healthz, /readyz, /metrics"
        lines.append(("http", f"{settings.http_listen} ({served})"))
        issuer = settings.effective_issuer
        if not settings.issuer and port == 0:
            issuer += " (the port is chosen at start)"
    else:
        lines.append(("http", "off"))
        issuer = settings.effective_issuer
    lines.append(("issuer", issuer))
    return lines


def _policy(settings: Settings) -> str:
    if settings.policy is not None:
        return f"{settings.policy}: {_summary(load_policy(settings.policy))}"
    path = settings.data_dir / devpolicy.POLICY_FILE
    if not path.exists():
        return f"development policy, written to {path} at the first start (never in production)"
    return f"{path} (development policy): {_summary(load_policy(path))}"


def _summary(policy: Policy) -> str:
    accounts = [
        f"{name} [{', '.join(sorted(role.value for role in account.roles))}]"
        for name, account in sorted(policy.accounts.items())
    ]
    count = f"{len(accounts)} account{'s' if len(accounts) != 1 else ''}"
    return f"{count}: {'; '.join(accounts)} (sha256 {policy.sha256[:12]})"


def _local_keys(settings: Settings) -> list[str]:
    """The key ids of the private keys `serve` would sign with; SettingsError for a key that
    cannot be used."""
    if settings.signing_key is not None:
        paths = [settings.signing_key]
    else:
        key_dir = settings.data_dir / KEY_DIR
        paths = sorted(key_dir.glob("*.pem")) if key_dir.is_dir() else []
    kids = []
    for path in paths:
        try:
            kids.append(key_id(load_private_key(path)))
        except OSError as exc:
            raise SettingsError(f"signing key {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            reason = str(exc) if "signing keys must" in str(exc) else ""
            raise SettingsError(
                f"signing key {path}: "
                + (reason or "not an unencrypted PEM private key (EC P-256 or RSA)")
            ) from None
    return kids


def _keys(settings: Settings, local: list[str], published: list[str] | None) -> str:
    where = (
        f"--signing-key {settings.signing_key}"
        if settings.signing_key is not None
        else f"{settings.data_dir / KEY_DIR}"
    )
    if not local:
        return f"none yet in {where}: a first {settings.signing_alg} key is made at start"
    shown = f"{', '.join(local)} (in {where})"
    if published:
        others = [kid for kid in published if kid not in local]
        if others:
            shown += f"; also published by other replicas: {', '.join(others)}"
    return shown


def shown_store(store: str) -> str:
    """The store URL as printed: a password in it is never shown."""
    return _PASSWORD.sub(r"\1:***@", store)


_PASSWORD = re.compile(r"(//[^:/@]*):[^@/]*@")


def _store(settings: Settings) -> tuple[str, list[str] | None]:
    """A line about the store, and the key ids published in it (None: no store yet)."""
    url = parse(settings.store)  # StoreUrlInvalid is a ValueError: exit 2
    if url.scheme == "memory":
        return "memory: (ephemeral: everything is lost at exit)", None
    options = dataclasses.replace(store_options(settings), read_only=True)
    try:
        store = open_store(url, options)
    except StoreNotFound as exc:
        return _no_store_yet(settings, url.scheme, options.history, exc), None
    except (StoreRefused, StoreUnavailable, OSError) as exc:
        raise common.CliError(
            f"store {shown_store(settings.store)}: {exc}", common.EXIT_FAILED
        ) from None
    try:
        return _describe(settings, store), [record.kid for record in store.public_keys()]
    except StoreUnavailable as exc:
        raise common.CliError(
            f"store {shown_store(settings.store)}: cannot be read: {exc}", common.EXIT_FAILED
        ) from None
    finally:
        store.close()


def _describe(settings: Settings, store: Store) -> str:
    shown = shown_store(settings.store)
    where = getattr(store, "path", None)
    located = f"{shown} ({where})" if where is not None else shown
    schema = getattr(store, "schema_version", "?")
    head = store.head_sequence()
    return f"{located}: schema {schema}, {head} audit events, reachable"


def _no_store_yet(
    settings: Settings, scheme: str, history: tuple[Path, ...], why: StoreNotFound
) -> str:
    if scheme == "sqlite" and not settings.init_store and any(p.exists() for p in history):
        # What serve refuses too: a database lost from a data dir that held a broker.
        raise common.CliError(
            f"store {shown_store(settings.store)}: {why}; the data dir held a broker before "
            "(start with --init-store to begin a new audit history)",
            common.EXIT_FAILED,
        )
    return f"{shown_store(settings.store)}: none yet ({why}); an empty one is created at start"
