"""HandlerPool: at most `running` calls run at once; a call waiting inside blocking() gives its
place to the next queued call; results, exceptions, cancellation and shutdown as an Executor."""
from __future__ import annotations

import threading
import time

import pytest

from services.common.handler_pool import HandlerPool, blocking


def _wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def _hold(pool: HandlerPool) -> tuple[threading.Event, object]:
    """A call that holds its running place (it waits without saying so) until the event is set."""
    release = threading.Event()
    return release, pool.submit(lambda: release.wait(5))


class Tracker:
    """Counts calls running outside blocking() at once, and the most seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


def test_results_and_exceptions_come_back_through_the_futures():
    pool = HandlerPool(2, 4)
    assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=5) == 5

    def fails():
        raise KeyError("boom")
    with pytest.raises(KeyError):
        pool.submit(fails).result(timeout=5)
    pool.shutdown()


def test_no_more_than_running_calls_run_at_once_and_all_queued_ones_run():
    pool = HandlerPool(2, 16)
    tracker = Tracker()

    def work():
        with tracker:
            time.sleep(0.01)
        return True
    results = [pool.submit(work) for _ in range(40)]
    assert all(f.result(timeout=10) for f in results)
    assert tracker.most == 2
    # a thread that finished a call took the next itself: no thread beyond the two was needed
    assert pool.counts()["threads"] == 2
    pool.shutdown()


def test_a_blocked_call_lets_the_next_queued_call_run():
    pool = HandlerPool(1, 4)
    release = threading.Event()
    entered = threading.Event()

    def waits():
        with blocking():
            entered.set()
            assert release.wait(5)
        return "waited"
    waiting = pool.submit(waits)
    assert entered.wait(5)
    # the only running place is free while the first call waits: the second one runs now
    assert pool.submit(lambda: "ran").result(timeout=5) == "ran"
    assert pool.counts()["blocked"] == 1
    release.set()
    assert waiting.result(timeout=5) == "waited"
    _wait_until(lambda: pool.counts()["blocked"] == 0 and pool.counts()["running"] == 0)
    pool.shutdown()


def test_without_blocking_a_waiting_call_holds_its_place():
    """The counter-case of the test above: the cap holds for calls that do not say they wait."""
    pool = HandlerPool(1, 4)
    release, holding = _hold(pool)
    queued = pool.submit(lambda: "ran")
    time.sleep(0.1)
    assert not queued.done() and pool.counts()["queued"] == 1
    release.set()
    assert holding.result(timeout=5) and queued.result(timeout=5) == "ran"
    pool.shutdown()


def test_threads_never_exceed_max_threads_even_when_every_call_waits():
    pool = HandlerPool(1, 3)
    release = threading.Event()

    def waits():
        with blocking():
            release.wait(5)
        return True
    calls = [pool.submit(waits) for _ in range(6)]
    _wait_until(lambda: pool.counts()["blocked"] == 3)
    assert pool.counts() == {"threads": 3, "running": 0, "blocked": 3, "idle": 0, "queued": 3}
    release.set()
    assert all(f.result(timeout=5) for f in calls)
    assert pool.counts()["threads"] == 3
    pool.shutdown()


def test_after_a_wait_the_cap_is_restored_before_new_calls_start():
    pool = HandlerPool(1, 4)
    tracker = Tracker()
    release = threading.Event()

    def waits_then_works():
        with blocking():
            release.wait(5)
        with tracker:
            time.sleep(0.05)

    def works():
        with tracker:
            time.sleep(0.01)
    first = pool.submit(waits_then_works)
    _wait_until(lambda: pool.counts()["blocked"] == 1)
    second = pool.submit(works)     # runs in the place the wait freed
    release.set()
    rest = [pool.submit(works) for _ in range(10)]
    for future in [first, second, *rest]:
        future.result(timeout=5)
    # the woken call and the one in its place may overlap once; no new call joins them
    assert tracker.most <= 2
    pool.shutdown()


def test_blocking_outside_a_pool_thread_and_nested_does_nothing():
    with blocking():
        with blocking():
            pass
    pool = HandlerPool(1, 2)

    def nested():
        with blocking():
            with blocking():
                inner = pool.counts()["blocked"]
        return inner
    assert pool.submit(nested).result(timeout=5) == 1
    _wait_until(lambda: pool.counts()["running"] == 0)
    assert pool.counts()["blocked"] == 0
    pool.shutdown()


def test_shutdown_runs_what_is_queued_refuses_new_calls_and_can_cancel():
    pool = HandlerPool(1, 1)
    release, first = _hold(pool)
    queued = pool.submit(lambda: "queued ran")
    release.set()
    pool.shutdown(wait=True)
    assert first.result(timeout=1) and queued.result(timeout=1) == "queued ran"
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)

    pool = HandlerPool(1, 1)
    release, _ = _hold(pool)
    cancelled = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert cancelled.cancelled()


def test_settings_are_checked():
    with pytest.raises(ValueError):
        HandlerPool(0, 4)
    with pytest.raises(ValueError):
        HandlerPool(5, 4)


def test_the_pool_exports_its_calls_by_state():
    from prometheus_client import REGISTRY
    pool = HandlerPool(1, 2)
    release = threading.Event()

    def waits():
        with blocking():
            release.wait(5)
    pool.submit(waits)
    _wait_until(lambda: REGISTRY.get_sample_value("deltarec_grpc_handler_calls", {"state": "blocked"}) == 1)
    assert REGISTRY.get_sample_value("deltarec_grpc_handler_calls", {"state": "running"}) == 0
    release.set()
    _wait_until(lambda: REGISTRY.get_sample_value("deltarec_grpc_handler_calls", {"state": "blocked"}) == 0)
    pool.shutdown()
