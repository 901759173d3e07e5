"""`EtcdModelWatcher`: tells the hot swap (`ModelManager`) which versions etcd names.

It reads `model/current` and `model/canary`, then watches both from the next revision (the
common Watch resumes from the last revision after an outage), and re-reads them every
`reconcile_s` (covers a compacted history). If etcd is down nothing changes: the replica keeps
serving what it has. A value that is not a usable `ModelPointer` is refused (Status, metric,
log).
"""
from __future__ import annotations

import logging
import threading

from services.common.etcd import WatchEvent
from services.contracts.etcd_keys import MODEL_CANARY, MODEL_CURRENT, MODEL_PREFIX
from services.contracts.model_pointer import ModelPointer
from services.ranker import metrics
from services.ranker.etcd_retry import retry_against_etcd
from services.ranker.hot_swap import ModelManager

log = logging.getLogger(__name__)


class EtcdModelWatcher:
    """Feeds `ModelManager` from etcd; survives etcd outages."""

    def __init__(self, etcd, manager: ModelManager, *, reconcile_s: float = 30.0) -> None:
        self.etcd, self.manager, self.reconcile_s = etcd, manager, reconcile_s
        self._stop = threading.Event()
        self._watch = None
        self.synced = threading.Event()   # the first read of both keys succeeded
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)

    def start(self) -> "EtcdModelWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.cancel()

    def _apply(self, key: str, value: bytes | None) -> None:
        role = "current" if key == MODEL_CURRENT else "canary" if key == MODEL_CANARY else None
        if role is None:
            return
        if value is None:
            if role == "canary":
                self.manager.want("canary", None)
            return   # model/current deleted: keep serving what we have
        try:
            spec = ModelPointer.from_json(value, canary=role == "canary")
        except ValueError as error:
            log.error("unusable model pointer in etcd", extra={"key": key, "error": str(error)})
            self.manager.state.refuse(0, f"{key}: {error}")
            metrics.REFUSED.labels("bad_spec").inc()
            return
        self.manager.want(role, spec)

    def refresh(self) -> None:
        """Reads both keys again now (a repair asked for by the consistency service)."""
        self._read()

    def _on_event(self, event: WatchEvent) -> None:
        self._apply(event.key, event.value)

    def _read(self) -> int:
        revision = self.etcd.current_revision()
        for key in (MODEL_CURRENT, MODEL_CANARY):
            kv = self.etcd.get(key)
            self._apply(key, None if kv is None else kv.value)
        return revision

    def _step(self) -> None:
        revision = self._read()
        self.synced.set()
        if self._watch is None:
            self._watch = self.etcd.watch(MODEL_PREFIX, self._on_event, prefix=True,
                                          start_revision=revision + 1)

    def _run(self) -> None:
        retry_against_etcd(self._step, lambda: self._stop.wait(self.reconcile_s), self._stop,
                           first_backoff_s=0.2, log=log, failed="model watcher step failed",
                           unreachable="etcd unreachable; serving the loaded version")
