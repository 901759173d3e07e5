"""The figures of one consumer group that its metrics are computed from (lag in bytes and in
seconds, buffered deltas, unacked batches, acked LSN). One per group per collector process,
created by the hub on first use; it outlives the group's subscriptions, so the metrics of a
group keep their series across reconnects."""
from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING

from services.collector.cdc import metrics
from services.collector.cdc.buffer import Transaction, TransactionBuffer
from services.collector.cdc.pgoutput import PG_EPOCH_UNIX_S

if TYPE_CHECKING:
    from services.collector.cdc.hub import CdcHub


class GroupStats:
    """What the metrics of one group are computed from; outlives its subscriptions."""

    def __init__(self, hub: "CdcHub", group: str) -> None:
        self.hub, self.group = hub, group
        self.lock = threading.Lock()
        self.acked_lsn = 0
        self.caught_up_lsn = 0
        self.max_sent_lsn = 0                 # highest commit_lsn ever sent by this process
        self.pending: collections.deque[tuple[int, int]] = collections.deque()  # (commit_lsn, commit_time_us)
        self.buffer: TransactionBuffer | None = None
        self.unacked = 0
        metrics.LAG_BYTES.labels(group).set_function(self.lag_bytes)
        metrics.LAG_SECONDS.labels(group).set_function(self.lag_seconds)
        metrics.BUFFERED.labels(group).set_function(lambda: self.buffer.size if self.buffer else 0)
        metrics.UNACKED.labels(group).set_function(lambda: self.unacked)
        metrics.ACKED_LSN.labels(group).set_function(lambda: self.acked_lsn)

    def enqueued(self, transaction: Transaction) -> None:
        with self.lock:
            self.pending.append((transaction.commit_lsn, transaction.commit_time_us))

    def acked(self, lsn: int) -> None:
        with self.lock:
            self.acked_lsn = max(self.acked_lsn, lsn)
            while self.pending and self.pending[0][0] <= lsn:
                self.pending.popleft()

    def reset_pending(self) -> None:
        with self.lock:
            self.pending.clear()

    def lag_seconds(self) -> float:
        with self.lock:
            if not self.pending:
                return 0.0
            oldest_us = self.pending[0][1]
        return max(0.0, time.time() - (PG_EPOCH_UNIX_S + oldest_us / 1e6))

    def lag_bytes(self) -> float:
        server = self.hub.cached_wal_lsn()
        position = max(self.acked_lsn, self.caught_up_lsn)
        return float(max(0, server - position)) if server and position else 0.0

