"""The consumer groups of one collector process: `CdcHub.open(...)` checks a Subscribe request
and returns its `Subscription` (subscription.py); the hub also lists groups (slot positions,
retained WAL, holder), drops abandoned ones, shares the server's WAL position between the
heartbeats of all streams, and cancels every stream on shutdown. Plain Python, no gRPC (the
edge is service.py)."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from deltarec.v1 import collector_pb2

from services.collector.cdc.group_stats import GroupStats
from services.collector.cdc.slots import GROUP_NAME, SlotStore
from services.collector.cdc.subscription import Subscription
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.validation import MAX_INT64, check_count, check_int, quote
from services.common.etcd import Etcd, EtcdUnavailable, Leadership
from services.contracts.etcd_keys import collector_slot_key

log = logging.getLogger(__name__)

DEFAULT_BATCH = 500
MAX_BATCH = 100_000


@dataclass(frozen=True)
class StreamSettings:
    heartbeat_s: float = 2.0
    buffer_deltas: int = 10_000
    max_unacked_batches: int = 256
    lease_ttl_s: int = 5
    fence_s: float = 10.0


class CdcHub:
    """The consumer groups of one collector process."""

    def __init__(self, store: SlotStore, dsn: str, publication: str, tables: Sequence[str],
                 etcd: Etcd | None, collector_id: str, settings: StreamSettings = StreamSettings()) -> None:
        self.store, self.dsn, self.publication = store, dsn, publication
        self.tables = tuple(tables)
        self.etcd, self.collector_id, self.settings = etcd, collector_id, settings
        self._lock = threading.Lock()
        self._group_locks: dict[str, threading.Lock] = {}
        self._stats: dict[str, GroupStats] = {}
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self._wal_lsn = 0
        self._wal_lsn_at = 0.0
        self._wal_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def group_lock(self, group: str) -> threading.Lock:
        with self._lock:
            return self._group_locks.setdefault(group, threading.Lock())

    def stats(self, group: str) -> GroupStats:
        with self._lock:
            if group not in self._stats:
                self._stats[group] = GroupStats(self, group)
            return self._stats[group]

    def slot_key(self, group: str) -> str:
        return collector_slot_key(group)

    def wal_lsn(self, max_age_s: float = 0.5) -> int:
        """The server's WAL (insert) position, cached for `max_age_s` (heartbeats of many
        streams share it)."""
        with self._wal_lock:
            if time.monotonic() - self._wal_lsn_at > max_age_s:
                try:
                    self._wal_lsn = self.store.current_wal_lsn()
                    self._wal_lsn_at = time.monotonic()
                except Exception as error:  # noqa: BLE001 - a heartbeat without a fresh LSN
                    log.warning("cannot read the WAL position", extra={"error": str(error)[:200]})
            return self._wal_lsn

    def cached_wal_lsn(self) -> int:
        return self.wal_lsn(max_age_s=5.0)

    # ------------------------------------------------------------------ API
    def open(self, group: str, tables: Sequence[str] = (), max_batch_size: int = 0,
             resume_after_lsn: int = 0) -> "Subscription":
        if self._closed:
            raise Unavailable("collector is shutting down")
        if not GROUP_NAME.fullmatch(group or ""):
            raise InvalidArgument("consumer_group: must match [a-z][a-z0-9_]{0,40}")
        if max_batch_size > MAX_BATCH:
            raise InvalidArgument(f"max_batch_size: at most {MAX_BATCH}")
        check_int("resume_after_lsn", resume_after_lsn, 0, MAX_INT64)
        check_count("tables", len(tables), 64)
        requested = tuple(dict.fromkeys(tables))
        unknown = [table for table in requested if table not in self.tables]
        if unknown:
            raise InvalidArgument(f"tables: {', '.join(map(quote, unknown[:5]))} not published "
                                  f"(published: {', '.join(self.tables)})")
        subscription = Subscription(self, group, requested, max_batch_size or DEFAULT_BATCH, resume_after_lsn)
        with self._lock:
            self._subscriptions.add(subscription)
        return subscription

    def _forget(self, subscription: "Subscription") -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def list_groups(self) -> collector_pb2.ListConsumerGroupsResponse:
        response = collector_pb2.ListConsumerGroupsResponse()
        rows = {row.name: row for row in self.store.groups()}
        slots = {info.slot_name: info for info in self.store.slots_with_prefix()}
        names = set(rows)
        prefix = self.store.slot_prefix
        orphans = {name[len(prefix):]: name for name in slots
                   if name.startswith(prefix) and not any(r.slot_name == name for r in rows.values())}
        names |= set(orphans)
        for name in sorted(names):
            row = rows.get(name)
            slot_name = row.slot_name if row else orphans[name]
            info = slots.get(slot_name)
            group = response.groups.add(name=name, slot_name=slot_name)
            if row is not None:
                group.consistent_lsn = row.consistent_lsn
                group.snapshot_done = row.snapshot_done
                group.tables.extend(row.tables)
            if info is not None:
                group.slot_exists = True
                group.confirmed_flush_lsn = info.confirmed_flush_lsn
                group.retained_wal_bytes = max(0, info.retained_wal_bytes)
                group.active = info.active
            group.holder = self._holder(name) or ""
        return response

    def _holder(self, group: str) -> str | None:
        if self.etcd is None:
            return None
        try:
            kv = self.etcd.get(self.slot_key(group))
        except EtcdUnavailable:
            return None
        return None if kv is None else kv.value.decode()

    def drop_group(self, group: str, timeout_s: float = 15.0) -> collector_pb2.DropConsumerGroupResponse:
        if not GROUP_NAME.fullmatch(group or ""):
            raise InvalidArgument("consumer_group: must match [a-z][a-z0-9_]{0,40}")
        # Only an abandoned group is dropped: with a consumer connected (streaming or standing
        # by, here or on another collector) it would come back at once with a new snapshot.
        with self._lock:
            local = [s for s in self._subscriptions if s.group == group and not s.closed.is_set()]
        if local:
            raise FailedPrecondition(f"consumer group {group} has {len(local)} consumer(s) connected to "
                                     f"collector {self.collector_id}; stop them first")
        lock = self.group_lock(group)
        if not lock.acquire(timeout=timeout_s):
            raise Unavailable(f"consumer group {group}: its stream on this collector did not stop")
        leadership = None
        try:
            if self.etcd is not None:
                leadership = Leadership(self.etcd, self.slot_key(group), self.collector_id,
                                        self.settings.lease_ttl_s)
                try:
                    acquired = leadership.try_acquire()
                except EtcdUnavailable as error:
                    raise Unavailable(f"etcd unavailable: {error}") from error
                if not acquired:
                    holder = self._holder(group) or "?"
                    raise FailedPrecondition(f"consumer group {group} is being streamed by collector "
                                             f"{holder}; stop its consumers (or drop it there) first")
            row = self.store.group(group)
            slot_name = row.slot_name if row else self.store.slot_name(group)
            # We hold the lease: a walsender still on the slot belongs to a stream being torn down.
            if self.store.terminate_slot_user(slot_name) is not None:
                time.sleep(0.2)
            dropped = self.drop_slot(slot_name)
            dropped = self.store.delete_group(group) or dropped
            log.info("consumer group dropped", extra={"group": group, "slot": slot_name, "existed": dropped})
            return collector_pb2.DropConsumerGroupResponse(dropped=dropped)
        finally:
            if leadership is not None:
                try:
                    leadership.resign()
                except Exception:  # noqa: BLE001 - expires by itself
                    pass
            lock.release()

    def drop_slot(self, slot_name: str, timeout_s: float = 10.0) -> bool:
        """Drops a slot, waiting for a walsender that is exiting to let go of it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.store.drop_slot(slot_name)
            except Exception as error:  # noqa: BLE001
                if "is active" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self, timeout_s: float = 10.0) -> None:
        self._closed = True
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.cancel("collector is shutting down")
        deadline = time.monotonic() + timeout_s
        for subscription in subscriptions:
            subscription.closed.wait(max(0.0, deadline - time.monotonic()))

