"""Publishes the applied watermark to etcd (`data/watermark`), off the apply path.

Applying a batch must not wait for etcd (nor stop when etcd is down): the applier only records
the latest committed LSN here; a background thread writes it at most every `interval_s`, and
keeps retrying through outages. Only committed LSNs are ever published, so the key never claims
data that a crash could take back, and it only moves forward within a process (after a restart
the store's watermark is at least the last one published).
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

from prometheus_client import Counter

from services.common.lsn import format_lsn
from services.contracts.etcd_keys import DATA_WATERMARK

log = logging.getLogger(__name__)

PUBLISH_FAILURES = Counter("deltarec_features_watermark_publish_failures_total",
                           "Failed writes of data/watermark to etcd")


def watermark_value(lsn: int, consumer: str, commit_time: datetime | None) -> dict:
    return {"lsn": lsn, "lsn_text": format_lsn(lsn), "consumer": consumer,
            "commit_time": commit_time.isoformat() if commit_time else None,
            "published_at": datetime.now(timezone.utc).isoformat()}


class WatermarkPublisher:
    def __init__(self, etcd, consumer: str, interval_s: float = 0.2) -> None:
        self.etcd, self.consumer, self.interval_s = etcd, consumer, interval_s
        self._condition = threading.Condition()
        self._pending: tuple[int, datetime | None] | None = None
        self.published_lsn = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="watermark", daemon=True)
        self._thread.start()

    def set(self, lsn: int, commit_time: datetime | None = None) -> None:
        with self._condition:
            if lsn > max(self.published_lsn, self._pending[0] if self._pending else 0):
                self._pending = (lsn, commit_time)
                self._condition.notify()

    def _run(self) -> None:
        backoff = 0.2
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending is not None or self._stop)
                if self._pending is None:
                    return
                lsn, commit_time = self._pending
            try:
                self.etcd.put(DATA_WATERMARK, watermark_value(lsn, self.consumer, commit_time))
            except Exception as error:  # noqa: BLE001 - etcd down: keep applying, retry later
                PUBLISH_FAILURES.inc()
                log.warning("watermark not published; retrying",
                            extra={"lsn": lsn, "error": str(error)[:200]})
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            with self._condition:
                self.published_lsn = lsn
                if self._pending is not None and self._pending[0] <= lsn:
                    self._pending = None
                stopping = self._stop
            if stopping:
                if self._pending is None:
                    return
                continue
            time.sleep(self.interval_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Publishes what is pending (within `timeout_s`), then stops."""
        with self._condition:
            self._stop = True
            self._condition.notify_all()
        self._thread.join(timeout_s)
