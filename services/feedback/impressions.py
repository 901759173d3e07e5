"""Impressions off the request path: a bounded in-process queue, flushed in batches by one
background thread into the `impressions` table (migration 0009).

`offer()` never blocks and never touches the database: when the queue is full the impression is
dropped and counted (`deltarec_impressions_dropped_total{reason="queue_full"}`). A failed flush
keeps its batch and retries (at-least-once: the insert skips ids already stored), so only what is
still queued when the process dies is lost; `close()` flushes what is left, and counts what it
could not write (`reason="shutdown"`). Nothing is lost silently.
"""
from __future__ import annotations

import collections
import logging
import threading
from datetime import datetime, timezone
from typing import Callable, Sequence

from prometheus_client import Counter, Gauge

from services.feedback.online_metrics import Impression

log = logging.getLogger(__name__)

QUEUED = Gauge("deltarec_impressions_queued", "Impressions waiting to be written")
WRITTEN = Counter("deltarec_impressions_written_total", "Impressions written to the impressions table")
DROPPED = Counter("deltarec_impressions_dropped_total", "Impressions lost, by reason", ["reason"])
FLUSH_FAILURES = Counter("deltarec_impressions_flush_failures_total", "Failed impression batch writes")

INSERT_SQL = """
INSERT INTO impressions (recommendation_id, shown_at, user_id, model_version, variant, kind, item_ids)
SELECT recommendation_id, shown_at, user_id, model_version, variant, kind, item_ids::text[]
FROM unnest(%(ids)s::text[], %(at)s::timestamptz[], %(users)s::text[], %(versions)s::bigint[],
                     %(variants)s::text[], %(kinds)s::text[], %(items)s::text[])
    AS t(recommendation_id, shown_at, user_id, model_version, variant, kind, item_ids)
ON CONFLICT (recommendation_id) DO NOTHING
"""


def postgres_writer(engine) -> Callable[[Sequence[Impression]], None]:
    """Writes one batch in one statement. item_ids of different lengths cannot be one 2-D array,
    so each answer's ids go as one text (Postgres array literal) converted in SQL."""
    def write(batch: Sequence[Impression]) -> None:
        params = {
            "ids": [i.recommendation_id for i in batch],
            "at": [datetime.fromtimestamp(i.shown_at, timezone.utc) for i in batch],
            "users": [i.user_id for i in batch], "versions": [i.model_version for i in batch],
            "variants": [i.variant for i in batch], "kinds": [i.kind for i in batch],
            "items": [_array_literal(i.item_ids) for i in batch],
        }
        connection = engine.raw_connection()
        try:
            with connection.cursor() as cursor:
                cursor.execute(INSERT_SQL, params)
            connection.commit()
        finally:
            connection.close()
    return write


def _array_literal(values: Sequence[str]) -> str:
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


class ImpressionBuffer:
    def __init__(self, write: Callable[[Sequence[Impression]], None], *, capacity: int = 100_000,
                 batch_size: int = 1000, interval_s: float = 1.0, retry_s: float = 2.0) -> None:
        self.write, self.capacity, self.batch_size = write, capacity, batch_size
        self.interval_s, self.retry_s = interval_s, retry_s
        self._queue: collections.deque[Impression] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self.dropped = 0

    def start(self) -> "ImpressionBuffer":
        self._thread.start()
        return self

    def offer(self, impression: Impression) -> bool:
        """The request path's only call: O(1), no I/O. False (and counted) when full."""
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            DROPPED.labels("queue_full").inc()
            return False
        self._queue.append(impression)   # deque.append is atomic under the GIL
        if len(self._queue) >= self.batch_size:
            self._wake.set()
        return True

    def flush_once(self) -> int:
        batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
        if not batch:
            return 0
        try:
            self.write(batch)
        except Exception as error:  # noqa: BLE001 - Postgres down: keep the batch, retry later
            FLUSH_FAILURES.inc()
            log.warning("impression batch not written; retrying", extra={"error": str(error), "size": len(batch)})
            self._queue.extendleft(reversed(batch))
            raise
        WRITTEN.inc(len(batch))
        return len(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                while self.flush_once() == self.batch_size:
                    pass
            except Exception:  # noqa: BLE001
                self._stop.wait(self.retry_s)
            QUEUED.set(len(self._queue))

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            while self.flush_once():
                pass
        except Exception:  # noqa: BLE001
            pass
        if self._queue:
            DROPPED.labels("shutdown").inc(len(self._queue))
            log.error("impressions lost at shutdown", extra={"count": len(self._queue)})
            self._queue.clear()
