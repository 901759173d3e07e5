"""Registration: `rankers/<replica>` in etcd, on a lease, says what this replica serves.

The value (JSON) is the same as Status: model_version, data_lsn, index_size, index_checksum,
canary, refused version, swaps, address. It is rewritten when it changes (at most every
`interval_s`, at once after a swap) and disappears with the lease when the replica dies. An etcd
outage only delays it; a lost lease is replaced by a new one.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Callable

from services.contracts.etcd_keys import ranker_key
from services.ranker.etcd_retry import retry_against_etcd

log = logging.getLogger(__name__)

_ANY_ADDRESS = ("0.0.0.0", "::", "[::]")


def advertised_address(bind_host: str, port: int, advertise_host: str = "") -> str:
    """The host:port other parts reach this replica at (registered, shown in Status):
    ADVERTISE_HOST when set (a pod's IP), else the host name when the server listens on every
    interface. An IPv6 address gets its brackets."""
    host = advertise_host or (socket.gethostname() if bind_host in _ANY_ADDRESS else bind_host)
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Registration:
    def __init__(self, etcd, replica_id: str, describe: Callable[[], dict], *, ttl_s: int = 10,
                 interval_s: float = 2.0) -> None:
        self.etcd, self.replica_id, self.describe = etcd, replica_id, describe
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self.key = ranker_key(replica_id)
        self._lease = None
        self._last: bytes | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.registered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)

    def start(self) -> "Registration":
        self._thread.start()
        return self

    def poke(self) -> None:
        self._wake.set()

    def publish_once(self) -> None:
        if self._lease is None or self._lease.lost.is_set():
            self._lease = self.etcd.lease(self.ttl_s).keep_alive()
            self._last = None
        value = json.dumps(self.describe(), sort_keys=True).encode()
        if value != self._last:
            self.etcd.put(self.key, value, lease=self._lease)
            self._last = value
            self.registered.set()

    def _run(self) -> None:
        retry_against_etcd(self.publish_once, self._idle, self._stop, first_backoff_s=0.5, log=log,
                           unreachable="registration delayed: etcd unreachable", failed="registration failed")

    def _idle(self) -> None:
        self._wake.wait(self.interval_s)
        self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._lease is not None:
            self._lease.revoke()   # the key goes with it
