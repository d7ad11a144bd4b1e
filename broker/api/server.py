"""The gRPC server: TokenBrokerService, health, reflection; graceful start and stop.

`create_server` checks what can be checked before it writes anything — the policy file
(when given), the TLS files, both addresses (bound, so nobody takes them meanwhile) — and
only then builds the broker, which may create a development policy, keys and audit events
in the data dir. A taken port is thus one clear `ListenError`, with the data dir untouched.
Tests bind port 0; only `serve` blocks and installs signal handlers.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from broker import limits
from broker.api import credentials as authn
from broker.api.decoding import DecodeGuard
from broker.api.handoff import GrpcHandoff, traced_channel
from broker.api.http import HttpServer, broker_routes, metrics_routes, tls_context
from broker.api.http.oauth import carries_credentials_safely
from broker.api.interceptor import CallInterceptor
from broker.api.reflectionpool import MethodResolvingPool
from broker.api.servicer import TokenBrokerServicer
from broker.app import Broker, Readiness, build_broker
from broker.clock import Clock, system_clock
from broker.policy.file import load_policy
from broker.runs.binding import UNBOUND, Binding, jkt_of_jwk_file
from broker.runs.keys import load_private_key
from broker.settings import Settings, SettingsError, is_loopback, split_host_port
from broker.telemetry import logs, setup
from tokenbroker import tracing
from tokenbroker.v1 import broker_pb2, broker_pb2_grpc

if TYPE_CHECKING:  # the Prometheus exporter is imported only where /metrics is served
    from broker.api.http.workermetrics import WorkerScrape
    from broker.telemetry.scrape import PrometheusScrape

log = logging.getLogger(__name__)

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name
# Health name for "takes writes": NOT_SERVING while storage refuses them (a full disk), when
# SERVICE_NAME stays SERVING because reads and verification still work ("" is NOT_SERVING: not
# ready for everything, as /readyz says).
WRITES_HEALTH_NAME = "tokenbroker.v1.writes"
READINESS_PROBE_INTERVAL = 1.0
SIGNAL_POLL_INTERVAL = 1.0
# Threads of the streams' pool beyond --max-audit-streams: health watches and reflection.
OTHER_STREAMS = 8


class ListenError(OSError):
    """An address the broker cannot listen on (taken, not local, not allowed)."""


@dataclass(frozen=True)
class WorkerSlot:
    """This process is worker `index` of `count` started by `serve --workers`
    (broker.api.workers): the supervisor checked and reserved the addresses, binds nothing
    itself but shares the gRPC port (SO_REUSEPORT), and holds the store for its workers
    (`held_lock`, an inherited descriptor; None for PostgreSQL)."""

    index: int
    count: int
    held_lock: int | None = None
    ready_fd: int = -1  # written once serving: the supervisor waits for it
    # A worker other than 0, when the HTTP port serves: the loopback port where it serves its
    # own /metrics for worker 0 to fetch (broker.api.http.workermetrics).
    metrics_port: int | None = None
    # Worker 0: (index, metrics_port) of every other worker, whose metrics its /metrics holds.
    metrics_peers: tuple[tuple[int, int], ...] = ()

    @property
    def serves_metrics(self) -> bool:
        """Whether this worker needs a Prometheus reader although it has no HTTP port."""
        return self.metrics_port is not None


@dataclass
class BrokerServer:
    grpc_server: grpc.Server
    port: int
    broker: Broker
    health: health.HealthServicer
    http: HttpServer | None = None
    servicer: TokenBrokerServicer | None = None
    streams: futures.Executor | None = None  # the streaming calls' own pool
    metrics_http: HttpServer | None = None  # a worker's private /metrics (WorkerSlot)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _writes_ready: bool | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.http is not None:
            self.http.start()
        if self.metrics_http is not None:
            self.metrics_http.start()
        self.grpc_server.start()
        self.broker.start_background()
        self.probe_readiness()
        threading.Thread(target=self._watch_readiness, name="readiness", daemon=True).start()

    def probe_readiness(self) -> Readiness:
        """Set the health statuses from the broker's readiness now (the same answer `/readyz`
        gives): "" is SERVING only when ready; the service stays SERVING while it answers
        calls (reads and verification work on a full disk); WRITES_HEALTH_NAME follows the
        store. Logs each change of the store's state."""
        readiness = self.broker.readiness()
        if self._stopping.is_set():
            return readiness
        self.health.set("", _status(readiness.ready))
        self.health.set(SERVICE_NAME, _status(not readiness.draining))
        self.health.set(WRITES_HEALTH_NAME, _status(readiness.store_writable))
        if readiness.store_writable != self._writes_ready:
            self._writes_ready = readiness.store_writable
            if readiness.store_writable:
                log.info("storage takes writes", extra={"health": WRITES_HEALTH_NAME})
            else:
                log.error(
                    "storage cannot take writes (disk full or read-only): serving reads and "
                    "verification only; writes fail with UNAVAILABLE until it can",
                    extra={"health": WRITES_HEALTH_NAME},
                )
        return readiness

    def _watch_readiness(self) -> None:
        while not self._stopping.wait(READINESS_PROBE_INTERVAL):
            self.probe_readiness()

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight unary calls finish within
        `grace`, end live audit streams (UNAVAILABLE, saying where to resume), close the store.

        gRPC cancels what it had queued but not handed to a handler, and what is still
        running when the grace ends: clients see CANCELLED, which the client library
        retries like UNAVAILABLE where that is safe (tokenbroker.retry)."""
        grace = self.broker.settings.shutdown_grace if grace is None else grace
        self.broker.draining.set()  # /readyz answers 503 from now on
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.broker.feed.close()  # followers end with UNAVAILABLE: resume elsewhere or later
        self.grpc_server.stop(grace).wait()
        if self.streams is not None:
            self.streams.shutdown(wait=False)
        if self.http is not None:
            self.http.stop()
        if self.metrics_http is not None:
            self.metrics_http.stop()
        self.broker.close()


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    if serving:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


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


def _bind_http(settings: Settings) -> tuple[HttpServer | None, str]:
    """Bind the discovery endpoint first: with port 0 the issuer URL depends on it."""
    if not settings.http_listen:
        return None, settings.effective_issuer
    host, port = split_host_port(settings.http_listen, "--http-listen")
    tls = _http_tls(settings)
    try:
        http = HttpServer(host, port, tls)
    except OSError as exc:
        raise _listen_error(settings.http_listen, "--http-listen", exc) from None
    shown = f"[{host}]" if ":" in host else host
    issuer = settings.issuer.rstrip("/") or f"{http.scheme}://{shown}:{http.port}"
    return http, issuer


def _http_tls(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP port's TLS context; a certificate that cannot be used stops the start."""
    if settings.http_tls_cert is None or settings.http_tls_key is None:
        return None
    try:
        return tls_context(settings.http_tls_cert, settings.http_tls_key)
    except ssl.SSLError as exc:
        raise SettingsError(
            f"--http-tls-cert {settings.http_tls_cert} / --http-tls-key "
            f"{settings.http_tls_key}: not a matching PEM certificate and key ({exc.reason})"
        ) from None


def _check_signing_key(settings: Settings) -> None:
    """An external signing key that cannot be used stops the start before the store opens."""
    if settings.signing_key is None:
        return
    try:
        load_private_key(settings.signing_key)  # OSError names the file itself
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = (
            str(exc)
            if "signing keys must" in str(exc)
            else ("not an unencrypted PEM private key (EC P-256 or RSA)")
        )
        raise SettingsError(f"--signing-key {settings.signing_key}: {reason}") from None


def _executor_binding(settings: Settings) -> Binding:
    """The key run credentials handed to the executor are bound to (--executor-dpop-jwk);
    a file that is not a usable public JWK stops the start."""
    if settings.executor_dpop_jwk is None:
        return UNBOUND
    try:
        return Binding(jkt=jkt_of_jwk_file(settings.executor_dpop_jwk))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(f"--executor-dpop-jwk {settings.executor_dpop_jwk}: {reason}") from None
    except ValueError as exc:
        raise SettingsError(f"--executor-dpop-jwk {settings.executor_dpop_jwk}: {exc}") from None


def _listen_error(address: str, flag: str, exc: OSError | None) -> ListenError:
    reason = "it could not be bound"
    if exc is not None and exc.errno is not None:
        reason = os.strerror(exc.errno).lower()
    elif exc is not None:
        reason = str(exc)
    if exc is not None and exc.errno == errno.EACCES:
        reason += " (ports below 1024 need privileges)"
    return ListenError(f"cannot listen on {address} ({flag}): {reason}")


def _check_address(address: str) -> None:
    """Raise ListenError unless some local address of `address` can be bound now.

    gRPC's own bind failure is a line of C-core log and "Failed to bind"; a plain socket
    says why first. gRPC listens if any resolved address binds, and so does this check."""
    host, port = split_host_port(address, "--listen")
    try:
        candidates = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address} (--listen): {exc.strerror}") from None
    first: OSError | None = None
    for family, kind, proto, _, where in candidates:
        try:
            with socket.socket(family, kind, proto) as probe:
                # As gRPC does, so that connections in TIME_WAIT do not count as taken.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(where)
                return
        except OSError as exc:
            first = first or exc
    raise _listen_error(address, "--listen", first)


class _LateInterceptors(grpc.ServerInterceptor):
    """The interceptor chain, installed once the broker exists: gRPC takes interceptors
    when the server is made, and the server is made (and bound) before the broker.

    gRPC asks the interceptors for a method's handler on every call; the wrapped handler of
    a method never changes (the per-call work happens inside it), so it is built once per
    method and kept. Only methods that exist are kept: a name a caller makes up finds no
    handler and is not remembered."""

    def __init__(self, *first: grpc.ServerInterceptor, streams: futures.Executor) -> None:
        self._first = first
        self.streams = streams
        self._chain: Sequence[grpc.ServerInterceptor] = first
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def install(self, *chain: grpc.ServerInterceptor) -> None:
        self._chain = (*self._first, *chain)
        self._handlers = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            return handler
        # The first interceptor is outermost, as in grpc.server(interceptors=[...]).
        call = continuation
        for interceptor in reversed(self._chain):
            call = _bound(interceptor, call)
        handler = call(handler_call_details)
        if handler is not None:
            _on_pool(handler, self.streams)
            self._handlers[handler_call_details.method] = handler
        return handler


def _on_pool(handler: grpc.RpcMethodHandler[Any, Any], streams: futures.Executor) -> None:
    """Streaming calls run on a pool of their own (grpcio's per-method thread pool): a live
    audit stream holds its thread for as long as it follows the log, so with one pool for
    both, streams could take every thread unary calls need, and the pool had to be sized for
    the streams (tests/test_server_pools.py; figures in docs/performance.md)."""
    for behavior in (handler.unary_stream, handler.stream_stream):
        if behavior is not None:
            behavior.experimental_thread_pool = streams  # type: ignore[union-attr]


def _bound(
    interceptor: grpc.ServerInterceptor,
    continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
) -> Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None]:
    return lambda details: interceptor.intercept_service(continuation, details)


def _bind_grpc(
    settings: Settings, worker: WorkerSlot | None = None
) -> tuple[grpc.Server, int, _LateInterceptors]:
    credentials = _credentials(settings)
    if worker is None:
        _check_address(settings.listen)  # a worker's supervisor checked and holds it
    streams = futures.ThreadPoolExecutor(
        max_workers=settings.max_audit_streams + OTHER_STREAMS, thread_name_prefix="stream"
    )
    # An undecodable body is refused first, before any span, authentication or audit.
    interceptors = _LateInterceptors(DecodeGuard(), streams=streams)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[interceptors],
        options=[
            # One process alone must be told when its port is taken; the workers of one
            # `serve --workers` share theirs, which their supervisor holds for them.
            ("grpc.so_reuseport", 0 if worker is None else 1),
            # Explicit, documented message limits: a request larger than any valid one is
            # refused by gRPC itself (RESOURCE_EXHAUSTED) before it is read into memory, and
            # no reply may exceed what a default gRPC client accepts (4 MiB).
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", limits.MAX_REPLY_BYTES),
        ],
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError:  # taken between the check and now
        raise _listen_error(settings.listen, "--listen", None) from None
    return server, port, interceptors


def create_server(
    settings: Settings,
    *,
    broker: Broker | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    clock: Clock = system_clock,
    worker: WorkerSlot | None = None,
    scrape: PrometheusScrape | None = None,
) -> BrokerServer:
    """Providers and `clock` are used when the broker is built here (tests pass a fake
    clock; the issuer is then the bound HTTP port's URL); a given broker brings its own.
    `worker`: this process is one of the workers of `serve --workers`.

    Raises PolicyError, OSError (TLS files) or ListenError before anything is written."""
    if broker is None:
        if settings.policy is not None:
            load_policy(settings.policy)  # every problem of the file, before anything else
        _check_signing_key(settings)
    executor_binding = _executor_binding(settings)
    http, issuer = _bind_http(settings)
    try:
        server, port, interceptors = _bind_grpc(settings, worker)
    except BaseException:
        if http is not None:
            http.stop()
        raise
    handoff = (
        GrpcHandoff(settings.executor_target, executor_binding)
        if settings.executor_target
        else None
    )
    if broker is None:
        try:
            broker = build_broker(
                settings,
                issuer=issuer,
                handoff=handoff,
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
                clock=clock,
                held_lock=worker.held_lock if worker is not None else None,
                scrape=scrape,
            )
        except BaseException:
            server.stop(None)
            if http is not None:
                http.stop()
            raise
    if http is not None:
        http.mount(broker_routes(broker, issuer, every_worker=_every_worker(worker)))
    metrics_http = _bind_worker_metrics(worker, broker)
    # Tracing outermost: the call context and its errors happen inside the server span.
    listen_host, _ = split_host_port(settings.listen, "--listen")
    interceptors.install(
        tracing.ServerTracingInterceptor(
            broker.telemetry.tracer_provider,
            broker.telemetry.meter_provider,
            server=tracing.listen_attributes(listen_host, port),
        ),
        CallInterceptor(
            authenticate=authn.authenticator(broker.authn, broker.throttle),
            served_by=str(worker.index) if worker is not None and worker.count > 1 else "",
        ),
    )
    servicer = TokenBrokerServicer(broker)
    broker_pb2_grpc.add_TokenBrokerServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
        pool=MethodResolvingPool(),
    )
    if handoff is not None:
        telemetry, executor = broker.telemetry, settings.executor_target
        handoff.instrument(lambda channel: traced_channel(channel, telemetry, executor))
        handoff.broker_target = f"{listen_host}:{port}"  # the port is known only now
    return BrokerServer(
        server,
        port,
        broker,
        health_servicer,
        http,
        servicer,
        streams=interceptors.streams,
        metrics_http=metrics_http,
    )


def _every_worker(worker: WorkerSlot | None) -> WorkerScrape | None:
    """Worker 0's view of the other workers' metrics, when it has any."""
    if worker is None or not worker.metrics_peers:
        return None
    from broker.api.http.workermetrics import Peer, WorkerScrape  # imports prometheus_client

    return WorkerScrape([Peer(index, port) for index, port in worker.metrics_peers])


def _bind_worker_metrics(worker: WorkerSlot | None, broker: Broker) -> HttpServer | None:
    """A worker's private /metrics on the loopback port its supervisor picked. A port taken
    meanwhile costs worker 0's scrape this worker (its gauges say so), never the worker."""
    if worker is None or worker.metrics_port is None or broker.telemetry.scrape is None:
        return None  # metrics off (OTEL_METRICS_EXPORTER=none): worker 0 answers 404 itself
    from broker.api.http.workermetrics import PRIVATE_HOST

    try:
        metrics_http = HttpServer(PRIVATE_HOST, worker.metrics_port)
    except OSError as exc:
        log.error(
            "cannot serve this worker's metrics to worker 0; its scrape will lack them",
            extra={"metrics_port": worker.metrics_port, "error": exc.strerror or str(exc)},
        )
        return None
    metrics_http.mount(metrics_routes(broker))
    return metrics_http


def serve(settings: Settings, worker: WorkerSlot | None = None) -> int:
    """Run until SIGTERM or SIGINT; return the process exit code. With `--workers` N > 1
    this process supervises N broker processes instead (broker.api.workers)."""
    if settings.workers > 1 and worker is None:
        from broker.api import workers

        return workers.supervise(settings)
    if worker is None and not settings.tls_enabled and not is_loopback(settings.listen):
        log.warning(
            "INSECURE: serving plaintext gRPC on a non-loopback address; credentials and "
            "tokens cross the network unencrypted",
            extra={"listen": settings.listen},
        )
    discovery_warning = settings.plain_discovery_warning()
    if discovery_warning:
        log.warning(discovery_warning, extra={"http_listen": settings.http_listen})
    if settings.http_listen and not carries_credentials_safely(settings):
        log.warning(
            "token exchange and introspection are off: the HTTP port is plaintext on a "
            "non-loopback address; give --http-tls-cert, or terminate TLS in front and start "
            "with --insecure",
            extra={"http_listen": settings.http_listen},
        )
    providers = setup.providers_from_env(
        settings, os.environ, scrape=worker is not None and worker.serves_metrics
    )
    stop_log_export = (
        logs.export_to(providers.logger_provider) if providers.logger_provider else _nothing
    )
    try:
        server = create_server(
            settings,
            tracer_provider=providers.tracer_provider,
            meter_provider=providers.meter_provider,
            worker=worker,
            scrape=providers.scrape,
        )
    except BaseException:
        stop_log_export()
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
        "token-broker serving" if worker is None else "token-broker worker serving",
        extra={
            "listen": settings.listen,
            "port": server.port,
            "store": settings.store,
            "data_dir": str(settings.data_dir),
            "tls": settings.tls_enabled,
            "http_tls": settings.http_tls_enabled,
            "http_port": server.http.port if server.http else None,
            "issuer": server.broker.tokens.issuer,
        },
    )
    if worker is not None:
        from broker.api import workers

        workers.report_ready(worker, stopping)
    # Wake every second: Python runs a signal handler only on the main thread, when it runs
    # bytecode. Seen once under load: a broker that ignored SIGTERM for good, its main thread
    # asleep in an untimed wait here and every other thread idle (py-spy) — the signal had
    # set its flag without waking this thread.
    while not stopping.wait(SIGNAL_POLL_INTERVAL):
        pass
    server.stop()
    log.info("token-broker stopped")
    stop_log_export()
    providers.shutdown()
    return 0


def _nothing() -> None:
    pass
