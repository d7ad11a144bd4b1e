"""Settings: read once from flags and TOKEN_BROKER_* environment variables into one frozen
object, validated before anything starts. Flags win over the environment; both win over
the defaults, which are safe: loopback only, durable SQLite store."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from broker import limits
from broker.store import StoreUrlInvalid, factory
from tokenbroker.defaults import DEFAULT_HTTP_TARGET, DEFAULT_TARGET

ENV_PREFIX = "TOKEN_BROKER_"
# A new key waits at most a week before it signs; the old one signs (and is exposed) as long.
MAX_KEY_PREPUBLISH = 7 * 24 * 3600.0


class SettingsError(ValueError):
    """A setting, or a combination of settings, is unsafe or invalid."""


@dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_TARGET
    http_listen: str = DEFAULT_HTTP_TARGET
    data_dir: Path = Path("var")
    store: str = "sqlite:"
    init_store: bool = False
    policy: Path | None = None
    issuer: str = ""
    signing_alg: str = "ES256"
    signing_key: Path | None = None
    key_prepublish: float = 3600.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    client_ca: Path | None = None
    insecure: bool = False
    executor_target: str = ""
    executor_dpop_jwk: Path | None = None
    log_level: str = "info"
    log_format: str = "json"
    max_workers: int = 16
    max_audit_streams: int = 32
    workers: int = 1
    shutdown_grace: float = 4.0
    reap_interval: float = 1.0
    otel_console: bool = False
    audit_checkpoint_events: int = 1000
    audit_checkpoint_interval: float = 60.0
    audit_retention_days: float = 0.0
    audit_log_key: Path | None = None
    witness_key: tuple[Path, ...] = ()
    witness_quorum: int = 0
    max_request_bytes: int = limits.DEFAULT_MAX_REQUEST_BYTES
    peer_rate: float = 20.0
    peer_burst: int = 100
    principal_rate: float = 1000.0
    principal_burst: int = 2000
    refusal_audit_interval: float = 60.0
    audit_streams_per_principal: int = 4
    metric_audiences: int = 100
    idempotency_retention_days: float = 7.0

    def __post_init__(self) -> None:
        try:
            factory.parse(self.store)
        except StoreUrlInvalid as exc:
            raise SettingsError(f"--store: {exc}") from None
        if self.signing_alg not in ("ES256", "RS256"):
            raise SettingsError(f"--signing-alg must be ES256 or RS256, not {self.signing_alg!r}")
        if not 0 <= self.key_prepublish <= MAX_KEY_PREPUBLISH:
            raise SettingsError(
                f"--key-prepublish must be 0 to {MAX_KEY_PREPUBLISH:g} seconds (7 days)"
            )
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"--log-format must be 'json' or 'text', not {self.log_format!r}")
        if self.max_workers < 4:
            raise SettingsError("--max-workers must be at least 4")
        _check_workers(self)
        _check_audit_settings(self)
        _check_limits(self)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together: give both or neither")
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise SettingsError(
                "--http-tls-cert and --http-tls-key go together: give both or neither"
            )
        if self.http_tls_cert is not None and not self.http_listen:
            raise SettingsError("--http-tls-cert needs --http-listen (the HTTP port is off)")
        if self.client_ca is not None and self.tls_cert is None:
            raise SettingsError("--client-ca (mTLS) needs --tls-cert and --tls-key")
        for name, address in (("--listen", self.listen), ("--http-listen", self.http_listen)):
            if address:
                split_host_port(address, name)
        if not self.tls_enabled and not self.insecure and not is_loopback(self.listen):
            raise SettingsError(
                f"refusing to serve on non-loopback address {self.listen} without TLS: "
                "tokens and credentials would cross the network in clear text. "
                "Give --tls-cert and --tls-key, or --insecure if something else encrypts "
                "the traffic (e.g. a service mesh sidecar)."
            )

        if self.executor_dpop_jwk is not None and not self.executor_target:
            raise SettingsError("--executor-dpop-jwk needs --executor-target")
        if self.executor_target and not self.insecure and not is_loopback(self.executor_target):
            raise SettingsError(
                f"refusing to hand run credentials to executor {self.executor_target} in clear "
                "text: use a loopback address (or a local sidecar), or --insecure"
            )

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @property
    def http_tls_enabled(self) -> bool:
        return self.http_tls_cert is not None

    @property
    def effective_issuer(self) -> str:
        """The `iss` of broker tokens: explicit, or the URL of the HTTP discovery endpoint."""
        if self.issuer:
            return self.issuer.rstrip("/")
        host, port = split_host_port(self.http_listen or self.listen, "--http-listen")
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.http_tls_enabled else 'http'}://{host}:{port}"

    def plain_discovery_warning(self) -> str | None:
        """Why serving discovery as configured is probably a mistake, or None.

        Plain HTTP on a non-loopback address under an https:// issuer is right only behind a
        proxy that terminates TLS: a warning, not a refusal."""
        if not self.http_listen or self.http_tls_enabled or is_loopback(self.http_listen):
            return None
        if not self.issuer.lower().startswith("https://"):
            return None
        return (
            f"the HTTP port {self.http_listen} serves discovery and the JWKS in plain HTTP "
            f"while the issuer is {self.issuer}: relying parties fetch them over HTTPS. Give "
            "--http-tls-cert and --http-tls-key, unless a proxy in front terminates TLS"
        )


MAX_PROCESSES = 64


def _check_workers(settings: Settings) -> None:
    if not 1 <= settings.workers <= MAX_PROCESSES:
        raise SettingsError(f"--workers must be 1 to {MAX_PROCESSES}")
    if settings.workers > 1 and factory.parse(settings.store).scheme == "memory":
        raise SettingsError(
            f"--workers {settings.workers} needs a store the processes share (sqlite: or "
            "postgresql://); memory: lives inside one process, so its workers would each "
            "hold a different broker"
        )


def _check_audit_settings(settings: Settings) -> None:
    if settings.audit_checkpoint_events < 1:
        raise SettingsError("--audit-checkpoint-events must be at least 1")
    if not settings.audit_checkpoint_interval > 0:
        raise SettingsError("--audit-checkpoint-interval must be a positive number of seconds")
    if not settings.audit_retention_days >= 0:
        raise SettingsError("--audit-retention-days must be 0 (keep forever) or positive")
    if not 0 <= settings.witness_quorum <= len(settings.witness_key):
        raise SettingsError(
            f"--witness-quorum must be 0 (off) to the number of --witness-key files "
            f"({len(settings.witness_key)})"
        )


def _check_limits(settings: Settings) -> None:
    if not 64 * 1024 <= settings.max_request_bytes <= 4 * 1024 * 1024:
        raise SettingsError("--max-request-bytes must be between 65536 and 4194304")
    for name in ("peer_rate", "principal_rate"):
        if not getattr(settings, name) >= 0:
            raise SettingsError(f"--{name.replace('_', '-')} must be 0 (no limit) or positive")
    for name in (
        "peer_burst",
        "principal_burst",
        "audit_streams_per_principal",
        "max_audit_streams",
    ):
        if getattr(settings, name) < 1:
            raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
    if not settings.refusal_audit_interval > 0:
        raise SettingsError("--refusal-audit-interval must be a positive number of seconds")
    if not settings.idempotency_retention_days >= 0:
        raise SettingsError("--idempotency-retention-days must be 0 (keep forever) or positive")
    if settings.metric_audiences < 0:
        raise SettingsError("--metric-audiences must be 0 or more")


def split_host_port(address: str, name: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{name} must be HOST:PORT (e.g. {DEFAULT_TARGET}), not {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    host, _ = split_host_port(address, "--listen")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost may resolve anywhere


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Declare one flag per setting; each defaults to its TOKEN_BROKER_* variable."""
    defaults = Settings.__dataclass_fields__
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        shown = shown_default(defaults[f.name].default)
        default = f"; default {shown}" if shown else ""
        help_text = f"{_HELP.get(f.name, '')} [env {env}{default}]"
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.type == "tuple[Path, ...]":
            parser.add_argument(
                flag, action="append", default=None, metavar=f.name.upper(), help=help_text
            )
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(), help=help_text)


def shown_default(value: object) -> str:
    """A default as people write it ("60", not "60.0"); "" for none (unset, off, empty)."""
    if value is None or value is False or value == "" or value == ():
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def from_sources(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Build Settings from parsed flags, then environment, then defaults."""
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        values[f.name] = _convert(f.name, f.type, raw)
    return Settings(**values)  # type: ignore[arg-type]


def _convert(name: str, type_name: object, raw: object) -> object:
    flag = "--" + name.replace("_", "-")
    if type_name == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{flag} must be true or false, not {raw!r}")
    if type_name == "tuple[Path, ...]":
        # Repeated flags, or one comma-separated environment variable.
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return tuple(Path(item.strip()) for item in items if item.strip())
    text = str(raw)
    try:
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
    except ValueError:
        raise SettingsError(f"{flag} must be a number, not {text!r}") from None
    if type_name in ("Path", "Path | None"):
        return Path(text) if text else None
    return text


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from a `serve` command line (used by tests and the CLI alike)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="token-broker serve")
    add_arguments(parser, environ)
    return from_sources(parser.parse_args(list(argv)), environ)


_HELP = {
    "listen": "gRPC address",
    "http_listen": "HTTP address for /.well-known/jwks.json and OIDC discovery ('' = off)",
    "data_dir": "directory for the SQLite database, keys and the development policy",
    "store": "where the broker keeps its state: sqlite: (the data dir's broker.db), "
    "sqlite:PATH (that database file) or memory: (ephemeral, for tests)",
    "init_store": "create an empty store even though the data dir held a broker before "
    "(its database is missing or empty): a new audit history begins",
    "policy": "policy file (TOML); without it a development policy is created in the data dir",
    "issuer": "the `iss` of broker tokens (default: the HTTP endpoint's URL)",
    "signing_alg": "ES256 or RS256: the default algorithm (run credentials, checkpoints, and "
    "audiences the policy names no algorithm for)",
    "signing_key": "PEM private key to sign with (default: created in the data dir)",
    "key_prepublish": "seconds a rotated-in signing key is in the JWKS before it signs (longer "
    "than relying parties cache the JWKS); keys rotate --emergency skips it",
    "tls_cert": "server certificate (PEM)",
    "tls_key": "server private key (PEM)",
    "http_tls_cert": "certificate (PEM) for the HTTP port: discovery and the JWKS over HTTPS, "
    "the default issuer https://",
    "http_tls_key": "private key (PEM) for --http-tls-cert",
    "client_ca": "CA bundle for client certificates; every caller must then present one (mTLS)",
    "insecure": "allow plaintext on a non-loopback address (warns loudly)",
    "executor_target": "gRPC address of a PipelineExecutorService to hand delegated runs to",
    "executor_dpop_jwk": "the executor's public JWK (JSON file): run credentials handed to it "
    "are bound to that key (DPoP, RFC 9449) unless the request named another",
    "log_level": "debug, info, warning or error",
    "log_format": "json or text",
    "max_workers": "threads serving unary calls (per process); more only helps calls that "
    "wait, such as hand-offs to a slow executor",
    "max_audit_streams": "live StreamAudit streams per process, all principals together (each "
    "holds a thread of the streams' own pool)",
    "workers": "broker processes serving one address (SO_REUSEPORT) over one store; "
    "a supervisor restarts any that dies (needs sqlite: or postgresql://)",
    "shutdown_grace": "seconds in-flight calls get to finish on SIGTERM",
    "reap_interval": "seconds between checks for runs past their deadline or lease",
    "otel_console": "print OpenTelemetry spans to stderr",
    "audit_checkpoint_events": "sign a checkpoint of the audit chain after this many events",
    "audit_checkpoint_interval": "... or after this many seconds, if any event was written",
    "audit_retention_days": "delete audit events older than this, whole checkpointed ranges "
    "only (0 = keep forever)",
    "audit_log_key": "Ed25519 PEM key that signs audit tree heads and exports, with its "
    ".vkey beside it (default: audit-log-key.pem in the data dir, created)",
    "witness_key": "a witness's cosignature key (the witness.vkey `token-broker witness` "
    "writes); repeat for each witness whose cosignatures the broker accepts",
    "witness_quorum": "cosignatures by distinct --witness-key witnesses that make a tree head "
    "final (0 = off)",
    "max_request_bytes": "largest request message accepted (larger: RESOURCE_EXHAUSTED)",
    "peer_rate": "calls per second a peer may make without a valid credential (0 = no limit)",
    "peer_burst": "... at most this many at once",
    "principal_rate": "calls per second per authenticated principal (0 = no limit)",
    "principal_burst": "... at most this many at once",
    "refusal_audit_interval": "seconds over which repeated refusals of one source for one "
    "reason become one audit event with a count",
    "audit_streams_per_principal": "StreamAudit streams one principal may hold open",
    "metric_audiences": "distinct token audiences used as metric labels; the rest are 'other'",
    "idempotency_retention_days": "forget the idempotency keys of runs ended this long ago "
    "(checked hourly; 0 = keep forever)",
}
