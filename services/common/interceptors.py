"""Server interceptor: one structured log line and Prometheus metrics per call, and the one place
that turns a request the server cannot even parse into INVALID_ARGUMENT.

Log levels follow whose fault a call's end was: OK and the caller's own outcomes (bad request,
not found, cancelled, deadline passed, ...) are INFO; UNAVAILABLE (a dependency down) and
UNIMPLEMENTED (a method of the proto this build does not serve: a client newer than the server)
are WARNING; INTERNAL / UNKNOWN / DATA_LOSS are ERROR. A cancelled, expired or malformed call
is never logged as a server error; it is counted (`deltarec_grpc_errors_total{code}` and
`deltarec_grpc_client_ended_total{reason}`).
"""
from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import Counter, Histogram

log = logging.getLogger("deltarec.access")

CALLS = Counter("deltarec_grpc_calls_total", "gRPC calls handled", ["service", "method"])
ERRORS = Counter("deltarec_grpc_errors_total", "gRPC calls that ended with a non-OK status",
                 ["service", "method", "code"])
CLIENT_ENDED = Counter("deltarec_grpc_client_ended_total",
                       "Calls ended by the client: cancelled, deadline passed, or unparsable request",
                       ["service", "method", "reason"])
LATENCY = Histogram("deltarec_grpc_latency_seconds", "gRPC call duration", ["service", "method"],
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0, 30.0))

SERVER_FAULTS = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
DEGRADED = {"UNAVAILABLE", "UNIMPLEMENTED"}
CLIENT_ENDINGS = {"CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline_exceeded"}


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


def level_of(code: str) -> int:
    if code in SERVER_FAULTS:
        return logging.ERROR
    if code in DEGRADED:
        return logging.WARNING
    return logging.INFO


class Malformed:
    """What the request deserializer returns for bytes that are not a valid message (wrong
    wire format, invalid UTF-8 in a string field): the handler answers INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name, self.error = type_name, error

    def message(self) -> str:
        return (f"request: not a valid {self.type_name} message "
                f"({type(self.error).__name__}; e.g. invalid UTF-8 in a string field)")


def _tolerant(deserializer):
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    type_name = getattr(owner, "DESCRIPTOR", None)
    type_name = type_name.full_name if type_name is not None else "request"

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the caller's
            return Malformed(type_name, error)
    return deserialize


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Wraps every handler; works for all four call shapes.

    The wrapped handler is built once per method and reused while the handler it wraps is the
    same object (a server's registered handler; an interceptor after this one that makes a
    handler per call, like authentication, gets it wrapped per call): building the closures
    and the tolerant deserializer on every call cost ~20 us of a call's Python time
    (bench/ranker.py)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        found = self._wrapped.get(full_method)
        if found is not None and found[0] is handler:
            return found[1]
        wrapped = self._wrap(handler, full_method)
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        service, method, calls, latency = _per_method(full_method)

        def record(context, started: float, failure: BaseException | None, malformed: bool) -> None:
            elapsed = time.perf_counter() - started
            code = _status_of(context)
            if failure is not None and code == "OK":
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = "DEADLINE_EXCEEDED"
                else:
                    code = "CANCELLED" if not context.is_active() else "UNKNOWN"
            calls.inc()
            latency.observe(elapsed)
            if code != "OK":
                ERRORS.labels(service, method, code).inc()
            reason = "malformed" if malformed else CLIENT_ENDINGS.get(code)
            if reason:
                CLIENT_ENDED.labels(service, method, reason).inc()
            level = level_of(code)
            if log.isEnabledFor(level):   # the line's fields (peer: a C call) only when logged
                log.log(level, "rpc", extra={"method": f"{service}/{method}", "code": code,
                                             "duration_ms": round(elapsed * 1000, 3), "peer": context.peer()})

        def reject(context, request: Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())

        def checked(request_iterator, context, flag: list):
            for request in request_iterator:
                if isinstance(request, Malformed):
                    flag[0] = True
                    reject(context, request)
                yield request

        def unimplemented(context):
            # The generated base servicer raises NotImplementedError (grpc would log it with a
            # traceback as an application error): answer UNIMPLEMENTED plainly instead.
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{service}/{method} is not served by this build")

        def wrap_unary(behaviour, streaming_request: bool):
            def wrapped(request, context):
                started, failure, malformed = time.perf_counter(), None, [False]
                try:
                    if streaming_request:
                        request = checked(request, context, malformed)
                    elif isinstance(request, Malformed):
                        malformed[0] = True
                        reject(context, request)
                    try:
                        return behaviour(request, context)
                    except NotImplementedError:
                        unimplemented(context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    record(context, started, failure, malformed[0])
            return wrapped

        def wrap_stream(behaviour, streaming_request: bool):
            def wrapped(request, context):
                started, failure, malformed = time.perf_counter(), None, [False]
                try:
                    if streaming_request:
                        request = checked(request, context, malformed)
                    elif isinstance(request, Malformed):
                        malformed[0] = True
                        reject(context, request)
                    try:
                        yield from behaviour(request, context)
                    except NotImplementedError:
                        unimplemented(context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    record(context, started, failure, malformed[0])
            return wrapped

        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        return wrap_handler(handler, wrap_unary, wrap_stream)


def wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped: `wrap_unary(behaviour, streaming_request)` for unary
    responses, `wrap_stream(behaviour, streaming_request)` (a generator wrapper) for streamed ones."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary, False))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary(handler.stream_unary, True))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream, False))
    return handler._replace(stream_stream=wrap_stream(handler.stream_stream, True))
