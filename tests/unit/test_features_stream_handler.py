"""The features service's delta-stream callbacks (pure: fakes for the applier and publishers)."""
from __future__ import annotations

from datetime import datetime, timezone

from deltarec.v1 import collector_pb2
from services.features.stream_handler import CommitFanout, StreamHandler
from services.features.stream_monitor import StreamMonitor


class FakeApplier:
    def __init__(self, fail_idle: bool = False) -> None:
        self.batches, self.idle, self.fail_idle = [], [], fail_idle

    def apply_batch(self, batch) -> None:
        self.batches.append(batch.commit_lsn)

    def advance_idle(self, lsn: int) -> bool:
        if self.fail_idle:
            raise RuntimeError("database down")
        self.idle.append(lsn)
        return True


class Recorder:
    def __init__(self) -> None:
        self.calls = []

    def publish(self, lsn):
        self.calls.append(("publish", lsn))

    def set(self, lsn, commit_time=None):
        self.calls.append(("set", lsn, commit_time))


def test_a_batch_is_applied_and_the_monitor_sees_it_arrive_and_finish():
    applier, monitor = FakeApplier(), StreamMonitor()
    batch = collector_pb2.DeltaBatch(commit_lsn=42)
    delta = batch.deltas.add(lsn=40, table="events")
    delta.commit_time.FromDatetime(datetime(2026, 1, 1, tzinfo=timezone.utc))
    StreamHandler(applier, monitor).apply_batch(batch)
    assert applier.batches == [42]
    assert monitor.lag(42, 42, None).lag_bytes == 0


def test_a_caught_up_heartbeat_advances_the_mark_and_a_failure_does_not_end_the_stream():
    applier, monitor = FakeApplier(), StreamMonitor()
    handler = StreamHandler(applier, monitor)
    handler.on_heartbeat(collector_pb2.Heartbeat(server_lsn=100, caught_up_lsn=0))
    assert applier.idle == [] and monitor.server_lsn == 100 and not monitor.caught_up
    handler.on_heartbeat(collector_pb2.Heartbeat(server_lsn=120, caught_up_lsn=110))
    assert applier.idle == [110] and monitor.caught_up
    StreamHandler(FakeApplier(fail_idle=True), monitor).on_heartbeat(
        collector_pb2.Heartbeat(server_lsn=130, caught_up_lsn=125))   # logged, not raised


def test_every_commit_reaches_the_item_feed_and_the_watermark():
    notifier = publisher = Recorder()
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc)
    fanout = CommitFanout(notifier, publisher)
    fanout(7, moment)
    fanout(9)
    assert notifier.calls == [("publish", 7), ("set", 7, moment), ("publish", 9), ("set", 9, None)]
