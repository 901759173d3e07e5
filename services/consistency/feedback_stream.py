"""The consistency service's feedback consumer: impressions and events from the collector's delta
stream (consumer group `feedback`, CONSISTENCY_FEEDBACK_CONSUMER) joined into the online metrics
(services/feedback/join.py explains the join and why it is exactly once), plus their Prometheus
gauges.

Why the stream carries impressions too: the impression counts (every rate's denominator) must be
kept per impression as it is written, and a table of rows written in batches by several rankers
has no order one could poll safely (shown_at is the answer's time, a batch can commit late; a
serial id commits out of order). On the delta stream both tables come in commit order, resumably,
with the same at-least-once contract every consumer already handles; an event never needs a
look-up. The cost: every consumer group's slot reads impression inserts (features and the trainer
subscribe to items/events only; the collector's reader skips decoding rows of tables a group does
not receive, Decoder.row_table).

Resumable: before every (re)subscription (`DeltaConsumer.resume_lsn` is asked then) the window
is rebuilt from the tables in one snapshot and the stream resumes from the group's confirmed
position; the join drops what the rebuild already counted. A restarted instance, or a standby
that takes the stream over from another one, thus has the window's figures right. (A standby
takes over on the same subscription, without a reconnect: the first batch or live heartbeat after
standing by rebuilds first, since the holder acked what came in between.)
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deltarec.v1 import collector_pb2
from services.common import channels
from services.common.delta_consumer import DeltaConsumer, row_of
from services.common.lsn import parse_lsn
from services.consistency import metrics
from services.feedback.join import EVENTS_TABLE, IMPRESSIONS_TABLE, OUTCOMES, FeedbackJoin
from services.feedback.online_metrics import Counters, OnlineMetrics
from services.feedback.recommendation_id import EVENT_ATTRIBUTE

log = logging.getLogger(__name__)

TABLES = (IMPRESSIONS_TABLE, EVENTS_TABLE)
_ROW_OPS = (collector_pb2.OPERATION_INSERT, collector_pb2.OPERATION_SNAPSHOT)

IMPRESSIONS_SQL = sa.text(
    "SELECT recommendation_id, shown_at, user_id, model_version, variant, kind, item_ids "
    "FROM impressions WHERE shown_at >= to_timestamp(:cutoff) ORDER BY shown_at")
# The partial index events_recommendation_idx (migration 0011) serves this.
EVENTS_SQL = sa.text(
    "SELECT event_id, event_type, item_id, occurred_at, attributes FROM events "
    f"WHERE attributes ? '{EVENT_ATTRIBUTE}' AND occurred_at >= to_timestamp(:cutoff) ORDER BY id")


@dataclass(frozen=True)
class FeedbackSettings:
    window_s: float = 3600.0
    bucket_s: float = 60.0
    attribution_s: float = 1800.0
    hold_s: float = 30.0
    max_held: int = 100_000
    max_open_impressions: int = 500_000
    stall_s: float = 30.0
    export_interval_s: float = 5.0

    @classmethod
    def from_config(cls, config) -> "FeedbackSettings":
        return cls(config.feedback_window_s, config.feedback_bucket_s, config.feedback_attribution_s,
                   config.feedback_hold_s, config.feedback_max_held, config.feedback_max_open_impressions,
                   config.feedback_stall_s, config.feedback_export_interval_s)


class FeedbackStream:
    def __init__(self, engine: Engine, collector_address: str, group: str, settings: FeedbackSettings, *,
                 security=channels.FROM_ENVIRONMENT, clock=time.time) -> None:
        self.engine, self.settings, self.clock = engine, settings, clock
        self.join = self._new_join()
        self.rebuilds = 0
        self.rebuilt_at = 0.0
        self._lock = threading.Lock()          # one writer at a time: the consumer thread or a rebuild
        self._stop = threading.Event()
        self._exporter: threading.Thread | None = None
        self._exported: set[tuple[str, str]] = set()
        self._stood_by = False                 # a standby heartbeat came: rebuild before going live
        self.consumer = DeltaConsumer(collector_address, group, self.apply_batch, tables=TABLES,
                                      on_heartbeat=self.on_heartbeat, resume_lsn=self.rebuild_before_subscribe,
                                      security=security)

    def _new_join(self) -> FeedbackJoin:
        s = self.settings
        return FeedbackJoin(OnlineMetrics(window_s=s.window_s, bucket_s=s.bucket_s, attribution_s=s.attribution_s,
                                          max_open_impressions=s.max_open_impressions),
                            hold_s=s.hold_s, max_held=s.max_held)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FeedbackStream":
        self.consumer.start()
        self._exporter = threading.Thread(target=self._export_loop, name="feedback-export", daemon=True)
        self._exporter.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.consumer.stop()

    # ------------------------------------------------------------------ rebuild
    def rebuild_before_subscribe(self) -> int:
        """DeltaConsumer's resume_lsn: rebuilds, then returns 0 so the collector resumes from the
        group's confirmed position (the join drops the overlap; a position from the rebuild itself
        cannot be handed to the collector as exact: see services/feedback/join.py)."""
        self.rebuild()
        return 0

    def rebuild(self) -> None:
        now = self.clock()
        join = self._new_join()
        cutoff = join.cutoff(now)
        started = time.monotonic()
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
            with connection.begin():
                impressions = connection.execute(IMPRESSIONS_SQL, {"cutoff": cutoff}).mappings().all()
                events = connection.execute(EVENTS_SQL, {"cutoff": cutoff}).mappings().all()
                # Read after the snapshot was taken (by the first query): every transaction the
                # snapshot sees has its commit record below this position.
                fence = parse_lsn(connection.execute(sa.text("SELECT pg_current_wal_insert_lsn()::text")).scalar())
        join.seed((dict(r) for r in impressions), (dict(r) for r in events), fence, now)
        with self._lock:
            self.join = join
            self.rebuilds += 1
            self.rebuilt_at = now
        metrics.FEEDBACK_REBUILDS.inc()
        log.info("online metrics rebuilt from the tables",
                 extra={"impressions": len(impressions), "events": len(events), "fence_lsn": fence,
                        "seconds": round(time.monotonic() - started, 3)})

    # ------------------------------------------------------------------ the stream
    def _rebuild_after_standing_by(self) -> None:
        if self._stood_by:
            self.rebuild()
            self._stood_by = False

    def apply_batch(self, batch) -> None:
        self._rebuild_after_standing_by()
        changes = []
        for delta in batch.deltas:
            if delta.op not in _ROW_OPS:
                continue                     # impressions and events are only ever inserted
            if delta.table == EVENTS_TABLE:
                attributes = delta.new_row.fields.get("attributes")
                if attributes is None or EVENT_ATTRIBUTE not in attributes.struct_value.fields:
                    continue                 # most events: no answer to attribute them to
            changes.append((delta.table, row_of(delta.new_row)))
        with self._lock:
            self.join.apply(batch.commit_lsn, changes, self.clock(), snapshot=batch.snapshot,
                            snapshot_begin=batch.snapshot_begin, snapshot_end=batch.snapshot_end)
        metrics.FEEDBACK_APPLIED_LSN.set(batch.commit_lsn)

    def on_heartbeat(self, heartbeat) -> None:
        if heartbeat.standby:
            self._stood_by = True
            return
        self._rebuild_after_standing_by()
        if heartbeat.caught_up_lsn:          # everything committed so far was delivered
            with self._lock:
                self.join.progressed(self.clock())

    # ------------------------------------------------------------------ reading
    @property
    def live(self) -> bool:
        """This instance holds the group's stream (a standby's figures are its last rebuild's)."""
        return self.consumer.connected.is_set() and not self.consumer.standby.is_set()

    def window(self, window_s: float | None = None) -> dict[tuple[int, str], Counters]:
        return self.join.metrics.window(self.clock(), window_s)

    def status(self) -> tuple[bool, str]:
        """(running, why not) for OnlineMetrics and health."""
        consumer = self.consumer
        if consumer.error is not None:
            return False, f"feedback stream stopped: {str(consumer.error)[:200]}"
        if consumer.standby.is_set():
            return False, "standing by: another consistency instance holds the feedback stream"
        if not consumer.connected.is_set():
            return False, consumer.progress_problem(0.0) or "feedback stream not connected yet"
        return True, ""

    def progress_problem(self) -> str | None:
        """Readiness: a standby is not a problem (one instance holds the stream by design)."""
        if self.consumer.standby.is_set() and self.consumer.error is None:
            return None
        return self.consumer.progress_problem(self.settings.stall_s)

    # ------------------------------------------------------------------ Prometheus
    def _export_loop(self) -> None:
        while not self._stop.wait(self.settings.export_interval_s):
            try:
                self.export()
            except Exception as error:  # noqa: BLE001 - the next period retries
                log.warning("online metrics export failed", extra={"error": str(error)[:200]})

    def export(self) -> None:
        window = self.window()
        keys = set()
        for (version, variant), counters in window.items():
            labels = (str(version), variant)
            keys.add(labels)
            figures = counters.to_dict()
            metrics.ONLINE_IMPRESSIONS.labels(*labels).set(counters.impressions)
            metrics.ONLINE_CLICKS.labels(*labels).set(counters.clicks)
            metrics.ONLINE_CTR.labels(*labels).set(figures["ctr"])
            metrics.ONLINE_ADD_TO_CART_RATE.labels(*labels).set(figures["add_to_cart_rate"])
            metrics.ONLINE_PURCHASE_RATE.labels(*labels).set(figures["purchase_rate"])
            metrics.ONLINE_GAIN.labels(*labels).set(figures["ndcg"])
        for labels in self._exported - keys:        # fell out of the window
            for gauge in metrics.ONLINE_GAUGES:
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass
        self._exported = keys
        join = self.join
        for outcome in OUTCOMES:
            metrics.FEEDBACK_EVENTS.labels(outcome).set(join.counts.get(outcome, 0))
        metrics.FEEDBACK_HELD.set(join.held)
