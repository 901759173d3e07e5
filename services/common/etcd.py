"""The one etcd wrapper every service uses: get, put, compare-and-swap, watch with resume,
leases and lease-held leadership.

The client library (`cslab-etcd3`, a maintained fork of python-etcd3 that works with
protobuf >= 4; it imports as `etcd3`) stays behind this module so it can be swapped.
All keys are relative to a prefix (default `/deltarec/`).

`Etcd.from_config(config)` is the one place a client is made from settings (services/common/
config.py `EtcdConfig`: ETCD_ENDPOINT, ETCD_PREFIX, ETCD_CA_FILE / ETCD_CERT_FILE / ETCD_KEY_FILE,
ETCD_SERVER_NAME, ETCD_USER / ETCD_PASSWORD); every service, the trainer CLI and the status
command use it, so they all speak to etcd the same way.

*TLS*: with ETCD_CA_FILE the channel verifies etcd's certificate against it and, with
ETCD_CERT_FILE/ETCD_KEY_FILE, presents that client certificate (etcd --client-cert-auth). gRPC
fixes a channel's credentials at creation, so at most once a second a call compares the files'
identity and, when they changed (a rotated Secret), makes a new client for new calls and closes
the old one `RETIRE_S` later: watches on it end and resume on the new one from the next revision
(as after any disconnection); leases are refreshed through whichever client is current.

*etcd auth*: with ETCD_USER the wrapper authenticates itself (lazily: making an Etcd never needs
etcd to be up) and sends the token as the `token` metadata etcd reads. A token etcd no longer
knows (its TTL ran out, etcd restarted) is answered "invalid auth token": the wrapper
authenticates again and retries the call once; a watch re-authenticates when it resumes.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import etcd3
import etcd3.events
import grpc

from services.common import tls
from services.common.config import ConfigError

log = logging.getLogger(__name__)


ENDPOINT_RETRY_S = 1.0
RECONNECT_BACKOFF_MS = 1000   # the channel's reconnect backoff (see _make_client)
FILES_CHECK_S = 1.0      # how often a call may look at the TLS files for a rotation
RETIRE_S = 120.0         # a replaced client lives on this long for the calls still using it
AUTH_RETRY_S = 0.5       # while authentication fails (etcd down), try again at most this often


class EtcdUnavailable(Exception):
    pass


@dataclass(frozen=True)
class KeyValue:
    key: str               # relative to the prefix
    value: bytes
    mod_revision: int
    create_revision: int
    lease_id: int

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class WatchEvent:
    key: str               # relative to the prefix
    value: bytes | None    # None for a delete
    revision: int

    @property
    def deleted(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class EtcdAccess:
    """How a client proves itself to etcd and checks etcd (all empty: plaintext, no etcd auth)."""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    user: str = ""
    password: str = ""

    @classmethod
    def from_config(cls, config) -> "EtcdAccess":
        return cls(config.etcd_ca_file, config.etcd_cert_file, config.etcd_key_file,
                   config.etcd_server_name, config.etcd_user, config.etcd_password)

    @property
    def tls(self) -> bool:
        return bool(self.ca_file)


def check_config(config) -> None:
    """Cross-field checks of EtcdConfig (ConfigError naming the variable)."""
    cert, key, ca = config.etcd_cert_file, config.etcd_key_file, config.etcd_ca_file
    if bool(cert) != bool(key):
        raise ConfigError("ETCD_CERT_FILE and ETCD_KEY_FILE: set both or neither")
    if cert and not ca:
        raise ConfigError("ETCD_CERT_FILE needs ETCD_CA_FILE (a client certificate is only sent over TLS)")
    if config.etcd_server_name and not ca:
        raise ConfigError("ETCD_SERVER_NAME needs ETCD_CA_FILE (it names etcd's TLS certificate)")
    if bool(config.etcd_user) != bool(config.etcd_password):
        raise ConfigError("ETCD_USER and ETCD_PASSWORD (or ETCD_PASSWORD_FILE): set both or neither")
    for name, path in (("ETCD_CA_FILE", ca), ("ETCD_CERT_FILE", cert), ("ETCD_KEY_FILE", key)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{name}={path!r}: not a readable file")
    try:
        if ca:
            tls.read_ca_bundle(ca, "ETCD_CA_FILE")
        if cert:
            tls.read_key_pair(cert, key, ("ETCD_CERT_FILE", "ETCD_KEY_FILE"))
    except tls.TlsFilesInvalid as error:
        raise ConfigError(str(error)) from None


def _encode(value: bytes | str | dict | list) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, sort_keys=True).encode()


class Etcd:
    def __init__(self, endpoint: str, prefix: str = "/deltarec/", timeout_s: float = 5.0,
                 access: EtcdAccess | None = None) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.access = access or EtcdAccess()
        self._files = (tls.ClientFiles(self.access.ca_file, self.access.cert_file, self.access.key_file)
                       if self.access.tls else None)
        self._lock = threading.Lock()
        self._files_mark = self._files.fingerprint() if self._files else None
        self._files_checked = time.monotonic()
        self._token: str | None = None
        self._auth_tried = 0.0
        self._closed = False
        if self.access.user and not self.access.tls:
            log.warning("etcd auth without TLS: the etcd password crosses the network in clear")
        self._current = self._make_client()

    @classmethod
    def from_config(cls, config, timeout_s: float = 5.0) -> "Etcd":
        """The client of the settings in `config` (EtcdConfig fields): endpoint, prefix, TLS, auth."""
        return cls(config.etcd_endpoint, config.etcd_prefix, timeout_s, access=EtcdAccess.from_config(config))

    # ---------------------------------------------------------------- the client
    def _make_client(self):
        host, port = self.endpoint.rsplit(":", 1)
        # gRPC's reconnect backoff grows to 120 s: after an etcd outage of some seconds the channel
        # would wait several more before even trying, longer than a leader lease's TTL, and the
        # lease would expire with etcd back up. Try again at least once a second instead.
        options = [("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                   ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                   ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS)]
        if self.access.server_name:
            options.append(("grpc.ssl_target_name_override", self.access.server_name))
        if self._files is None:
            endpoint = etcd3.Endpoint(host, int(port), secure=False, opts=options)
        else:
            endpoint = etcd3.Endpoint(host, int(port), secure=True, opts=options,
                                      creds=self._files.credentials(last_good=True))
        # Authentication is ours (lazy, renewed), not the library's (once, in its constructor).
        client = etcd3.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=self.timeout_s)
        # The client marks an endpoint failed for 300 s after one connection error and refuses every
        # call until then ("Trying to use a failed node"), even once etcd is back: watches would
        # resume only 5 minutes after an outage. Retry after a second instead.
        for client_endpoint in getattr(client, "endpoints", {}).values():
            client_endpoint.time_retry = ENDPOINT_RETRY_S
        return client

    @property
    def _client(self):
        """The current client: rebuilt when the TLS files changed, authenticated when etcd auth is on."""
        if self._files is not None and time.monotonic() - self._files_checked >= FILES_CHECK_S:
            self._maybe_rotate()
        client = self._current
        if self.access.user and self._token is None:
            self._authenticate(client)
        return client

    def _maybe_rotate(self) -> None:
        with self._lock:
            self._files_checked = time.monotonic()
            mark = self._files.fingerprint()
            if mark == self._files_mark or self._closed:
                return
            try:
                self._files.credentials()        # usable now? (a half-written rotation is not)
            except tls.TlsFilesInvalid as error:
                log.warning("etcd TLS files changed but are not usable yet; keeping the previous ones",
                            extra={"error": str(error)[:300]})
                return
            old, self._current = self._current, self._make_client()
            self._files_mark, self._token = mark, None
        tls.RELOADS.labels("etcd").inc()
        log.info("etcd TLS files reloaded: new calls use a new channel")
        timer = threading.Timer(RETIRE_S, _close_quietly, (old,))
        timer.daemon = True
        timer.start()

    def _authenticate(self, client) -> None:
        """Gets a token for ETCD_USER; on failure (etcd down) leaves none, so the call fails as
        an outage and the next one tries again."""
        with self._lock:
            if self._token is not None or time.monotonic() - self._auth_tried < AUTH_RETRY_S:
                return
            self._auth_tried = time.monotonic()
            try:
                response = client.authstub.Authenticate(
                    etcd3.etcdrpc.AuthenticateRequest(name=self.access.user, password=self.access.password),
                    self.timeout_s)
            except grpc.RpcError as error:
                log.warning("etcd authentication failed", extra={"user": self.access.user,
                                                                 "error": str(error.details())[:200]})
                return
            self._token = response.token
            client.metadata = (("token", response.token),)
            client.call_credentials = None
            # The watcher took the metadata when it was made: the next watch gets a new one.
            client._clear_old_stubs()

    def _token_rejected(self, error) -> bool:
        """True (and the token forgotten) when etcd refused the token as unknown or expired."""
        if not self.access.user or not any(text in str(error) for text in ("invalid auth token",
                                                                          "user name is empty")):
            return False
        with self._lock:
            self._token = None
            self._auth_tried = 0.0
        return True

    # ---------------------------------------------------------------- keys
    def full_key(self, name: str) -> str:
        return self.prefix + name.lstrip("/")

    def _relative(self, key: bytes | str) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.prefix):] if text.startswith(self.prefix) else text

    def _kv(self, value: bytes, meta) -> KeyValue:
        return KeyValue(self._relative(meta.key), value, meta.mod_revision, meta.create_revision,
                        meta.lease_id)

    def get(self, name: str) -> KeyValue | None:
        value, meta = self._call(self._client.get, self.full_key(name))
        return None if meta is None else self._kv(value, meta)

    def get_json(self, name: str) -> Any | None:
        kv = self.get(name)
        return None if kv is None else kv.json()

    def get_prefix(self, name_prefix: str) -> list[KeyValue]:
        rows = self._call(lambda: list(self._client.get_prefix(self.full_key(name_prefix))))
        return [self._kv(value, meta) for value, meta in rows]

    def put(self, name: str, value: bytes | str | dict | list, lease: "Lease | None" = None) -> None:
        self._call(self._client.put, self.full_key(name), _encode(value),
                   lease=None if lease is None else lease.raw)

    def delete(self, name: str) -> bool:
        return bool(self._call(self._client.delete, self.full_key(name)))

    def compare_and_swap(self, name: str, expected: bytes | None, new: bytes | str | dict | list,
                         lease: "Lease | None" = None) -> bool:
        """Writes `new` only if the key's current value is `expected` (None: the key must not
        exist). Returns False, writing nothing, when another writer got there first."""
        key = self.full_key(name)
        txn = self._client.transactions
        compare = [txn.create(key) == 0] if expected is None else [txn.value(key) == expected]
        put = txn.put(key, _encode(new), lease=None if lease is None else lease.raw)
        succeeded, _ = self._call(self._client.transaction, compare=compare, success=[put], failure=[])
        return bool(succeeded)

    def compare_and_delete(self, name: str, expected: bytes) -> bool:
        key = self.full_key(name)
        txn = self._client.transactions
        succeeded, _ = self._call(self._client.transaction, compare=[txn.value(key) == expected],
                                  success=[txn.delete(key)], failure=[])
        return bool(succeeded)

    def transaction(self, compares: list[tuple[str, bytes | None]],
                    operations: list[tuple[str, str, bytes | None]]) -> bool:
        """All-or-nothing: applies `operations` (("put", name, value) or ("delete", name, None))
        only if every key holds the expected value (None: the key must not exist)."""
        txn = self._client.transactions
        checks = [txn.create(self.full_key(name)) == 0 if expected is None
                  else txn.value(self.full_key(name)) == expected for name, expected in compares]
        writes = [txn.put(self.full_key(name), _encode(value)) if kind == "put"
                  else txn.delete(self.full_key(name)) for kind, name, value in operations]
        succeeded, _ = self._call(self._client.transaction, compare=checks, success=writes, failure=[])
        return bool(succeeded)

    def current_revision(self) -> int:
        return self._call(lambda: self._client.get_response(self.full_key("__revision__")).header.revision)

    # ---------------------------------------------------------------- leases
    def lease(self, ttl_s: int) -> "Lease":
        return Lease(self, self._call(self._client.lease, ttl_s), ttl_s)

    # ---------------------------------------------------------------- watch
    def watch(self, name: str, on_event: Callable[[WatchEvent], None], *, prefix: bool = False,
              start_revision: int | None = None) -> "Watch":
        """Calls `on_event` for every change of `name` (or every key under it) from
        `start_revision` on, in a background thread that survives etcd outages: after a
        failure it reconnects and resumes from the revision after the last one delivered."""
        return Watch(self, name, on_event, prefix=prefix, start_revision=start_revision)

    def close(self) -> None:
        self._closed = True
        _close_quietly(self._current)

    def _call(self, function, *args, **kwargs):
        try:
            return _translate(function, *args, **kwargs)
        except EtcdUnavailable as error:
            if not self._token_rejected(error):
                raise
        self._client    # noqa: B018 - authenticates again (the bound function's client is the current one)
        return _translate(function, *args, **kwargs)


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001
        pass


def _translate(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError) as exc:
        raise EtcdUnavailable(str(exc) or type(exc).__name__) from exc
    except ValueError as exc:
        # The client's way of saying its only endpoint is marked failed (for ENDPOINT_RETRY_S
        # after an error): an outage like any other, not a bug of the caller.
        if "failed node" in str(exc) or "no endpoint" in str(exc).lower():
            raise EtcdUnavailable(str(exc)) from exc
        raise
    except Exception as exc:  # grpc errors from the client's stubs
        if exc.__class__.__name__ in ("_InactiveRpcError", "_MultiThreadedRendezvous"):
            raise EtcdUnavailable(str(exc)) from exc
        raise


class Lease:
    """A granted lease; `keep_alive()` refreshes it in the background until revoked or lost."""

    def __init__(self, etcd: Etcd, raw, ttl_s: int) -> None:
        self.etcd, self.raw, self.ttl_s = etcd, raw, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    @property
    def id(self) -> int:
        return self.raw.id

    def refresh(self) -> bool:
        """True while the lease is alive (its TTL > 0 after the refresh)."""
        # Through the current client, not the one that granted the lease (it may have been
        # replaced after a certificate rotation).
        responses = self.etcd._call(lambda: list(self.etcd._client.refresh_lease(self.id)))
        return bool(responses) and responses[0].TTL > 0

    def keep_alive(self, on_lost: Callable[[], None] | None = None) -> "Lease":
        def loop() -> None:
            interval = max(self.ttl_s / 3.0, 0.2)
            while not self._stop.wait(interval):
                try:
                    alive = self.refresh()
                except Exception:  # noqa: BLE001 - etcd down: retry until the TTL runs out
                    alive = True
                    log.warning("lease refresh failed", extra={"lease_id": self.id})
                if not alive:
                    self.lost.set()
                    log.warning("lease lost", extra={"lease_id": self.id})
                    if on_lost:
                        on_lost()
                    return
        self._thread = threading.Thread(target=loop, name=f"lease-{self.id}", daemon=True)
        self._thread.start()
        return self

    def revoke(self) -> None:
        self._stop.set()
        try:
            self.etcd._call(lambda: self.etcd._client.revoke_lease(self.id))
        except Exception:  # noqa: BLE001 - it will expire by itself
            pass


class Watch:
    def __init__(self, etcd: Etcd, name: str, on_event: Callable[[WatchEvent], None], *,
                 prefix: bool, start_revision: int | None) -> None:
        self.etcd, self.name, self.on_event, self.prefix = etcd, name, on_event, prefix
        self.next_revision = start_revision
        self._stop = threading.Event()
        self._cancel: Callable[[], None] | None = None
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.2
        key = self.etcd.full_key(self.name)
        while not self._stop.is_set():
            try:
                kwargs = {} if self.next_revision is None else {"start_revision": self.next_revision}
                watch = self.etcd._client.watch_prefix if self.prefix else self.etcd._client.watch
                events, self._cancel = watch(key, **kwargs)
                self.connected.set()
                backoff = 0.2
                for event in events:
                    if self._stop.is_set():
                        break
                    value = None if isinstance(event, etcd3.events.DeleteEvent) else event.value
                    self.next_revision = event.mod_revision + 1
                    self.on_event(WatchEvent(self.etcd._relative(event.key), value, event.mod_revision))
                if not self._stop.is_set():
                    raise EtcdUnavailable("watch stream ended")
            except Exception as exc:  # noqa: BLE001 - outage: retry from next_revision
                self.connected.clear()
                if self._stop.is_set():
                    return
                self.etcd._token_rejected(exc)      # etcd auth: a new token before resuming
                if "compacted" in str(exc).lower():
                    # The history we wanted is gone: restart from now; callers re-read state.
                    self.next_revision = None
                log.warning("etcd watch interrupted; resuming",
                            extra={"key": key, "error": str(exc)[:200], "resume_revision": self.next_revision})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def cancel(self) -> None:
        self._stop.set()
        if self._cancel:
            try:
                self._cancel()
            except Exception:  # noqa: BLE001
                pass


class Leadership:
    """Holds `name` for `holder_id` under a lease: the singleton-per-role pattern
    (collector slot owners, the trainer that publishes). A standby calls `campaign()`,
    which returns once it holds the key; `held` turns false if the lease is lost."""

    def __init__(self, etcd: Etcd, name: str, holder_id: str, ttl_s: int = 5) -> None:
        self.etcd, self.name, self.holder_id, self.ttl_s = etcd, name, holder_id, ttl_s
        self.lease: Lease | None = None

    @property
    def held(self) -> bool:
        return self.lease is not None and not self.lease.lost.is_set()

    def try_acquire(self) -> bool:
        if self.held:
            return True
        lease = self.etcd.lease(self.ttl_s)
        if self.etcd.compare_and_swap(self.name, None, self.holder_id, lease=lease):
            self.lease = lease.keep_alive()
            return True
        lease.revoke()
        return False

    def campaign(self, stop: threading.Event | None = None, poll_s: float = 0.5) -> bool:
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                if self.try_acquire():
                    return True
            except Exception as error:  # noqa: BLE001 - etcd down, or etcd3's "failed node" ValueError:
                # a campaign never ends by itself on an outage (the role would stay unheld).
                log.debug("campaign attempt failed", extra={"key": self.name, "error": str(error)[:200]})
            stop.wait(poll_s)
        return False

    def holder(self) -> str | None:
        kv = self.etcd.get(self.name)
        return None if kv is None else kv.value.decode()

    def resign(self) -> None:
        if self.lease is not None:
            self.etcd.compare_and_delete(self.name, self.holder_id.encode())
            self.lease.revoke()
            self.lease = None
