"""The one place a DeltaRec process builds a gRPC channel to another DeltaRec service.

    channel = make_channel("features:50052", FEATURES)     # settings from the environment

What the channel does follows the process's SecurityConfig (services/common/config.py):
- TLS when TLS_CA_FILE is set (the server's certificate is verified against it; TLS_SERVER_NAME
  overrides the expected name), presenting TLS_CERT_FILE / TLS_KEY_FILE as the client
  certificate when they are set (mutual TLS); plaintext otherwise (local runs);
- the bearer token AUTH_CLIENT_TOKEN / AUTH_CLIENT_TOKEN_FILE on every call, when set (a file
  is re-read when it changes);
- message and metadata limits mirroring the target service's (services/common/limits.py);
- the `round_robin` load-balancing policy (below).

A target is one of:
  `host:port`               one address (the name resolved once per connection);
  `dns:///name:port`        every address the name resolves to — a Kubernetes headless Service
                            answers with one A record per ready pod;
  `ipv4:a:p,b:p,...`        a fixed list of addresses.

Every channel asks for the `round_robin` load-balancing policy: one subchannel per address and
calls spread over the ready ones; an address that fails is skipped and the name re-resolved.
gRPC's default (`pick_first`) sends every call of a long-lived channel to the one address it
first connected to, so replicas added later would take no load from it. (Servers end their
connections after GRPC_MAX_CONNECTION_AGE_S so clients also re-resolve and find new pods.)

Connections: `make_channel(..., connections=N)` opens N TCP connections per address (a
`PooledChannel`: N channels, each with its own subchannel pool, calls taken in turn). One
connection per address is enough for a server that is one process, but a ranker with
RANKER_WORKERS > 1 is N processes on one SO_REUSEPORT port: the kernel hands each *connection*
to one worker, so a client with one connection keeps every other worker idle. gRPC channels to
one target otherwise share one connection (the global subchannel pool), hence the option.

Rotation: gRPC fixes a channel's TLS credentials when the channel is made, so a TLS channel here
is a `ReloadingChannel`: on a call, at most once a second, it looks whether the CA, certificate
or key file changed; if so it builds a new channel from the new files and sends new calls there.
The previous channel is closed after `OLD_CHANNEL_GRACE_S`, so calls and streams in flight on it
finish (or, for endless streams, end and reconnect - every DeltaRec stream resumes by itself).
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
import time
from typing import Callable, Sequence

import grpc

from services.common import limits, tls
from services.common.auth import ClientToken
from services.common.config import SecurityConfig, load

log = logging.getLogger(__name__)

COLLECTOR = "deltarec.v1.CollectorService"
FEATURES = "deltarec.v1.FeaturesService"
TRAINER = "deltarec.v1.TrainerService"
RANKER = "deltarec.v1.RankerService"
CONSISTENCY = "deltarec.v1.ConsistencyService"

# Channels with this option own their connections (gRPC shares one per target between channels
# otherwise): what makes a PooledChannel's channels separate TCP connections.
OWN_CONNECTIONS_OPTION = ("grpc.use_local_subchannel_pool", 1)
MAX_CONNECTIONS = 64
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_LIST_SCHEMES = ("ipv4:", "ipv6:")
RECHECK_S = 1.0
OLD_CHANNEL_GRACE_S = 120.0
FROM_ENVIRONMENT = object()   # the default `security`: the process's environment


@functools.lru_cache(maxsize=1)
def environment_security() -> SecurityConfig:
    """The process's settings; a service validated them at start (load(...Config)), so a bad
    value never gets this far inside a service."""
    return load(SecurityConfig)


def make_channel(address: str, service: str, *, security=FROM_ENVIRONMENT,
                 options: Sequence[tuple[str, object]] = (), connections: int = 1) -> grpc.Channel:
    """A channel to the DeltaRec `service` (full proto name) at `address`. `security`: a
    SecurityConfig, None for plaintext without credentials, or (default) the environment's.
    `connections` > 1: that many TCP connections per address, calls spread over them in turn
    (PooledChannel; for a ranker with RANKER_WORKERS, at least as many as it has workers)."""
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections: {connections} is outside 1..{MAX_CONNECTIONS}")
    if connections > 1:
        own = [*options, OWN_CONNECTIONS_OPTION]
        return PooledChannel([make_channel(address, service, security=security, options=own)
                              for _ in range(connections)])
    config = environment_security() if security is FROM_ENVIRONMENT else security
    channel_options = [("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG)] + limits.client_options(
        service, config.grpc_max_metadata_bytes if config is not None else limits.METADATA_BYTES)
    token = ClientToken.from_config(config)
    if tls.client_tls_enabled(config):
        if config.tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", config.tls_server_name))
        files = tls.ClientFiles(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
        channel_options += list(options)

        def build(last_good: bool = False) -> grpc.Channel:
            return grpc.secure_channel(address, files.credentials(last_good=last_good), options=channel_options)
        return ReloadingChannel(build, files.fingerprint, token)
    channel_options += list(options)
    if token is None:
        return grpc.insecure_channel(address, options=channel_options)
    # Plaintext with a token: the same wrapper, over files that never change.
    return ReloadingChannel(lambda last_good=False: grpc.insecure_channel(address, options=channel_options),
                            lambda: (), token)


def client_channel(target: str, options: Sequence[tuple[str, object]] = (), service: str = "") -> grpc.Channel:
    """make_channel with the environment's security settings (for callers that name no service:
    the default limits)."""
    return make_channel(target, service, options=options)


def split_targets(value: str) -> list[str]:
    """Comma-separated targets (a consumer tries them in turn); an `ipv4:`/`ipv6:` address list
    is one target whose commas separate its addresses."""
    value = value.strip()
    if value.startswith(_LIST_SCHEMES):
        return [value]
    return [target.strip() for target in value.split(",") if target.strip()]


class _WrappingChannel(grpc.Channel):
    """What ReloadingChannel and PooledChannel share: a grpc.Channel whose stubs' methods are
    bound by `_multicallable` to channels of its own (`_underlying`)."""

    def _multicallable(self, kind: str, method, args, kwargs):
        raise NotImplementedError

    def _underlying(self) -> list[grpc.Channel]:
        raise NotImplementedError

    def unary_unary(self, method, *args, **kwargs):
        return self._multicallable("unary_unary", method, args, kwargs)

    def unary_stream(self, method, *args, **kwargs):
        return self._multicallable("unary_stream", method, args, kwargs)

    def stream_unary(self, method, *args, **kwargs):
        return self._multicallable("stream_unary", method, args, kwargs)

    def stream_stream(self, method, *args, **kwargs):
        return self._multicallable("stream_stream", method, args, kwargs)

    def unsubscribe(self, callback):
        for channel in self._underlying():
            try:
                channel.unsubscribe(callback)
            except (ValueError, KeyError):
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.close()
        return False


class ReloadingChannel(_WrappingChannel):
    """A channel that re-creates its underlying channel when `fingerprint()` changes, and adds
    `authorization: Bearer <token>` (read at call time) to every call when given a token. (The
    token goes in here rather than through a gRPC client interceptor, which costs more per call.)"""

    def __init__(self, build: Callable[..., grpc.Channel], fingerprint: Callable[[], tuple],
                 token: ClientToken | None = None) -> None:
        """`build(last_good=False)`: a channel from the files as they are (TlsFilesInvalid while
        they are not usable), or with last_good=True from the last usable ones."""
        self._build, self._fingerprint, self.token = build, fingerprint, token
        self._lock = threading.Lock()
        self._mark = fingerprint()
        self._channel = build(last_good=True)
        self._generation = 0
        self._checked = time.monotonic()
        self._retired: list[grpc.Channel] = []
        self._closed = False
        self.rebuilds = 0

    def _current(self) -> tuple[grpc.Channel, int]:
        now = time.monotonic()
        if now - self._checked >= RECHECK_S and not self._closed:
            with self._lock:
                if now - self._checked >= RECHECK_S:
                    self._checked = now
                    self._maybe_rebuild()
        return self._channel, self._generation

    def _maybe_rebuild(self) -> None:
        mark = self._fingerprint()
        if mark == self._mark:
            return
        try:
            channel = self._build()
        except tls.TlsFilesInvalid as error:
            # A rotation half done (certificate written, key not yet): keep the working channel.
            log.warning("TLS files changed but are not usable yet; keeping the current channel",
                        extra={"error": str(error)[:300]})
            return
        old, self._channel, self._mark = self._channel, channel, mark
        self._generation += 1
        self.rebuilds += 1
        tls.RELOADS.labels("client").inc()
        self._retired.append(old)
        timer = threading.Timer(OLD_CHANNEL_GRACE_S, self._close_retired, args=(old,))
        timer.daemon = True
        timer.start()
        log.info("TLS files changed: new calls use a new channel", extra={"rebuilds": self.rebuilds})

    def _close_retired(self, channel: grpc.Channel) -> None:
        with self._lock:
            if channel in self._retired:
                self._retired.remove(channel)
        channel.close()

    # ---- grpc.Channel
    def _multicallable(self, kind, method, args, kwargs):
        return _Multicallable(self, kind, method, args, kwargs)

    def _underlying(self) -> list[grpc.Channel]:
        return [self._channel, *self._retired]

    def subscribe(self, callback, try_to_connect=False):
        self._current()[0].subscribe(callback, try_to_connect=try_to_connect)

    def close(self):
        with self._lock:
            self._closed = True
            channels, self._retired = [self._channel, *self._retired], []
        for channel in channels:
            channel.close()


class PooledChannel(_WrappingChannel):
    """Several channels (each its own TCP connection) used as one: each call of a stub's method
    goes to the next channel in turn. Streams too: a stream stays on the channel it started on."""

    def __init__(self, channels: Sequence[grpc.Channel]) -> None:
        if not channels:
            raise ValueError("a PooledChannel needs at least one channel")
        self.channels = list(channels)

    def _multicallable(self, kind, method, args, kwargs):
        return _PooledMulticallable([getattr(channel, kind)(method, *args, **kwargs) for channel in self.channels])

    def _underlying(self) -> list[grpc.Channel]:
        return self.channels

    def subscribe(self, callback, try_to_connect=False):
        # The first connection's state stands for the pool's (they all go to the same target).
        self.channels[0].subscribe(callback, try_to_connect=try_to_connect)
        if try_to_connect:
            for channel in self.channels[1:]:
                channel.subscribe(_ignore_state, try_to_connect=True)

    def close(self):
        for channel in self.channels:
            channel.close()


def _ignore_state(_state) -> None:
    """A connectivity callback that only makes subscribe() start connecting."""


class _PooledMulticallable:
    """A stub's method over a PooledChannel: each call on the next channel's multicallable."""

    def __init__(self, callables: list) -> None:
        self._callables = callables
        self._turn = itertools.count()   # next() of a count is atomic in CPython: no lock

    def _next(self):
        return self._callables[next(self._turn) % len(self._callables)]

    def __call__(self, *args, **kwargs):
        return self._next()(*args, **kwargs)

    def with_call(self, *args, **kwargs):
        return self._next().with_call(*args, **kwargs)

    def future(self, *args, **kwargs):
        return self._next().future(*args, **kwargs)


class _Multicallable:
    """Stands for a stub's method: binds to the channel current at each call, adds the token."""

    def __init__(self, owner: ReloadingChannel, kind: str, method, args, kwargs) -> None:
        self._owner, self._kind, self._method, self._args, self._kwargs = owner, kind, method, args, kwargs
        self._bound: tuple[int, object] = (-1, None)

    def _target(self):
        channel, generation = self._owner._current()
        bound_generation, callable_ = self._bound
        if bound_generation != generation:
            callable_ = getattr(channel, self._kind)(self._method, *self._args, **self._kwargs)
            self._bound = (generation, callable_)
        return callable_

    def _credentials(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        token = self._owner.token
        if token is None:
            return args, kwargs
        if len(args) > 2:                 # (request, timeout, metadata, ...) given positionally
            args = list(args)
            metadata, args[2] = args[2], None
            args = tuple(args)
        else:
            metadata = kwargs.get("metadata")
        kwargs["metadata"] = [item for item in (metadata or ()) if item[0] != "authorization"] + \
            [("authorization", f"Bearer {token.value()}")]
        return args, kwargs

    def __call__(self, *args, **kwargs):
        args, kwargs = self._credentials(args, kwargs)
        return self._target()(*args, **kwargs)

    def with_call(self, *args, **kwargs):
        args, kwargs = self._credentials(args, kwargs)
        return self._target().with_call(*args, **kwargs)

    def future(self, *args, **kwargs):
        args, kwargs = self._credentials(args, kwargs)
        return self._target().future(*args, **kwargs)
