"""Where the broker is and how to reach it: channels (sync and asyncio) and the run
environment a pipeline step finds its broker and run credential in.

Transport security follows the target unless told otherwise: a loopback broker
(`127.0.0.1`, `localhost`, `[::1]`) is reached in plaintext — gRPC still sends call
credentials to it, because the connection is local — and anything else over TLS.

Several replicas: a target may list addresses (`10.0.0.5:7000,10.0.0.6:7000`) or name them
through DNS (`dns:///broker.internal:7000`, every A/AAAA record). Calls are then balanced
round-robin, and a replica that stops answering leaves the rotation, so a retried call reaches
a live one.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jwt

from tokenbroker.errors import ConfigurationError

ENV_TARGET = "TOKEN_BROKER_TARGET"
ENV_RUN_CREDENTIAL = "TOKEN_BROKER_RUN_CREDENTIAL"
ENV_RUN_ID = "TOKEN_BROKER_RUN_ID"  # optional: otherwise read from the run credential
ENV_CA_FILE = "TOKEN_BROKER_CA_FILE"  # optional: PEM roots for a broker with a private CA


@dataclass(frozen=True)
class TlsOptions:
    """TLS beyond the defaults: a private CA, and a client certificate for mTLS."""

    root_certificates: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = None


# None: TLS unless the target is loopback. True/False: always/never. TlsOptions: TLS so.
Tls = bool | TlsOptions | None


# gRPC waits up to 2 min (1 s × 1.6ⁿ) between reconnection attempts and gives an attempt
# 20 s to complete its handshake, failing every call at once meanwhile: across a broker
# restart of a few seconds the client's retries all failed without trying. Reconnect
# within a second, and give up on a handshake after 2 s (min_reconnect_backoff is that
# timeout); the retry policy paces the calls.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 2000),
)


_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def _host_of(address: str) -> str:
    return address.rpartition(":")[0].strip("[]") if ":" in address else address


def _addresses(target: str) -> list[str]:
    return [part.strip() for part in target.split(",") if part.strip()]


def is_loopback_target(target: str) -> bool:
    """True when every HOST:PORT of the target is a loopback address or `localhost`."""
    addresses = _addresses(target)
    return bool(addresses) and all(_is_loopback_host(_host_of(a)) for a in addresses)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grpc_target(target: str) -> tuple[str, list[tuple[str, str]]]:
    """The gRPC target and channel options for a broker target: one address as it is;
    several addresses (IP:PORT, comma-separated) or a `dns:///` name balanced round-robin."""
    addresses = _addresses(target)
    if target.startswith("dns:"):
        return target, [("grpc.service_config", _ROUND_ROBIN)]
    if len(addresses) <= 1:
        return target, []
    hosts = ["127.0.0.1" if _host_of(a) == "localhost" else _host_of(a) for a in addresses]
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ConfigurationError(
            f"several targets must each be IP:PORT ({target!r}); "
            "name replicas through DNS with dns:///NAME:PORT instead"
        ) from None
    if len(versions) != 1:
        raise ConfigurationError(f"several targets must be all IPv4 or all IPv6 ({target!r})")
    ports = [a.rpartition(":")[2] for a in addresses]
    if versions == {4}:
        joined = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
        return f"ipv4:{joined}", [("grpc.service_config", _ROUND_ROBIN)]
    joined = ",".join(f"[{h}]:{p}" for h, p in zip(hosts, ports, strict=True))
    return f"ipv6:{joined}", [("grpc.service_config", _ROUND_ROBIN)]


def channel_credentials(
    target: str, credentials: grpc.CallCredentials | None, tls: Tls = None
) -> grpc.ChannelCredentials | None:
    """What a channel to `target` needs; None means a plain insecure channel."""
    use_tls = tls if isinstance(tls, bool) else tls is not None or not is_loopback_target(target)
    if use_tls:
        options = tls if isinstance(tls, TlsOptions) else TlsOptions()
        secure = grpc.ssl_channel_credentials(
            options.root_certificates, options.private_key, options.certificate_chain
        )
    elif credentials is not None:
        # Plaintext that still carries call credentials: only to a local peer.
        secure = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if credentials is None:
        return secure
    return grpc.composite_channel_credentials(secure, credentials)


def open_channel(
    target: str, credentials: grpc.CallCredentials | None, tls: Tls = None
) -> grpc.Channel:
    """A synchronous channel to `target` (one broker, or several replicas)."""
    secure = channel_credentials(target, credentials, tls)
    address, options = grpc_target(target)
    if secure is None:
        return grpc.insecure_channel(address, options=[*RECONNECT_OPTIONS, *options])
    return grpc.secure_channel(address, secure, options=[*RECONNECT_OPTIONS, *options])


def open_aio_channel(
    target: str,
    credentials: grpc.CallCredentials | None,
    tls: Tls = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to `target` (create it inside the event loop that uses it), through
    `interceptors` (a grpc.aio channel takes them when it is made, never later)."""
    secure = channel_credentials(target, credentials, tls)
    address, options = grpc_target(target)
    channel_options = [*RECONNECT_OPTIONS, *options]
    chain = list(interceptors) or None
    if secure is None:
        return grpc.aio.insecure_channel(address, options=channel_options, interceptors=chain)
    return grpc.aio.secure_channel(address, secure, options=channel_options, interceptors=chain)


@dataclass(frozen=True)
class RunEnvironment:
    """What a pipeline step is given, like GITHUB_TOKEN: the broker's address, its run's
    credential and (read from that credential when not given) the run id."""

    target: str
    run_credential: str = field(repr=False)
    run_id: str
    tls: Tls = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RunEnvironment:
        """Read TOKEN_BROKER_TARGET, TOKEN_BROKER_RUN_CREDENTIAL (and the optional
        TOKEN_BROKER_RUN_ID and TOKEN_BROKER_CA_FILE); ConfigurationError if missing."""
        environ = os.environ if environ is None else environ
        missing = [name for name in (ENV_TARGET, ENV_RUN_CREDENTIAL) if not environ.get(name)]
        if missing:
            raise ConfigurationError(
                f"{' and '.join(missing)} not set: a step token needs the broker address and "
                "the run credential its executor puts in the step's environment"
            )
        credential = environ[ENV_RUN_CREDENTIAL].strip()
        run_id = environ.get(ENV_RUN_ID) or run_id_of(credential)
        ca_file = environ.get(ENV_CA_FILE)
        tls = TlsOptions(root_certificates=Path(ca_file).read_bytes()) if ca_file else None
        return cls(environ[ENV_TARGET], credential, run_id, tls)


def run_id_of(run_credential: str) -> str:
    """The run id a run credential names. Read without verifying the signature: the broker
    verifies the credential on every call; this only fills in the request's run id."""
    try:
        claims = jwt.decode(run_credential, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise ConfigurationError(f"{ENV_RUN_CREDENTIAL} is not a run credential") from None
    run_id = claims.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ConfigurationError(f"{ENV_RUN_CREDENTIAL} names no run (no run_id claim)")
    return run_id
