"""The one etcd wrapper every service uses: get, put, compare-and-swap, watch with resume,
leases and lease-held leadership.

The client library (`cslab-etcd3`, a maintained fork of python-etcd3 that works with
protobuf >= 4; it imports as `etcd3`) stays behind this module so it can be swapped.
All keys are relative to a prefix (default `/deltarec/`).
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import etcd3
import etcd3.events

log = logging.getLogger(__name__)


ENDPOINT_RETRY_S = 1.0


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


def _encode(value: bytes | str | dict | list) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, sort_keys=True).encode()


class Etcd:
    def __init__(self, endpoint: str, prefix: str = "/deltarec/", timeout_s: float = 5.0) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._client = etcd3.client(host=host, port=int(port), timeout=timeout_s)
        # The client marks an endpoint failed for 300 s after one connection error and refuses every
        # call until then ("Trying to use a failed node"), even once etcd is back: watches would
        # resume only 5 minutes after an outage. Retry after a second instead.
        for client_endpoint in getattr(self._client, "endpoints", {}).values():
            client_endpoint.time_retry = ENDPOINT_RETRY_S
        self.endpoint = endpoint

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
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def _call(function, *args, **kwargs):
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
        responses = Etcd._call(lambda: list(self.raw.refresh()))
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
            Etcd._call(self.raw.revoke)
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
