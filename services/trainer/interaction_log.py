"""The trainer's durable record of interactions (table `trainer_interactions`).

Written from the `events` deltas of consumer group `trainer`: each batch's rows and the group's
LSN high-water mark (`consumer_offsets`, consumer 'trainer') go in ONE transaction, and the
batch is acked only after it committed, so what the collector forgets is always on disk here.
Rows are keyed by `event_id`: a redelivered delta (at-least-once stream, regrouped after a
crash, or sent again by a new snapshot) changes nothing. Events are immutable and append-only,
so on `snapshot_begin` the rows stay (the snapshot sends the same events again) and only the
high-water mark is reset, as the stream contract asks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deltarec.v1 import collector_pb2

from services.contracts.event_row import EventRow
from services.contracts.event_types import ITEM_EVENT_NAMES

log = logging.getLogger(__name__)

CONSUMER = "trainer"
OP_INSERT, OP_SNAPSHOT = collector_pb2.OPERATION_INSERT, collector_pb2.OPERATION_SNAPSHOT


@dataclass(frozen=True)
class Interaction:
    """A row of `trainer_interactions`: an item interaction of an `events` row (EventRow) as the
    model uses it (time in epoch seconds) with the commit LSN it arrived in (the update windows)."""
    event_id: str
    user_id: str
    item_id: str
    event_type: str
    occurred_at: float          # seconds since the epoch
    commit_lsn: int = 0
    row_id: int = 0


def interaction_from_row(row: dict, commit_lsn: int = 0) -> Interaction | None:
    """An `events` row (as a delta's new_row) as an Interaction; None when the model has no use
    for it (a search, an event without item)."""
    event_type = str(row.get("event_type") or "")
    item_id = row.get("item_id")
    if event_type not in ITEM_EVENT_NAMES or not item_id:
        return None
    event = EventRow.from_delta_row(row)
    return Interaction(event_id=event.event_id, user_id=event.user_id, item_id=str(event.item_id),
                       event_type=event.event_type, occurred_at=event.occurred_at.timestamp(),
                       commit_lsn=commit_lsn, row_id=event.row_id)


class InteractionLog:
    def __init__(self, engine: Engine, consumer: str = CONSUMER) -> None:
        self.engine, self.consumer = engine, consumer

    # ------------------------------------------------------------------------------ writing
    def record(self, interactions: Sequence[Interaction], commit_lsn: int, *,
               snapshot_begin: bool = False) -> int:
        """Stores `interactions` as of `commit_lsn` and moves the high-water mark there, in one
        transaction. A batch at or below the mark was recorded before: nothing happens. Returns
        the number of rows stored by this call (0 for a replay)."""
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                "INSERT INTO consumer_offsets (consumer, applied_lsn) VALUES (:c, 0) "
                "ON CONFLICT (consumer) DO NOTHING"), {"c": self.consumer})
            applied = connection.execute(sa.text(
                "SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c FOR UPDATE"),
                {"c": self.consumer}).scalar_one()
            if snapshot_begin:
                applied = 0
            elif commit_lsn <= applied:
                return 0
            stored = 0
            if interactions:
                stored = connection.exec_driver_sql(
                    "INSERT INTO trainer_interactions (event_id, row_id, commit_lsn, user_id, item_id, "
                    "event_type, occurred_at) "
                    "SELECT * FROM unnest(%(ids)s::text[], %(rows)s::bigint[], %(lsns)s::bigint[], "
                    "%(users)s::text[], %(items)s::text[], %(types)s::text[], %(times)s::timestamptz[]) "
                    "ON CONFLICT (event_id) DO NOTHING",
                    {"ids": [i.event_id for i in interactions], "rows": [i.row_id for i in interactions],
                     "lsns": [commit_lsn] * len(interactions), "users": [i.user_id for i in interactions],
                     "items": [i.item_id for i in interactions], "types": [i.event_type for i in interactions],
                     "times": [datetime.fromtimestamp(i.occurred_at, timezone.utc) for i in interactions]},
                ).rowcount
            connection.execute(sa.text(
                "UPDATE consumer_offsets SET applied_lsn = :lsn, updated_at = now() WHERE consumer = :c"),
                {"lsn": max(applied, commit_lsn), "c": self.consumer})
        return max(0, stored)

    def apply_batch(self, batch, row_of: Callable[[Any], dict]) -> int:
        """Records one deltarec.v1.DeltaBatch (the DeltaConsumer callback): inserted and snapshot
        rows of `events`; everything else is of no use to the model (events are append-only)."""
        interactions: list[Interaction] = []
        ignored = 0
        for delta in batch.deltas:
            if delta.table != "events" or delta.op not in (OP_INSERT, OP_SNAPSHOT) or not delta.HasField("new_row"):
                ignored += 1
                continue
            try:
                interaction = interaction_from_row(row_of(delta.new_row), batch.commit_lsn)
            except (KeyError, ValueError, TypeError) as error:
                log.warning("unusable events delta skipped", extra={"lsn": delta.lsn, "error": str(error)[:200]})
                continue
            if interaction is not None:
                interactions.append(interaction)
        return self.record(interactions, batch.commit_lsn,
                           snapshot_begin=bool(getattr(batch, "snapshot_begin", False)))

    # ------------------------------------------------------------------------------ reading
    def applied_lsn(self) -> int:
        with self.engine.connect() as connection:
            value = connection.execute(sa.text(
                "SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c"), {"c": self.consumer}).scalar()
        return int(value or 0)

    def high_water(self) -> int:
        """The LSN up to which the log is complete: the consumer's mark (or the newest row's LSN
        when rows were recorded without one)."""
        with self.engine.connect() as connection:
            newest = connection.execute(sa.text("SELECT max(commit_lsn) FROM trainer_interactions")).scalar()
        return max(self.applied_lsn(), int(newest or 0))

    def count(self, after_lsn: int = 0, up_to_lsn: int | None = None) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.text(
                "SELECT count(*) FROM trainer_interactions WHERE commit_lsn > :a "
                "AND (CAST(:b AS bigint) IS NULL OR commit_lsn <= :b)"),
                {"a": after_lsn, "b": up_to_lsn}).scalar_one())

    def load(self, up_to_lsn: int) -> list[Interaction]:
        """Every interaction recorded at or below `up_to_lsn`, in a deterministic order (user,
        time, row id, event id): the same call gives the same list, so a run can be redone."""
        connection = self.engine.raw_connection()
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT event_id, user_id, item_id, event_type, "
                    "EXTRACT(EPOCH FROM occurred_at)::float8, commit_lsn, row_id "
                    "FROM trainer_interactions WHERE commit_lsn <= %s "
                    "ORDER BY user_id, occurred_at, row_id, event_id", (up_to_lsn,))
                rows = cursor.fetchall()
            connection.commit()
        finally:
            connection.close()
        return [Interaction(event_id, user_id, item_id, event_type, float(seconds), int(lsn), int(row_id))
                for event_id, user_id, item_id, event_type, seconds, lsn, row_id in rows]


def interactions_of(rows: Iterable[dict], commit_lsn: int) -> list[Interaction]:
    """Helper for loaders and tests: event dicts as Interactions (unusable ones dropped)."""
    return [i for i in (interaction_from_row(row, commit_lsn) for row in rows) if i is not None]
