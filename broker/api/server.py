"""The gRPC server: TokenBrokerService, health, reflection; graceful start and stop.

`create_server` builds everything and binds the port (tests use port 0); only `serve`
blocks and installs signal handlers.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.api import authn
from broker.api.calls import CallInterceptor
from broker.api.servicer import TokenBrokerServicer
from broker.app import Broker, build_broker
from broker.settings import Settings, is_loopback
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name


@dataclass
class BrokerServer:
    grpc_server: grpc.Server
    port: int
    broker: Broker
    health: health.HealthServicer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
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


def create_server(settings: Settings, *, broker: Broker | None = None) -> BrokerServer:
    broker = broker if broker is not None else build_broker(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[CallInterceptor(authenticate=authn.authenticator(broker.authn))],
        options=[("grpc.so_reuseport", 0)],
    )
    broker_pb2_grpc.add_TokenBrokerServiceServicer_to_server(TokenBrokerServicer(broker), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = _credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError as exc:
        broker.close()
        raise OSError(f"cannot listen on {settings.listen}: {exc}") from exc
    return BrokerServer(server, port, broker, health_servicer)


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; return the process exit code."""
    if not settings.tls_enabled and not is_loopback(settings.listen):
        log.warning(
            "INSECURE: serving plaintext gRPC on a non-loopback address; credentials and "
            "tokens cross the network unencrypted",
            extra={"listen": settings.listen},
        )
    server = create_server(settings)
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
        },
    )
    stopping.wait()
    server.stop()
    log.info("token-broker stopped")
    return 0
