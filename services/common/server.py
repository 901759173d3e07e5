"""Server bootstrap shared by every DeltaRec service.

`GrpcService` owns the gRPC server, the health service (NOT_SERVING until the
service says it is ready and again as soon as shutdown begins, so load balancers
drain us first), server reflection (grpcurl works without proto files), the
observability interceptor, the Prometheus endpoint (metrics_http.py: HTTPS when TLS is
configured) and graceful shutdown on
SIGTERM/SIGINT (in-flight calls get `shutdown_grace_s` to finish).
"""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import limits, metrics_http, tls
from services.common.auth import AuthInterceptor, Authorizer
from services.common.handler_pool import HandlerPool
from services.common.interceptors import ObservabilityInterceptor
from services.common.reflection_pool import MethodResolvingPool
from services.contracts.ready_line import ready_line

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The largest message any DeltaRec service sends or accepts (per-service limits: limits.py).
MAX_MESSAGE_BYTES = limits.LARGEST_MESSAGE_BYTES


class GrpcService:
    def __init__(self, name: str, service_names: Iterable[str], *, port: int = 0,
                 metrics_port: int | None = 0, workers: int = 16, grace_s: float = 10.0,
                 host: str = "127.0.0.1", max_connection_age_s: float = 0.0, security=None,
                 health_port: int | None = None, reuse_port: bool = False,
                 own_port: int | None = None, running_handlers: int = 0) -> None:
        """`security`: a SecurityConfig (TLS, mutual TLS, authentication, limits); None serves
        plaintext without authentication and with the services' default limits. `health_port`:
        an extra plaintext port serving the health service alone (None: none; 0: a free port).
        `reuse_port`: `port` (and `health_port`) are bound with SO_REUSEPORT, shared with other
        processes of the same service (the ranker's workers, services/ranker/workers.py); without
        it a port in use is an error. `own_port`: one more port for the same services, not
        shared (0: a free one; `self.own_port`), where this very process is reached.
        `running_handlers`: at most this many of the `workers` handler threads run at once, the
        others being calls inside a `blocking()` wait (handler_pool.py); 0: all of them."""
        self.name = name
        self.service_names = list(service_names)
        self.grace_s = grace_s
        self._stopped = threading.Event()
        self._stopping_hooks: list[Callable[[], None]] = []
        self._shutdown_hooks: list[Callable[[], None]] = []
        interceptors = [ObservabilityInterceptor()]
        if security is not None and security.auth_enabled:
            interceptors.append(AuthInterceptor(Authorizer.from_config(security)))
            if not tls.server_tls_enabled(security):
                log.warning("authentication without TLS: tokens cross the network in clear")
        self.limits = limits.server_limits(
            self.service_names, *((security.grpc_max_receive_bytes, security.grpc_max_send_bytes)
                                  if security is not None else ()))
        metadata_bytes = security.grpc_max_metadata_bytes if security is not None else limits.METADATA_BYTES
        # Off unless asked: another process on the port is a conflict to report, not a share.
        reuse = [("grpc.so_reuseport", 1 if reuse_port else 0)]
        options = limits.server_options(self.limits, metadata_bytes) + reuse
        if max_connection_age_s > 0:
            # GOAWAY after this age: clients reconnect and re-resolve their dns:/// target, so
            # replicas added since (HPA) get their share. No grace limit: streams in flight (the
            # delta stream, WatchItems) finish on the old connection.
            options.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
        self.handler_pool = (HandlerPool(running_handlers, workers, name=f"{name}-rpc")
                             if 0 < running_handlers < workers else None)
        self.server = grpc.server(
            self.handler_pool or futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-rpc"),
            interceptors=interceptors,
            # Past this many calls in flight gRPC answers RESOURCE_EXHAUSTED itself: overload is
            # refused early instead of queueing without bound in front of the handler threads.
            maximum_concurrent_rpcs=workers * 4,
            options=options)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if security is None or security.reflection_access != "off":
            reflection.enable_server_reflection(
                self.service_names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                      reflection.SERVICE_NAME], self.server, pool=MethodResolvingPool())
        self._set_health(NOT_SERVING)
        self.certificates = None     # the TLS certificate fetcher (reloads on file change)
        credentials = None
        if tls.server_tls_enabled(security):
            credentials, self.certificates = tls.server_credentials(security)
        self.port = self._add_port(host, port, credentials)
        self.own_port = None if own_port is None else self._add_port(host, own_port, credentials)
        # Kubelet's gRPC probes speak neither TLS nor mTLS: with TLS on, they get a plaintext port
        # of their own that serves the same health status and nothing else (no other service is
        # registered on this server; health is open on the main port too).
        self.health_server, self.health_port = None, None
        if health_port is not None:
            self.health_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{name}-health"),
                maximum_concurrent_rpcs=16,
                options=limits.server_options(limits.DEFAULT_LIMITS, metadata_bytes) + (reuse if reuse_port else []))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{host}:{health_port}")
            if self.health_port == 0:
                raise RuntimeError(f"could not bind health port {host}:{health_port}")
        self.metrics_port = None
        self.metrics = None          # the Prometheus endpoint (HTTPS when TLS is configured)
        if metrics_port is not None:
            self.metrics = metrics_http.start(host, metrics_port, security)
            self.metrics_port = self.metrics.port

    def _add_port(self, host: str, port: int, credentials) -> int:
        bound = (self.server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None
                 else self.server.add_insecure_port(f"{host}:{port}"))
        if bound == 0:
            raise RuntimeError(f"could not bind gRPC port {host}:{port}")
        return bound

    @classmethod
    def from_config(cls, name: str, service_names: Iterable[str], config) -> "GrpcService":
        """From a config carrying the CommonConfig fields (ports, workers, grace, host, security)."""
        health_port = getattr(config, "health_port", -1)
        return cls(name, service_names, port=config.grpc_port, metrics_port=config.metrics_port,
                   workers=config.grpc_workers, grace_s=config.shutdown_grace_s, host=config.bind_host,
                   max_connection_age_s=getattr(config, "max_connection_age_s", 0.0), security=config,
                   health_port=None if health_port < 0 else health_port,
                   reuse_port=getattr(config, "reuse_port", False), own_port=getattr(config, "own_port", None),
                   running_handlers=getattr(config, "grpc_running_handlers", 0))

    def _set_health(self, status) -> None:
        self.health.set("", status)
        for service_name in self.service_names:
            self.health.set(service_name, status)

    def on_stopping(self, hook: Callable[[], None]) -> None:
        """Runs as soon as shutdown begins (no new calls are accepted), while in-flight calls
        still have their grace period: for calls that never end by themselves, such as
        long-lived streams, which would otherwise hold the shutdown for the whole grace."""
        self._stopping_hooks.append(hook)

    def on_shutdown(self, hook: Callable[[], None]) -> None:
        """Runs after in-flight calls finished (or the grace period ran out)."""
        self._shutdown_hooks.append(hook)

    def start(self) -> None:
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        log.info("listening", extra={"grpc_port": self.port, "metrics_port": self.metrics_port,
                                     "health_port": self.health_port})

    def set_ready(self, ready: bool = True) -> None:
        self._set_health(SERVING if ready else NOT_SERVING)
        log.info("ready" if ready else "not ready")

    def stop(self, grace_s: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(NOT_SERVING)
        grace = self.grace_s if grace_s is None else grace_s
        log.info("shutting down", extra={"grace_s": grace})
        terminated = self.server.stop(grace)
        self._run_hooks(self._stopping_hooks)
        terminated.wait()
        if self.handler_pool is not None:
            self.handler_pool.shutdown(wait=False)
        self._run_hooks(self._shutdown_hooks)
        if self.health_server is not None:
            self.health_server.stop(0)
        log.info("stopped")

    @staticmethod
    def _run_hooks(hooks: list[Callable[[], None]]) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - keep shutting down the rest
                log.exception("shutdown hook failed")

    def install_signal_handlers(self) -> None:
        def handle(signum, _frame):
            log.info("signal", extra={"signal": signal.Signals(signum).name})
            # stop() blocks for the grace period: not inside the signal handler.
            threading.Thread(target=self.stop, name="shutdown", daemon=True).start()
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def wait(self) -> None:
        self._stopped.wait()
        self.server.wait_for_termination()


def run_service(service: GrpcService, ready_check: Callable[[], None] | None = None) -> None:
    """Start, announce readiness once `ready_check` passes, block until a signal stops us."""
    service.install_signal_handlers()
    service.start()
    if ready_check is not None:
        ready_check()
    service.set_ready(True)
    print(ready_line(service.name, service.port, service.metrics_port), flush=True)
    service.wait()
