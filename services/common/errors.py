"""Mapping of domain errors to precise gRPC statuses, in one place.

Cores raise these plain exceptions; the gRPC edge (see `grpc_errors`) turns them into
status codes, so no handler ever leaks a stack trace to a client.
"""
from __future__ import annotations

import errno
import functools
import inspect
import logging

import grpc
import psycopg2
import sqlalchemy.exc

from services.common.etcd import EtcdUnavailable

log = logging.getLogger(__name__)

# No status message is longer: a reason may quote a field, never a caller's megabyte (which would
# also overflow gRPC's trailer size limit and turn the answer into RESOURCE_EXHAUSTED).
MAX_STATUS_MESSAGE = 1024


def bounded(message: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 15] + " ...(truncated)"


class DeltaRecError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(DeltaRecError):
    """The request is malformed; the message names the field."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DeltaRecError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(DeltaRecError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(DeltaRecError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DeltaRecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(DeltaRecError):
    code = grpc.StatusCode.ABORTED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, DeltaRecError):
        return exc.code, str(exc)
    # Postgres down or connection lost: the client may retry; nothing was committed.
    # (psycopg2's own classes too: raw connections, used for bulk statements, do not wrap them.)
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                        sqlalchemy.exc.DisconnectionError, psycopg2.OperationalError,
                        psycopg2.InterfaceError)):
        return grpc.StatusCode.UNAVAILABLE, "database unavailable; nothing was committed, retry"
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, "database connection pool exhausted; retry"
    # etcd unreachable (every service that reads or writes a key on a request's path)
    if isinstance(exc, EtcdUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"etcd unavailable: {str(exc)[:200]}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "storage full (artifact store or disk); nothing was published"
    if isinstance(exc, grpc.RpcError):   # a call this handler made to another service failed
        return grpc.StatusCode.UNAVAILABLE, "a service this call depends on is unavailable; retry"
    # A value Postgres refuses (out of range, NUL in text) that an edge check missed: still the
    # request's fault, not the server's. (Edges validate first: services/common/validation.py.)
    if isinstance(exc, (sqlalchemy.exc.DataError, psycopg2.DataError)):
        log.warning("a request value reached the store unchecked", extra={"error": str(exc)[:200]})
        return grpc.StatusCode.INVALID_ARGUMENT, "a request value is out of the range the store accepts"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def grpc_errors(method):
    """Decorator for servicer methods (unary and streaming): exceptions become statuses."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - the edge must answer every failure
                _abort(context, exc, method.__name__)
        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc, method.__name__)
    return wrapper


def client_gone(context: grpc.ServicerContext) -> bool:
    """The caller cancelled or its deadline passed: nothing to answer, nothing went wrong here."""
    try:
        return not context.is_active()
    except Exception:  # noqa: BLE001 - a context without a call
        return False


def _abort(context: grpc.ServicerContext, exc: Exception, method: str):
    if type(exc) is Exception and not exc.args:
        raise exc  # grpc's context.abort() raises a bare Exception after setting the status
    if client_gone(context):
        # Reading the request stream of a call the client cancelled (or whose deadline expired)
        # raises; so may work that outlived its caller. Not a server error: end the call quietly
        # with its real code (the interceptor counts and logs it at INFO).
        log.debug("call ended by the client in %s", method, extra={"error": type(exc).__name__})
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED,
                      "the client cancelled the call or its deadline passed")
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", method)
    context.abort(code, bounded(message))
