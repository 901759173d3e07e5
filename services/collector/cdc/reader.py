"""The replication reader of one slot: a thread that owns one logical replication connection,
decodes pgoutput, assembles whole transactions of the group's tables into the bounded buffer,
and sends the slot its feedback.

Confirmation rule (what `flush_lsn` the slot is told):

1. An LSN the consumer acked — always a commit's end LSN, i.e. a transaction boundary.
2. When the consumer is fully caught up, the server's position `wal_end` from the replication
   stream (the walsender's keepalive or last message), even though the consumer never acked it.
   Fully caught up means: the reader is between transactions (it received a Commit last, not a
   Begin), and the consumer acked everything the reader enqueued (acked >= last enqueued commit)
   — and, during an initial snapshot, acked the snapshot's end. This is safe because the
   walsender sends a transaction, in commit order, when it decodes its commit record, and its
   keepalive position is at most the start of the next record it has not fully sent: every
   transaction committed before `wal_end` was already received, and either it had no change for
   the group's tables (nothing to deliver) or it was enqueued and hence acked. A transaction
   still open at `wal_end` commits after it, so the slot still sends it after a restart
   (decoding resumes at the slot's restart_lsn, which Postgres keeps behind open transactions).
   It is the rule Postgres' own apply worker and pg_recvlogical follow, and what lets a slot
   advance (and release WAL) while nothing is published or the group's tables are idle.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Callable, Collection

import psycopg2
import psycopg2.errors
import psycopg2.extras

from services.collector.cdc.buffer import BufferClosed, Transaction, TransactionBuffer
from services.collector.cdc.pgoutput import Begin, Commit, Decoder
from services.common.lsn import parse_lsn

log = logging.getLogger(__name__)


class SlotBusy(Exception):
    """START_REPLICATION refused: another walsender is attached to the slot."""


class ReplicationReader:
    def __init__(self, dsn: str, slot_name: str, publication: str, tables: Collection[str],
                 buffer: TransactionBuffer, *, feedback_interval_s: float = 1.0,
                 on_enqueue: Callable[[Transaction], None] | None = None) -> None:
        self.dsn, self.slot_name, self.publication = dsn, slot_name, publication
        self.tables = frozenset(tables)
        self.buffer = buffer
        self.feedback_interval_s = feedback_interval_s
        self.on_enqueue = on_enqueue
        self.connection = None
        self.cursor = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Positions (ints, read and written atomically under the GIL).
        self.acked_lsn = 0              # highest transaction boundary the consumer acked
        self.required_lsn = 0           # the consumer must ack at least this before rule 2 applies
        self.skip_through_lsn = 0       # transactions committed at or before this are not enqueued
                                        # (the consumer said it has them: SubscribeStart.resume_after_lsn)
        self.last_enqueued_lsn = 0      # commit end LSN of the last transaction put in the buffer
        self.confirmed_lsn = 0          # last flush_lsn sent to the server
        self.caught_up_lsn = 0          # nonzero while rule 2 holds: the position confirmed by it
        self.in_transaction = False
        self.error: BaseException | None = None
        self.messages = 0

    # ------------------------------------------------------------------ setup (caller's thread)
    def connect(self) -> None:
        self.connection = psycopg2.connect(self.dsn,
                                           connection_factory=psycopg2.extras.LogicalReplicationConnection)
        self.cursor = self.connection.cursor()

    def create_slot(self) -> tuple[int, str]:
        """Creates the slot with an exported snapshot; returns (consistent point, snapshot
        name). The snapshot stays importable until this connection runs its next command
        (START_REPLICATION), so import it first."""
        self.cursor.execute(f'CREATE_REPLICATION_SLOT "{self.slot_name}" LOGICAL pgoutput EXPORT_SNAPSHOT')
        _, consistent_point, snapshot_name, _ = self.cursor.fetchone()
        return parse_lsn(consistent_point), snapshot_name

    def start(self, start_lsn: int = 0) -> None:
        """START_REPLICATION from `start_lsn` (0: the slot's confirmed position) and the reading
        thread. Raises SlotBusy when another walsender holds the slot."""
        try:
            self.cursor.start_replication(
                slot_name=self.slot_name, decode=False, start_lsn=start_lsn,
                options={"proto_version": "1", "publication_names": self.publication},
                status_interval=max(1, int(self.feedback_interval_s * 5)))
        except psycopg2.errors.ObjectInUse as error:
            raise SlotBusy(str(error).strip()) from error
        self._thread = threading.Thread(target=self._run, name=f"cdc-reader-{self.slot_name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ from other threads
    def confirm(self, lsn: int) -> None:
        """The consumer durably applied everything up to `lsn` (a transaction boundary)."""
        if lsn > self.acked_lsn:
            self.acked_lsn = lsn
            self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._close_connection()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _close_connection(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:  # noqa: BLE001
                pass

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self._loop()
        except BufferClosed:
            pass
        except BaseException as error:  # noqa: BLE001 - reported to the stream, which fails
            if not self._stop.is_set():
                log.warning("replication reader failed", extra={"slot": self.slot_name, "error": str(error)[:300]})
                self.error = error
                self.buffer.close(error)
        finally:
            self.buffer.wake()

    def _loop(self) -> None:
        cursor, decoder, tables = self.cursor, Decoder(), self.tables
        current: Transaction | None = None
        last_feedback = 0.0
        since_feedback = 0
        while not self._stop.is_set():
            message = cursor.read_message()
            if message is None:
                self.in_transaction = current is not None
                last_feedback = self._feedback(last_feedback)
                since_feedback = 0
                readable, _, _ = select.select([cursor, self._wake_r], [], [], self.feedback_interval_s)
                if self._wake_r in readable:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                continue
            self.messages += 1
            payload = message.payload
            kind = payload[0]
            if kind == 0x42:      # Begin
                begin = decoder.feed(payload, message.data_start)[0]
                assert isinstance(begin, Begin)
                current = Transaction(begin.xid, 0, begin.commit_time_us)
                self.in_transaction = True
            elif kind == 0x43:    # Commit
                commit = decoder.feed(payload, message.data_start)[0]
                assert isinstance(commit, Commit)
                if current is not None and current.changes and commit.end_lsn > self.skip_through_lsn:
                    current.commit_lsn = commit.end_lsn
                    self.last_enqueued_lsn = commit.end_lsn
                    self._enqueue(current)
                current = None
                self.in_transaction = False
            elif (table := decoder.row_table(payload)) is not None and table not in tables:
                pass                  # a row of a published table this group does not receive: not decoded
            else:
                _, changes = decoder.feed(payload, message.data_start)
                if changes and current is not None:
                    for change in changes:
                        if change.table in tables:
                            current.changes.append(change)
            since_feedback += 1
            if since_feedback >= 500:
                # A long run of messages: keep the server informed of acks now and then.
                self.in_transaction = current is not None
                last_feedback = self._feedback(last_feedback)
                since_feedback = 0

    def _enqueue(self, transaction: Transaction) -> None:
        if self.on_enqueue is not None:
            self.on_enqueue(transaction)
        last_feedback = 0.0
        while not self.buffer.put(transaction, timeout=self.feedback_interval_s):
            if self._stop.is_set():
                raise BufferClosed()
            # The consumer is slow: we are not reading, but the walsender must still hear from
            # us within wal_sender_timeout, and acks must still reach the slot.
            last_feedback = self._feedback(last_feedback)

    def _feedback(self, last_feedback: float) -> float:
        cursor = self.cursor
        target = self.acked_lsn
        required = max(self.last_enqueued_lsn, self.required_lsn)
        if not self.in_transaction and self.acked_lsn >= required:
            wal_end = cursor.wal_end or 0
            target = max(target, wal_end)
            self.caught_up_lsn = max(target, self.confirmed_lsn)
        else:
            self.caught_up_lsn = 0
        now = time.monotonic()
        if target > self.confirmed_lsn and target >= self.required_lsn:
            cursor.send_feedback(flush_lsn=target, force=True)
            self.confirmed_lsn = target
            return now
        if now - last_feedback >= self.feedback_interval_s:
            cursor.send_feedback(force=True)
            return now
        return last_feedback
