"""The gRPC server's executor with a cap on how many handlers *run* at once, apart from how many
may be in flight.

Why: on a Python process every runnable handler thread contends for the GIL. Measured on the
ranker (bench/ranker.py, Beauty, 2 shared cores): with 16 handler threads all runnable at
concurrency 8, a Recommend cost ~800 µs of CPU against ~150 µs for the same logic in one thread,
the rest being GIL hand-offs between threads; with 1-2 threads taking the calls in turn the
same calls cost ~560-620 µs and the process answered 1.25-1.4x the requests/s (README
"Serving"). But a handler also *waits*: for its read-your-writes LSN, for a features read on a
cache miss, for an admission slot. A plain ThreadPoolExecutor of 1 or 2 threads would let one or
two waiting calls stall every other one.

So a handler that is about to wait says so (`with blocking(): ...`), as does one about to run
long enough that the others should not queue behind it (a digest of the whole index): its thread
stops counting as running, and the pool lets another thread take the next queued call (starting
one, up to `max_threads`); when the wait ends the thread goes on at once, briefly above the cap,
and takes no new call until the running count is back under it. A thread that finishes a call
takes the next queued one itself, without waking another thread (that hand-off is the cost being
avoided).
Outside a pool thread `blocking()` does nothing, so the core runs the same in tests and tools.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent import futures
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import Gauge

_local = threading.local()

# Saturation at a glance: calls queued for a running place, running, and waiting in blocking().
CALLS = Gauge("deltarec_grpc_handler_calls", "gRPC calls in the handler pool, by state", ["state"])


class HandlerPool(futures.Executor):
    def __init__(self, running: int, max_threads: int, name: str = "rpc") -> None:
        if running < 1 or max_threads < running:
            raise ValueError(f"need 1 <= running ({running}) <= max_threads ({max_threads})")
        self.running_cap, self.max_threads, self.name = running, max_threads, name
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._threads: list[threading.Thread] = []
        self._idle = 0        # threads parked, waiting for a call
        self._wakes = 0       # threads notified or started that have not looked for a call yet
        self._active = 0      # threads running a call outside a blocking() section
        self._blocked = 0     # threads inside a blocking() section
        self._shutdown = False
        # The process's pool (one gRPC server each; a later pool takes the gauges over).
        CALLS.labels("queued").set_function(lambda: len(self._queue))
        CALLS.labels("running").set_function(lambda: self._active)
        CALLS.labels("blocked").set_function(lambda: self._blocked)

    # ------------------------------------------------------------------ Executor
    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        future: futures.Future = futures.Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.append((future, fn, args, kwargs))
            self._dispatch()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    # ------------------------------------------------------------------ what it is doing
    def counts(self) -> dict[str, int]:
        """Threads by state and calls queued (a snapshot, for metrics and tests)."""
        with self._cond:
            return {"threads": len(self._threads), "running": self._active, "blocked": self._blocked,
                    "idle": self._idle, "queued": len(self._queue)}

    # ------------------------------------------------------------------ internals (under _cond)
    def _dispatch(self) -> None:
        """Wakes or starts as many threads as there are queued calls and free running places."""
        wanted = min(len(self._queue), self.running_cap - self._active - self._wakes)
        while wanted > 0:
            if self._idle > self._wakes:
                self._wakes += 1
                self._cond.notify()
            elif len(self._threads) < self.max_threads:
                self._wakes += 1
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                return
            wanted -= 1

    def _work(self) -> None:
        _local.pool, _local.depth = self, 0
        with self._cond:
            self._wakes = max(self._wakes - 1, 0)
            while True:
                while not (self._queue and self._active < self.running_cap):
                    if self._shutdown and not self._queue:
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                    self._wakes = max(self._wakes - 1, 0)
                future, fn, args, kwargs = self._queue.popleft()
                self._active += 1
                self._cond.release()
                try:
                    if future.set_running_or_notify_cancel():
                        try:
                            result = fn(*args, **kwargs)
                        except BaseException as error:  # noqa: BLE001 - the future carries it
                            future.set_exception(error)
                        else:
                            future.set_result(result)
                finally:
                    self._cond.acquire()
                    self._active -= 1
                del future, fn, args, kwargs

    def _enter_blocking(self) -> None:
        with self._cond:
            self._active -= 1
            self._blocked += 1
            self._dispatch()

    def _leave_blocking(self) -> None:
        with self._cond:
            self._blocked -= 1
            self._active += 1


@contextmanager
def blocking() -> Iterator[None]:
    """Marks a wait of the calling handler (see the module docstring); nested marks count once."""
    pool = getattr(_local, "pool", None)
    if pool is None or _local.depth:
        yield
        return
    _local.depth = 1
    pool._enter_blocking()
    try:
        yield
    finally:
        pool._leave_blocking()
        _local.depth = 0
