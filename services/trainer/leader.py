"""Leadership of the trainer role: only the holder of the etcd lease `trainer/leader` consumes
the delta stream, trains and publishes; every other trainer process is a standby that campaigns
until the lease is free (the holder died: its lease expired after TRAINER_LEADER_TTL_S, or it
resigned on shutdown).

Leadership only decides who works; correctness never depends on it alone: publishing is a
compare-and-swap on the previous value and run bookkeeping is fenced by attempt numbers, so a
leader that lost its lease without knowing it cannot overwrite its successor's work.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from services.common.etcd import Etcd, EtcdUnavailable, Leadership
from services.contracts.etcd_keys import TRAINER_LEADER

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(self, etcd: Etcd, holder_id: str, ttl_s: int, *, on_elected: Callable[[], None],
                 on_lost: Callable[[], None]) -> None:
        self.leadership = Leadership(etcd, TRAINER_LEADER, holder_id, ttl_s)
        self.holder_id = holder_id
        self.on_elected, self.on_lost = on_elected, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-leader", daemon=True)

    def start(self) -> "LeaderElector":
        self._thread.start()
        return self

    def is_leader(self) -> bool:
        return self.leadership.held

    def leader_id(self) -> str:
        try:
            return self.leadership.holder() or ""
        except EtcdUnavailable:
            return self.holder_id if self.is_leader() else ""

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.leadership.campaign(self._stop):
                return
            log.info("elected trainer leader", extra={"holder": self.holder_id})
            try:
                self.on_elected()
            except Exception:  # noqa: BLE001 - keep the role; the loop retries its own work
                log.exception("on_elected failed")
            while not self._stop.is_set() and self.leadership.held:
                self._stop.wait(0.5)
            if self._stop.is_set():
                return
            log.warning("trainer leadership lost; back to standby", extra={"holder": self.holder_id})
            self.leadership.lease = None
            try:
                self.on_lost()
            except Exception:  # noqa: BLE001
                log.exception("on_lost failed")

    def stop(self) -> None:
        self._stop.set()
        was_leader = self.is_leader()
        if was_leader:
            try:
                self.on_lost()
            except Exception:  # noqa: BLE001
                log.exception("on_lost failed")
        try:
            self.leadership.resign()
        except Exception:  # noqa: BLE001 - the lease expires by itself
            pass
