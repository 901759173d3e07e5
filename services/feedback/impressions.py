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
import json
import logging
import threading
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
SELECT row->>0, to_timestamp((row->>1)::float8), row->>2, (row->>3)::bigint, row->>4, row->>5,
       ARRAY(SELECT json_array_elements_text(row->6))
FROM json_array_elements(%(rows)s::json) AS row
ON CONFLICT (recommendation_id) DO NOTHING
"""


def postgres_writer(engine) -> Callable[[Sequence[Impression]], None]:
    """Writes one batch in one statement whose only parameter is the batch as one JSON text
    (one array per impression), unpacked in SQL. Why: this runs in the ranker, sharing its GIL
    with the request threads. Binding seven 1,000-element arrays made psycopg2 quote every
    element under the GIL (py-spy, bench/ranker.py --only attribution --profile: the flush was
    ~12% of the replica's Python time); json.dumps of tuples is one C call, and one long string
    is escaped at once."""
    def write(batch: Sequence[Impression]) -> None:
        rows = json.dumps([(i.recommendation_id, i.shown_at, i.user_id, i.model_version, i.variant, i.kind,
                            i.item_ids) for i in batch], ensure_ascii=False, check_circular=False)
        connection = engine.raw_connection()
        try:
            with connection.cursor() as cursor:
                cursor.execute(INSERT_SQL, {"rows": rows})
            connection.commit()
        finally:
            connection.close()
    return write


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
