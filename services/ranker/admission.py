"""Admission control: a bounded number of requests run, a bounded number wait, the rest are
refused at once with RESOURCE_EXHAUSTED (a client retries elsewhere instead of waiting for an
answer that arrives too late). A waiting request also gives up, refused, when its deadline would
pass before a slot frees up."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from services.common.errors import ResourceExhausted


class Overloaded(ResourceExhausted):
    pass


class AdmissionControl:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running, self.max_waiting = max_running, max_waiting
        self._slots = threading.BoundedSemaphore(max_running)
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.rejected = 0

    @contextmanager
    def admit(self, timeout_s: float | None = None) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self.waiting >= self.max_waiting:
                    self.rejected += 1
                    raise Overloaded(f"overloaded: {self.max_running} running and {self.waiting} waiting; "
                                     "retry")
                self.waiting += 1
            try:
                wait = None if timeout_s is None else max(timeout_s * 0.9, 0.0)
                acquired = self._slots.acquire(timeout=wait) if wait is None or wait > 0 else False
            finally:
                with self._lock:
                    self.waiting -= 1
            if not acquired:
                with self._lock:
                    self.rejected += 1
                raise Overloaded("overloaded: no slot before the deadline; retry")
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._slots.release()
