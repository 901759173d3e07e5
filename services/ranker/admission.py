"""Admission control: a bounded number of requests run, a bounded number wait, the rest are
refused at once with RESOURCE_EXHAUSTED (a client retries elsewhere instead of waiting for an
answer that arrives too late). A waiting request also gives up, refused, when its deadline would
pass before a slot frees up.

Waiting requests are admitted in arrival order: a finishing request hands its slot to the oldest
waiter directly. (`threading.Semaphore` is not fair: a request arriving while a woken waiter is
still waiting for the GIL takes the freed slot, and the waiter queues again at the back, so under
a full queue a few requests wait many turns — the tail of the latency, not its mean.)"""
from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from services.common.errors import ResourceExhausted
from services.common.handler_pool import blocking


class Overloaded(ResourceExhausted):
    pass


class AdmissionControl:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running, self.max_waiting = max_running, max_waiting
        self._lock = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()   # each held until its slot is handed over
        self.running = 0
        self.rejected = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextmanager
    def admit(self, timeout_s: float | None = None) -> Iterator[None]:
        self._enter(timeout_s)
        try:
            yield
        finally:
            self._leave()

    def _enter(self, timeout_s: float | None) -> None:
        with self._lock:
            if self.running < self.max_running and not self._waiters:
                self.running += 1
                return
            if len(self._waiters) >= self.max_waiting:
                self.rejected += 1
                raise Overloaded(f"overloaded: {self.max_running} running and {len(self._waiters)} waiting; "
                                 "retry")
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        wait = None if timeout_s is None else timeout_s * 0.9
        with blocking():
            if wait is None:
                turn.acquire()
                return
            if wait > 0 and turn.acquire(timeout=wait):
                return
        with self._lock:
            try:
                self._waiters.remove(turn)
            except ValueError:   # handed the slot just as the wait ended: it is ours
                return
            self.rejected += 1
        raise Overloaded("overloaded: no slot before the deadline; retry")

    def _leave(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()   # the slot passes on: `running` is unchanged
            else:
                self.running -= 1
