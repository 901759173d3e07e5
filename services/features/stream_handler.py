"""What the features service does with its delta stream (consumer group `features`).

`StreamHandler` is the DeltaConsumer's `apply_batch` and `on_heartbeat`: each batch is applied
by the FeatureApplier (state and LSN mark in one transaction; the consumer acks after it
returned) with the StreamMonitor told when it arrived and when it was applied (Status lag); a
caught-up heartbeat moves the stored mark to the caught-up position, so an idle stream still
advances `data_lsn`.

`CommitFanout` is the applier's `on_commit`: every committed position goes at once to the
WatchItems feed (LsnNotifier wakes the watchers) and to etcd `data/watermark` (the
WatermarkPublisher writes it off the apply path, coalesced).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from services.features.applier import FeatureApplier
from services.features.item_feed import LsnNotifier
from services.features.stream_monitor import StreamMonitor
from services.features.watermark import WatermarkPublisher

log = logging.getLogger(__name__)


class CommitFanout:
    def __init__(self, notifier: LsnNotifier, publisher: WatermarkPublisher) -> None:
        self.notifier, self.publisher = notifier, publisher

    def __call__(self, lsn: int, commit_time: datetime | None = None) -> None:
        self.notifier.publish(lsn)
        self.publisher.set(lsn, commit_time)


class StreamHandler:
    def __init__(self, applier: FeatureApplier, monitor: StreamMonitor) -> None:
        self.applier, self.monitor = applier, monitor

    def apply_batch(self, batch) -> None:
        commit_time = (batch.deltas[0].commit_time.ToDatetime(tzinfo=timezone.utc)
                       if batch.deltas and batch.deltas[0].HasField("commit_time") else None)
        self.monitor.batch_received(commit_time)
        self.applier.apply_batch(batch)
        self.monitor.batch_applied()

    def on_heartbeat(self, heartbeat) -> None:
        self.monitor.heartbeat(heartbeat.server_lsn, heartbeat.caught_up_lsn)
        if heartbeat.caught_up_lsn:
            try:
                self.applier.advance_idle(heartbeat.caught_up_lsn)
            except Exception as error:  # noqa: BLE001 - a heartbeat must never end the stream
                log.warning("could not record the caught-up position", extra={"error": str(error)[:200]})
