"""The retry loop of the ranker's etcd clients: back off while etcd is down, survive anything."""
from __future__ import annotations

import logging
import threading

from services.common.etcd import EtcdUnavailable
from services.ranker.etcd_retry import MAX_BACKOFF_S, retry_against_etcd


class RecordingStop(threading.Event):
    """A stop event whose waits return at once and are recorded (no real sleeping)."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.is_set()


def test_backs_off_doubling_while_failing_and_resets_after_a_success(caplog):
    stop = RecordingStop()
    outcomes = iter([EtcdUnavailable("down")] * 5 + [RuntimeError("bug"), None, EtcdUnavailable("down"), None])
    idles = []

    def step():
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    def idle():
        idles.append(len(stop.waits))
        if len(idles) == 2:
            stop.set()

    with caplog.at_level(logging.WARNING):
        retry_against_etcd(step, idle, stop, first_backoff_s=1.0, log=logging.getLogger("t"),
                           unreachable="etcd down", failed="step failed")
    assert stop.waits == [1.0, 2.0, 4.0, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S, 1.0]
    assert idles == [6, 7]
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("etcd down") == 6 and messages.count("step failed") == 1
