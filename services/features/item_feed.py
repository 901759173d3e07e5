"""The item-change feed behind WatchItems: every change after a watermark, then live changes.

The store is the feed: each item row carries `updated_lsn`, the commit LSN of its last change of
catalog data or vector, and the applied watermark commits with it. A watcher's position is a
watermark W; a round sends every item with updated_lsn > W (keyset pages in (updated_lsn, item_id)
order, each read in one statement with the watermark U of its snapshot), the page ending the
round carrying U, then waits. Because the latest state of an item replaces what the receiver has,
sending each changed item once per round, in its latest state, is exactly "the changes up to U";
an item changed again during a round goes out in that round at its later LSN (its row moved ahead
of the cursor), never after the position passed its first change. The in-process `LsnNotifier` wakes watchers as soon as a batch
commits; a periodic re-read (`poll_s`) covers writers in other processes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from services.common.errors import FailedPrecondition
from services.features.items import ItemRecord
from services.features.store import FeatureStore

UPSERT, REMOVE = "upsert", "remove"


class LsnNotifier:
    """The latest committed watermark, with waiting for it to pass a value."""

    def __init__(self, lsn: int = 0) -> None:
        self._condition = threading.Condition()
        self._lsn = lsn
        self._closed = False

    @property
    def lsn(self) -> int:
        return self._lsn

    def publish(self, lsn: int) -> None:
        with self._condition:
            if lsn > self._lsn:
                self._lsn = lsn
                self._condition.notify_all()

    def wait_beyond(self, lsn: int, timeout_s: float) -> int:
        with self._condition:
            self._condition.wait_for(lambda: self._lsn > lsn or self._closed, timeout=timeout_s)
            return self._lsn

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass(frozen=True)
class ItemChange:
    kind: str              # UPSERT or REMOVE
    item: ItemRecord
    lsn: int


@dataclass(frozen=True)
class Page:
    changes: list[ItemChange]
    # The receiver has every change up to here once it applied this page.
    watermark: int


def as_change(record: ItemRecord) -> ItemChange:
    return ItemChange(UPSERT if record.listed and record.embedding is not None else REMOVE,
                      record, record.updated_lsn)


class ItemChangeFeed:
    def __init__(self, store: FeatureStore, notifier: LsnNotifier, *, poll_s: float = 1.0,
                 heartbeat_s: float = 5.0) -> None:
        self.store, self.notifier, self.poll_s, self.heartbeat_s = store, notifier, poll_s, heartbeat_s

    def pages(self, after_lsn: int, max_batch: int, active: Callable[[], bool]) -> Iterator[Page]:
        """Pages of changes after `after_lsn` until `active()` turns false or the feed closes.
        The first round always ends with a page (possibly empty) whose watermark says the
        receiver has caught up; later rounds send a page only when something changed, or a bare
        watermark every `heartbeat_s` while the store moves without item changes."""
        watermark = after_lsn
        first_round = True
        last_sent = time.monotonic()
        while active() and not self.notifier.closed:
            # A round: every item whose row is past the position, in keyset pages, each page read
            # with the watermark of its snapshot (one statement). Only the page ending the round
            # claims a position (that watermark): an item changed again while the round runs has
            # moved its row ahead of the cursor, so it is still sent in this round, in its latest
            # state, before the position passes its earlier change — a full page claiming its
            # last row's LSN could pass a change whose row moved beyond the page.
            notified = self.notifier.lsn      # committed before this round's reads
            cursor: tuple[int, str | None] = (watermark, None)
            while True:
                rows, applied = self.store.read_changes(cursor, max_batch)
                if applied < watermark:
                    # Watermarks only come from this store, which only moves forward — except
                    # when a snapshot started over rebuilt it: the receiver must start again from 0.
                    raise FailedPrecondition(
                        f"after_lsn: {watermark} is ahead of the feature store ({applied}); it was rebuilt "
                        "from a new snapshot: watch again from after_lsn=0")
                changes = [as_change(row) for row in rows]
                if after_lsn == 0 and first_round:
                    changes = [change for change in changes if change.kind == UPSERT]
                if len(rows) == max_batch:
                    if changes:
                        yield Page(changes, watermark)
                        last_sent = time.monotonic()
                    cursor = (rows[-1].updated_lsn, rows[-1].item_id)
                    continue
                heartbeat_due = time.monotonic() - last_sent >= self.heartbeat_s
                if changes or first_round or (applied > watermark and heartbeat_due):
                    yield Page(changes, applied)
                    last_sent = time.monotonic()
                    watermark = applied
                break
            first_round = False
            # Woken by a commit of this process; after a quiet poll interval, a round anyway
            # (other writers, a rebuilt store).
            self.notifier.wait_beyond(max(watermark, notified), self.poll_s)
