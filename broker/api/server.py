"""The gRPC server: TokenBrokerService, health, reflection; graceful start and stop.

`create_server` builds everything and binds the port (tests use port 0); only `serve`
blocks and installs signal handlers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from broker.api import credentials as authn
from broker.api.handoff import GrpcHandoff, traced_channel
from broker.api.interceptor import CallInterceptor
from broker.api.reflectionpool import MethodResolvingPool
from broker.api.servicer import TokenBrokerServicer
from broker.api.wellknown import WellKnownServer
from broker.app import Broker, build_broker
from broker.settings import Settings, is_loopback, split_host_port
from broker.telemetry import setup
from tokenbroker import tracing
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name


@dataclass
class BrokerServer:
    grpc_server: grpc.Server
    port: int
    broker: Broker
    health: health.HealthServicer
    http: WellKnownServer | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.http is not None:
            self.http.start()
        self.grpc_server.start()
        self.broker.start_background()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight unary calls finish, end streams, close the store."""
        grace = self.broker.settings.shutdown_grace if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.broker.feed.close()  # followers return: their streams end cleanly
        self.grpc_server.stop(grace).wait()
        if self.http is not None:
            self.http.stop()
        self.broker.close()


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert is not None and settings.tls_key is not None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    if settings.client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=settings.client_ca.read_bytes(),
        # gRPC Python can only "not ask" or "require and verify": with --client-ca every
        # caller presents a certificate from that CA; a bearer credential, when also sent,
        # names the caller.
        require_client_auth=True,
    )


def _bind_http(settings: Settings) -> tuple[WellKnownServer | None, str]:
    """Bind the discovery endpoint first: with port 0 the issuer URL depends on it."""
    if not settings.http_listen:
        return None, settings.effective_issuer
    host, port = split_host_port(settings.http_listen, "--http-listen")
    http = WellKnownServer(host, port, jwks=lambda: {"keys": []})
    shown = f"[{host}]" if ":" in host else host
    issuer = settings.issuer.rstrip("/") or f"http://{shown}:{http.port}"
    http.issuer = issuer
    return http, issuer


def create_server(
    settings: Settings,
    *,
    broker: Broker | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> BrokerServer:
    """Providers are used when the broker is built here; a given broker brings its own."""
    http, issuer = _bind_http(settings)
    handoff = GrpcHandoff(settings.executor_target) if settings.executor_target else None
    if broker is None:
        broker = build_broker(
            settings,
            issuer=issuer,
            handoff=handoff,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
    if http is not None:
        http.set_jwks_source(broker.keys.jwks)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        # Tracing outermost: the call context and its errors happen inside the server span.
        interceptors=[
            tracing.ServerTracingInterceptor(
                broker.telemetry.tracer_provider, broker.telemetry.meter_provider
            ),
            CallInterceptor(authenticate=authn.authenticator(broker.authn)),
        ],
        options=[("grpc.so_reuseport", 0)],
    )
    broker_pb2_grpc.add_TokenBrokerServiceServicer_to_server(TokenBrokerServicer(broker), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
        pool=MethodResolvingPool(),
    )
    credentials = _credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError as exc:
        broker.close()
        if http is not None:
            http.stop()
        raise OSError(f"cannot listen on {settings.listen}: {exc}") from exc
    if handoff is not None:
        telemetry = broker.telemetry
        handoff.instrument(lambda channel: traced_channel(channel, telemetry))
        host, _ = split_host_port(settings.listen, "--listen")
        handoff.broker_target = f"{host}:{port}"  # the port is known only now
    return BrokerServer(server, port, broker, health_servicer, http)


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; return the process exit code."""
    if not settings.tls_enabled and not is_loopback(settings.listen):
        log.warning(
            "INSECURE: serving plaintext gRPC on a non-loopback address; credentials and "
            "tokens cross the network unencrypted",
            extra={"listen": settings.listen},
        )
    providers = setup.providers_from_env(settings, os.environ)
    try:
        server = create_server(
            settings,
            tracer_provider=providers.tracer_provider,
            meter_provider=providers.meter_provider,
        )
    except BaseException:
        providers.shutdown()
        raise
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stopping.set()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        log.info("reloading the policy", extra={"signal": "SIGHUP"})
        server.broker.policy.reload_in_background()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    server.start()
    log.info(
        "token-broker serving",
        extra={
            "listen": settings.listen,
            "port": server.port,
            "store": settings.store,
            "data_dir": str(settings.data_dir),
            "tls": settings.tls_enabled,
            "http_port": server.http.port if server.http else None,
            "issuer": server.broker.tokens.issuer,
        },
    )
    stopping.wait()
    server.stop()
    providers.shutdown()
    log.info("token-broker stopped")
    return 0
