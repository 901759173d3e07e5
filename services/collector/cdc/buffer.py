"""The bounded buffer between a slot's replication reader and its gRPC stream.

It holds whole decoded transactions and is bounded by the number of deltas it holds: when the
consumer is slow, `put` blocks, the reader stops reading its replication connection, and TCP
flow control slows that slot's walsender — and nothing else (each stream has its own reader,
connection and buffer). A transaction larger than the capacity is still admitted when the buffer
is empty, since a batch never splits a transaction.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from services.collector.cdc.pgoutput import RowChange


@dataclass
class Transaction:
    xid: int
    commit_lsn: int            # end LSN of the commit record: the position to ack
    commit_time_us: int        # microseconds since 2000-01-01 UTC
    changes: list[RowChange] = field(default_factory=list)


class BufferClosed(Exception):
    pass


class TransactionBuffer:
    def __init__(self, capacity_deltas: int) -> None:
        self.capacity = max(1, capacity_deltas)
        self._items: collections.deque[Transaction] = collections.deque()
        self._size = 0
        self._condition = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def put(self, transaction: Transaction, timeout: float | None = None) -> bool:
        """Adds a transaction; False if there was no room within `timeout`."""
        count = len(transaction.changes)
        with self._condition:
            if not self._condition.wait_for(
                    lambda: self._closed or not self._items or self._size + count <= self.capacity, timeout):
                return False
            if self._closed:
                raise BufferClosed()
            self._items.append(transaction)
            self._size += count
            self._condition.notify_all()
            return True

    def take(self, max_deltas: int, timeout: float | None = None, single_through_lsn: int = 0) -> list[Transaction]:
        """Whole transactions totalling at most `max_deltas` deltas (at least one transaction,
        however large); [] if none arrived within `timeout`. A transaction committed at or
        before `single_through_lsn` is taken alone. Raises BufferClosed once closed and drained
        (an error set by the reader is re-raised)."""
        with self._condition:
            self._condition.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                if self._closed:
                    if self.error is not None:
                        raise self.error
                    raise BufferClosed()
                return []
            taken = [self._items.popleft()]
            total = len(taken[0].changes)
            while (self._items and taken[0].commit_lsn > single_through_lsn
                   and total + len(self._items[0].changes) <= max_deltas):
                transaction = self._items.popleft()
                total += len(transaction.changes)
                taken.append(transaction)
            self._size -= total
            self._condition.notify_all()
            return taken

    def close(self, error: BaseException | None = None) -> None:
        with self._condition:
            if error is not None and self.error is None:
                self.error = error
            self._closed = True
            if error is not None:
                # A failed reader: what is buffered is not delivered (it comes again on the next
                # subscription, from the slot), so the consumer sees the failure at once.
                self._items.clear()
                self._size = 0
            self._condition.notify_all()

    def wake(self) -> None:
        with self._condition:
            self._condition.notify_all()
