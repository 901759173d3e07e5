"""One subscription of the delta stream: a consumer group's slot, snapshot, batches and acks.
Plain Python over protobuf messages (no gRPC): `CdcHub.open(...)` (hub.py) returns a
`Subscription` whose `responses()` yields SubscribeResponse messages and whose `ack(lsn)` takes
the consumer's acks; the gRPC edge (service.py) only moves messages between the two.

One subscription = one stream of one group:

1. It takes the group's slot: a per-process lock (one stream per group per collector), then
   the etcd key `collector/slots/<group>` under a lease (one stream per group cluster-wide).
   While someone else holds it the subscription *waits* and sends heartbeats with
   `standby=true` and the holder's id; it takes over when the holder releases the slot (its
   stream ended) or dies (its lease expires after COLLECTOR_SLOT_LEASE_TTL_S). A walsender still
   attached to the slot after COLLECTOR_SLOT_FENCE_S (a holder cut off from etcd but not from
   Postgres) is terminated: the lease, not the connection, says who owns the slot. A holder
   that loses its lease ends its stream with UNAVAILABLE.
2. If the group has no completed snapshot (new group; slot or row lost; or a snapshot that was
   never acked to its end, e.g. after a crash), the slot is (re)created with an exported
   snapshot and the snapshot is sent first (see snapshot.py), then the stream from the slot's
   consistent point. Otherwise the stream resumes at the slot's confirmed position: whatever
   was sent but not acked before is sent again (at-least-once).
3. Batches hold whole transactions, up to max_batch_size deltas (a larger transaction is one
   batch). Acks are cumulative; an ack is rounded down to the last batch boundary it covers, so
   the slot is only ever confirmed at a commit's end LSN.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Iterator

from deltarec.v1 import collector_pb2

from services.collector.cdc import metrics
from services.collector.cdc.buffer import BufferClosed, TransactionBuffer
from services.collector.cdc.convert import batch_of
from services.collector.cdc.reader import ReplicationReader, SlotBusy
from services.collector.cdc.slots import GroupRow
from services.collector.cdc.snapshot import Snapshot
from services.common.errors import FailedPrecondition, Unavailable
from services.common.etcd import EtcdUnavailable, Leadership

if TYPE_CHECKING:
    from services.collector.cdc.hub import CdcHub

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The subscription was cancelled (client gone, group dropped, collector shutting down)."""


class Subscription:
    def __init__(self, hub: CdcHub, group: str, tables: tuple[str, ...], max_batch_size: int,
                 resume_after_lsn: int = 0) -> None:
        self.hub, self.group, self.requested_tables = hub, group, tables
        self.max_batch_size = max_batch_size
        self.resume_after_lsn = resume_after_lsn
        # Transactions committed at or before this go one per batch (see `_prepare`).
        self.single_through_lsn = 0
        self.settings = hub.settings
        self.stats = hub.stats(group)
        self._cancelled = threading.Event()
        self.cancel_reason = ""
        self._cancelled_by_server = False
        self.closed = threading.Event()
        self._condition = threading.Condition()
        self.unacked: collections.deque[tuple[int, int]] = collections.deque()   # (commit_lsn, deltas)
        self.acked_lsn = 0
        self.last_sent_lsn = 0
        self.reader: ReplicationReader | None = None
        self.buffer: TransactionBuffer | None = None
        self.snapshot: Snapshot | None = None
        self.snapshot_pending = False
        self.consistent_lsn = 0
        self.tables: tuple[str, ...] = ()
        self.leadership: Leadership | None = None
        self._lock_held = False
        self._streaming = False
        self._last_sent = time.monotonic()

    # ------------------------------------------------------------------ control
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, reason: str = "cancelled", by_server: bool = True) -> None:
        """Ends the subscription. `by_server`: the collector ends it (shutdown, group dropped),
        and the consumer is told UNAVAILABLE; otherwise the consumer went away."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled_by_server = by_server
            self._cancelled.set()
        if self.buffer is not None:
            self.buffer.wake()
        with self._condition:
            self._condition.notify_all()

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled(self.cancel_reason)
        if self.leadership is not None and self._streaming and not self.leadership.held:
            raise Unavailable(f"collector {self.hub.collector_id} lost the lease of consumer group "
                              f"{self.group}; reconnect")

    # ------------------------------------------------------------------ acks
    def ack(self, lsn: int) -> None:
        """The consumer durably applied everything up to `lsn`."""
        metrics.ACKS.labels(self.group).inc()
        with self._condition:
            effective = 0
            while self.unacked and self.unacked[0][0] <= lsn:
                effective = self.unacked.popleft()[0]
            self.stats.unacked = len(self.unacked)
            if effective == 0:
                if lsn > self.last_sent_lsn:
                    log.warning("ack beyond what was sent; ignored",
                                extra={"group": self.group, "lsn": lsn, "last_sent": self.last_sent_lsn})
                return
            self.acked_lsn = effective
            self._condition.notify_all()
        self.stats.acked(effective)
        if self.snapshot_pending and effective >= self.consistent_lsn:
            self.snapshot_pending = False
            try:
                self.hub.store.mark_snapshot_done(self.group, self.consistent_lsn)
                log.info("initial snapshot acked", extra={"group": self.group,
                                                          "consistent_lsn": self.consistent_lsn})
            except Exception as error:  # noqa: BLE001 - redone (safely) on the next subscription
                log.warning("could not record the snapshot's end", extra={"group": self.group,
                                                                          "error": str(error)[:200]})
        if self.reader is not None:
            self.reader.confirm(effective)

    # ------------------------------------------------------------------ messages
    def _heartbeat(self, standby: bool = False, holder: str = "") -> collector_pb2.SubscribeResponse:
        heartbeat = collector_pb2.Heartbeat(server_lsn=self.hub.wal_lsn(), standby=standby, holder=holder)
        heartbeat.server_time.GetCurrentTime()
        if self.reader is not None and not standby:
            caught_up = self.reader.caught_up_lsn
            if caught_up and self.acked_lsn >= self.reader.last_enqueued_lsn and not self.unacked:
                heartbeat.caught_up_lsn = caught_up
                self.stats.caught_up_lsn = caught_up
        self._last_sent = time.monotonic()
        return collector_pb2.SubscribeResponse(heartbeat=heartbeat)

    def _send(self, batch: collector_pb2.DeltaBatch) -> collector_pb2.SubscribeResponse:
        count = len(batch.deltas)
        with self._condition:
            self.unacked.append((batch.commit_lsn, count))
            self.stats.unacked = len(self.unacked)
            self.last_sent_lsn = batch.commit_lsn
        if batch.commit_lsn <= self.stats.max_sent_lsn and not batch.snapshot:
            metrics.REDELIVERED.labels(self.group).inc(count)
        self.stats.max_sent_lsn = max(self.stats.max_sent_lsn, batch.commit_lsn)
        metrics.DELTAS.labels(self.group).inc(count)
        metrics.BATCHES.labels(self.group).inc()
        if batch.snapshot:
            metrics.SNAPSHOT_ROWS.labels(self.group).inc(count)
        self._last_sent = time.monotonic()
        return collector_pb2.SubscribeResponse(batch=batch)

    def _wait_window(self) -> Iterator[collector_pb2.SubscribeResponse]:
        """Flow control by acks: at most max_unacked_batches in flight."""
        limit = self.settings.max_unacked_batches
        if not limit:
            return
        while True:
            self._check()
            with self._condition:
                if len(self.unacked) < limit:
                    return
                self._condition.wait(self._until_heartbeat())
            if time.monotonic() - self._last_sent >= self.settings.heartbeat_s:
                yield self._heartbeat()

    def _until_heartbeat(self) -> float:
        return max(0.01, self._last_sent + self.settings.heartbeat_s - time.monotonic())

    # ------------------------------------------------------------------ the stream
    def responses(self) -> Iterator[collector_pb2.SubscribeResponse]:
        """Heartbeats while waiting for the slot, then the snapshot (if due), then the stream.
        Ends when cancelled; raises a DeltaRecError (Unavailable, ...) on failures."""
        try:
            yield from self._acquire()
            yield from self._prepare()
            self._streaming = True
            metrics.STREAMS.labels(self.group).inc()
            try:
                yield from self._stream()
            finally:
                metrics.STREAMS.labels(self.group).dec()
        except Cancelled:
            if self._cancelled_by_server:
                raise Unavailable(f"{self.cancel_reason}; reconnect") from None
            return

    def _acquire(self) -> Iterator[collector_pb2.SubscribeResponse]:
        heartbeat_s = self.settings.heartbeat_s
        lock = self.hub.group_lock(self.group)
        metrics.STANDBY.labels(self.group).inc()
        try:
            while not lock.acquire(timeout=min(heartbeat_s, 0.5)):
                self._check()
                if time.monotonic() - self._last_sent >= heartbeat_s:
                    yield self._heartbeat(standby=True, holder=self.hub.collector_id)
            self._lock_held = True
            self._check()
            if self.hub.etcd is None:
                return
            self.leadership = Leadership(self.hub.etcd, self.hub.slot_key(self.group), self.hub.collector_id,
                                         self.settings.lease_ttl_s)
            waiting_logged = False
            while True:
                try:
                    if self.leadership.try_acquire():
                        break
                    holder = self.hub._holder(self.group) or ""
                except EtcdUnavailable as error:
                    holder = ""
                    log.warning("etcd unavailable while taking a slot", extra={"group": self.group,
                                                                                "error": str(error)[:200]})
                if not waiting_logged:
                    log.info("slot held elsewhere; standing by", extra={"group": self.group, "holder": holder})
                    waiting_logged = True
                self._check()
                if time.monotonic() - self._last_sent >= heartbeat_s:
                    yield self._heartbeat(standby=True, holder=holder)
                self._cancelled.wait(min(heartbeat_s, 0.5))
                self._check()
            log.info("slot lease taken", extra={"group": self.group, "collector": self.hub.collector_id})
        finally:
            metrics.STANDBY.labels(self.group).dec()

    def _wait_slot_free(self, slot_name: str) -> Iterator[collector_pb2.SubscribeResponse]:
        """Waits for a walsender still attached to the slot to go (a previous holder's
        connection being torn down); terminates it after COLLECTOR_SLOT_FENCE_S."""
        deadline = time.monotonic() + self.settings.fence_s
        while True:
            info = self.hub.store.slot(slot_name)
            if info is None or not info.active:
                return
            self._check()
            if time.monotonic() >= deadline:
                pid = self.hub.store.terminate_slot_user(slot_name)
                log.warning("terminated a walsender still attached to a slot we hold the lease of",
                            extra={"group": self.group, "slot": slot_name, "pid": pid})
                deadline = time.monotonic() + self.settings.fence_s
            if time.monotonic() - self._last_sent >= self.settings.heartbeat_s:
                yield self._heartbeat()
            self._cancelled.wait(0.1)

    def _prepare(self) -> Iterator[collector_pb2.SubscribeResponse]:
        store = self.hub.store
        slot_name = store.slot_name(self.group)
        row = store.group(self.group)
        slot = store.slot(slot_name)
        resume = row is not None and row.snapshot_done and slot is not None and row.slot_name == slot_name
        if resume:
            missing = [t for t in self.requested_tables if t not in row.tables]
            if missing:
                raise FailedPrecondition(
                    f"consumer group {self.group} receives tables {', '.join(row.tables)}, not "
                    f"{', '.join(missing)}; drop the group to change its tables")
            self.tables = self.requested_tables or row.tables
        else:
            self.tables = self.requested_tables or self.hub.tables
            if row is not None and row.snapshot_done:
                log.warning("the group's slot is gone: a new snapshot follows",
                            extra={"group": self.group, "slot": slot_name})
            elif row is not None or slot is not None:
                log.warning("the group's initial snapshot was never completed: starting it over",
                            extra={"group": self.group, "slot": slot_name})
        self.buffer = TransactionBuffer(self.settings.buffer_deltas)
        self.stats.buffer = self.buffer
        self.stats.reset_pending()
        self.reader = ReplicationReader(self.hub.dsn, slot_name, self.hub.publication, self.tables,
                                        self.buffer, feedback_interval_s=min(1.0, self.settings.heartbeat_s),
                                        on_enqueue=self.stats.enqueued)
        if resume:
            # Whatever an earlier stream of the group may have sent was committed before now.
            # Unless the consumer told us exactly where it is, those transactions go one per
            # batch: a consumer's batch-level high-water mark is then exact whatever batches it
            # applied before (a redelivered batch is never a mix of applied and new transactions).
            horizon = store.current_wal_lsn()
            resume_after = self.resume_after_lsn
            if resume_after > horizon:
                log.warning("resume_after_lsn beyond the server's WAL position; ignored",
                            extra={"group": self.group, "resume_after_lsn": resume_after, "wal_lsn": horizon})
                resume_after = 0
            if resume_after > slot.confirmed_flush_lsn:
                self.reader.skip_through_lsn = resume_after
                self.reader.acked_lsn = resume_after
                self.acked_lsn = resume_after
                self.stats.acked(resume_after)
            if resume_after == 0:
                self.single_through_lsn = horizon
            for _attempt in range(100):
                yield from self._wait_slot_free(slot_name)
                self.reader.connect()
                try:
                    self.reader.start(0)
                    break
                except SlotBusy:
                    self.reader._close_connection()
                    self._cancelled.wait(0.2)
            else:
                raise Unavailable(f"replication slot {slot_name} stays busy; retry")
            log.info("streaming resumed", extra={"group": self.group, "slot": slot_name,
                                                 "confirmed_lsn": slot.confirmed_flush_lsn})
            return
        if slot is not None:
            yield from self._wait_slot_free(slot_name)
            self.hub.drop_slot(slot_name)
        self._check()
        self.reader.connect()
        consistent_lsn, snapshot_name = self.reader.create_slot()
        self.snapshot = Snapshot(self.hub.dsn, snapshot_name, self.tables, consistent_lsn, self.max_batch_size)
        store.save_group(GroupRow(self.group, slot_name, self.tables, consistent_lsn, self.snapshot.rows, False))
        self.consistent_lsn = consistent_lsn
        self.snapshot_pending = True
        self.reader.required_lsn = consistent_lsn
        self.reader.start(0)
        metrics.SNAPSHOTS.labels(self.group).inc()
        log.info("slot created; initial snapshot follows",
                 extra={"group": self.group, "slot": slot_name, "consistent_lsn": consistent_lsn,
                        "rows": self.snapshot.rows, "batches": self.snapshot.batches})

    def _stream(self) -> Iterator[collector_pb2.SubscribeResponse]:
        if self.snapshot is not None:
            for batch in self.snapshot.read():
                yield from self._wait_window()
                self._check()
                if self.reader.error is not None:
                    raise Unavailable(f"replication stream failed: {self.reader.error}")
                yield self._send(batch)
            self.snapshot.close()
            self.snapshot = None
        while True:
            yield from self._wait_window()
            self._check()
            try:
                transactions = self.buffer.take(self.max_batch_size, timeout=self._until_heartbeat(),
                                                single_through_lsn=self.single_through_lsn)
            except BufferClosed:
                self._check()
                raise Unavailable("replication stream ended; reconnect") from None
            except Exception as error:  # noqa: BLE001 - the reader's failure, re-raised by the buffer
                self._check()
                raise Unavailable(f"replication stream failed: {str(error).strip()[:300]}") from error
            if transactions:
                yield self._send(batch_of(transactions))
            elif time.monotonic() - self._last_sent >= self.settings.heartbeat_s:
                self._check()
                yield self._heartbeat()

    def close(self) -> None:
        self.cancel(self.cancel_reason or "closed")
        try:
            if self.reader is not None:
                self.reader.stop()
            if self.snapshot is not None:
                self.snapshot.close()
        finally:
            if self.leadership is not None:
                try:
                    self.leadership.resign()
                except Exception:  # noqa: BLE001 - the lease expires by itself
                    pass
            if self._lock_held:
                self._lock_held = False
                self.hub.group_lock(self.group).release()
            self.stats.buffer = None
            self.hub._forget(self)
            self.closed.set()
