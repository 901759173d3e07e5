"""Server interceptor: one structured log line and Prometheus metrics per call."""
from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import Counter, Histogram

log = logging.getLogger("deltarec.access")

CALLS = Counter("deltarec_grpc_calls_total", "gRPC calls handled", ["service", "method"])
ERRORS = Counter("deltarec_grpc_errors_total", "gRPC calls that ended with a non-OK status",
                 ["service", "method", "code"])
LATENCY = Histogram("deltarec_grpc_latency_seconds", "gRPC call duration", ["service", "method"],
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0, 30.0))


# Per method: (service, method, calls counter, latency histogram), looked up once — a labels()
# call takes a lock and builds a key, on every call of a hot path (bench/ranker.py --profile).
_PER_METHOD: dict[str, tuple] = {}


def _per_method(full_method: str) -> tuple:
    found = _PER_METHOD.get(full_method)
    if found is None:
        service, method = _split(full_method)
        found = (service, method, CALLS.labels(service, method), LATENCY.labels(service, method))
        _PER_METHOD[full_method] = found
    return found


def _split(full_method: str) -> tuple[str, str]:
    # "/deltarec.v1.CollectorService/IngestEvents" -> ("deltarec.v1.CollectorService", "IngestEvents")
    _, service, method = full_method.split("/", 2)
    return service, method


def _status_of(context: grpc.ServicerContext) -> str:
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Wraps every handler; works for all four call shapes."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method, calls, latency = _per_method(handler_call_details.method)

        def record(context, started: float, failure: BaseException | None) -> None:
            elapsed = time.perf_counter() - started
            code = _status_of(context)
            if failure is not None and code == "OK":
                code = "CANCELLED" if not context.is_active() else "UNKNOWN"
            calls.inc()
            latency.observe(elapsed)
            if code != "OK":
                ERRORS.labels(service, method, code).inc()
            if log.isEnabledFor(logging.INFO):   # the line's fields (peer: a C call) only when logged
                log.info("rpc", extra={"method": f"{service}/{method}", "code": code,
                                       "duration_ms": round(elapsed * 1000, 3), "peer": context.peer()})

        def wrap_unary(behaviour):
            def wrapped(request, context):
                started, failure = time.perf_counter(), None
                try:
                    return behaviour(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    record(context, started, failure)
            return wrapped

        def wrap_stream(behaviour):
            def wrapped(request, context):
                started, failure = time.perf_counter(), None
                try:
                    yield from behaviour(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    record(context, started, failure)
            return wrapped

        return wrap_handler(handler, wrap_unary, wrap_stream)


def wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped: `wrap_unary` for unary responses, `wrap_stream`
    (a generator wrapper) for streamed responses."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    return handler._replace(stream_stream=wrap_stream(handler.stream_stream))
