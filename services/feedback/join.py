"""The join of events with the impressions they name, fed one change at a time into OnlineMetrics.
Pure (no I/O, no gRPC): the consistency service's feedback consumer (services/consistency/
feedback_stream.py) hands it the delta stream's rows and the rebuild's rows.

Both tables come on the delta stream (`impressions` is in the collector's publication), so the
join follows the stream's commit order and never looks anything up. An event usually commits
before its impression: the ranker flushes impressions about a second after the answer, a click
can come sooner. An event whose impression is not here yet is held (FEEDBACK_HOLD_S) and
attributed when the impression arrives; one still unmatched when its hold ends is counted as
`no_impression`, never dropped silently. Holds end only when the stream has progressed (a batch
applied or a caught-up heartbeat), so a stalled stream does not turn held events unattributable.

Exactly once over an at-least-once stream, across restarts
-----------------------------------------------------------
The state lives in memory; the tables are the durable copy. On every (re)subscription the
consumer rebuilds: `seed()` loads the window's impressions and attributed events from the tables
(read in one snapshot), then the stream resumes from the consumer group's confirmed position,
which is at or before anything the rebuild could have missed. Rows the stream delivers that the
rebuild may already have read are exactly those of transactions committed at or before
`fence_lsn` (the WAL insert position read after the rebuild's snapshot: a transaction visible in
the snapshot has its commit record before it) and those of an initial snapshot (whose batch
positions are not commit positions); those are checked against the keys the rebuild and the
snapshot counted (`_seen`), which is dropped once the stream is past both. Later batches are
skipped by the batch-level LSN mark when the collector redelivers them.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

from services.feedback.online_metrics import (ATTRIBUTED, CLICK_TYPES, ITEM_NOT_SHOWN, NO_IMPRESSION, OTHER_TYPE,
                                              OUTSIDE_WINDOW, RATE_TYPES, Impression, OnlineMetrics)
from services.feedback.recommendation_id import EVENT_ATTRIBUTE, VARIANTS

IMPRESSIONS_TABLE, EVENTS_TABLE = "impressions", "events"
BEFORE_WINDOW = "before_window"      # older than the window: outside what is measured, not a loss
DUPLICATE = "duplicate"              # delivered again (stream redelivery or overlap with the rebuild)
MALFORMED = "malformed"              # a row the join cannot read (counted, never raised)
IMPRESSION_BEFORE_WINDOW = "impression_before_window"
OUTCOMES = (ATTRIBUTED, NO_IMPRESSION, ITEM_NOT_SHOWN, OUTSIDE_WINDOW, OTHER_TYPE,
            BEFORE_WINDOW, DUPLICATE, MALFORMED, IMPRESSION_BEFORE_WINDOW)


@dataclass(frozen=True)
class AttributedEvent:
    event_id: str
    recommendation_id: str
    event_type: str
    item_id: str | None
    at: float                    # occurred_at, seconds since the epoch


class MalformedRow(ValueError):
    pass


def seconds_of(value) -> float:
    """A timestamptz as seconds: a datetime (from SQL) or RFC 3339 text (from the delta stream)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise MalformedRow(f"not a timestamp: {value[:40]!r}") from None
    else:
        raise MalformedRow(f"not a timestamp: {type(value).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def impression_of_row(row: dict) -> Impression:
    """An `impressions` row (delta new_row or SQL mapping) as an Impression."""
    try:
        variant = row["variant"]
        if variant not in VARIANTS:
            raise MalformedRow(f"variant {variant!r}")
        return Impression(str(row["recommendation_id"]), int(row["model_version"]), variant,
                          str(row.get("user_id") or ""), tuple(str(i) for i in row["item_ids"]),
                          seconds_of(row["shown_at"]), str(row.get("kind") or "recommend"))
    except (KeyError, TypeError, ValueError) as error:
        raise MalformedRow(f"impression row: {error}") from None


def event_of_row(row: dict) -> AttributedEvent | None:
    """An `events` row as an AttributedEvent; None when it carries no recommendation_id."""
    attributes = row.get("attributes") or {}
    recommendation_id = attributes.get(EVENT_ATTRIBUTE) if isinstance(attributes, dict) else None
    if not recommendation_id:
        return None
    try:
        return AttributedEvent(str(row["event_id"]), str(recommendation_id), str(row["event_type"]),
                               row.get("item_id"), seconds_of(row["occurred_at"]))
    except (KeyError, TypeError, ValueError) as error:
        raise MalformedRow(f"event row: {error}") from None


@dataclass
class _Held:
    event: AttributedEvent
    until: float


class FeedbackJoin:
    """One consumer's join state over one OnlineMetrics. Not thread-safe: one writer (the
    consumer's thread); readers read `metrics` (locked inside) and the plain counters."""

    def __init__(self, metrics: OnlineMetrics, *, hold_s: float = 30.0, max_held: int = 100_000) -> None:
        self.metrics, self.hold_s, self.max_held = metrics, hold_s, max_held
        # Every key from the start: readers on other threads copy it while the consumer counts.
        self.counts: collections.Counter = collections.Counter({outcome: 0 for outcome in OUTCOMES})
        self.applied_lsn = 0                     # commit_lsn of the last stream batch applied
        self._held: collections.OrderedDict[str, _Held] = collections.OrderedDict()   # by event_id, oldest first
        self._waiting: dict[str, list[str]] = {}                # recommendation_id -> held event ids
        self._seen: set[tuple[str, str]] | None = None          # (table, key) counted by rebuild/snapshot
        self._fence_lsn = 0
        self._in_snapshot = False

    # ------------------------------------------------------------------ reading
    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def fenced(self) -> bool:
        """Whether rows may still be duplicates of the rebuild's (the dedup set is kept)."""
        return self._seen is not None

    def cutoff(self, now: float) -> float:
        """Rows shown (impressions) or happening (events) before this are outside the window."""
        bucket = self.metrics.bucket_s
        return math.floor((now - self.metrics.window_s) / bucket) * bucket

    # ------------------------------------------------------------------ rebuild
    def seed(self, impressions: Iterable[dict], events: Iterable[dict], fence_lsn: int, now: float) -> None:
        """The rebuild: the window's rows read from the tables in one snapshot, `fence_lsn` the
        WAL insert position read after it. Call on a fresh join (a new OnlineMetrics)."""
        self._seen = set()
        self._fence_lsn = fence_lsn
        for row in impressions:
            self._impression_row(row, now, remember=True)
        for row in events:
            self._event_row(row, now, remember=True)

    # ------------------------------------------------------------------ the stream
    def apply(self, commit_lsn: int, changes: Iterable[tuple[str, dict]], now: float, *,
              snapshot: bool = False, snapshot_begin: bool = False, snapshot_end: bool = False) -> bool:
        """One batch of the delta stream: (table, new row) of its inserts (and snapshot rows).
        Impressions go first, so that an event and its impression in one batch meet. False when
        the batch was applied before (a redelivery)."""
        if snapshot_begin:
            self._in_snapshot = True
            self.applied_lsn = 0            # a snapshot starts positions over
            if self._seen is None:
                self._seen = set()
        if not snapshot and commit_lsn and commit_lsn <= self.applied_lsn:
            self.counts[DUPLICATE] += 1
            return False
        maybe_seen = snapshot or self._in_snapshot or commit_lsn <= self._fence_lsn
        changes = list(changes)
        for table, row in changes:
            if table == IMPRESSIONS_TABLE:
                self._impression_row(row, now, remember=maybe_seen)
        for table, row in changes:
            if table == EVENTS_TABLE:
                self._event_row(row, now, remember=maybe_seen)
        if commit_lsn:
            self.applied_lsn = commit_lsn
        if snapshot_end:
            self._in_snapshot = False
        if self._seen is not None and not snapshot and not self._in_snapshot and commit_lsn > self._fence_lsn:
            self._seen = None               # past the rebuild and any snapshot: no more overlap
        self.progressed(now)
        return True

    def progressed(self, now: float) -> None:
        """The stream has delivered what was committed until about `now`: holds that ended are
        final (counted no_impression), and the window drops what fell out of it."""
        while self._held:
            event_id, held = next(iter(self._held.items()))
            if held.until > now:
                break
            self._release(event_id)
            self.counts[NO_IMPRESSION] += 1
        self.metrics.expire(now)

    # ------------------------------------------------------------------ rows
    def _duplicate(self, table: str, key: str, remember: bool) -> bool:
        if self._seen is None or not remember:
            return False
        if (table, key) in self._seen:
            self.counts[DUPLICATE] += 1
            return True
        self._seen.add((table, key))
        return False

    def _impression_row(self, row: dict, now: float, remember: bool) -> None:
        try:
            impression = impression_of_row(row)
        except MalformedRow:
            self.counts[MALFORMED] += 1
            return
        if impression.shown_at < self.cutoff(now):
            self.counts[IMPRESSION_BEFORE_WINDOW] += 1
            return
        if self._duplicate(IMPRESSIONS_TABLE, impression.recommendation_id, remember):
            return
        self.add_impression(impression)

    def _event_row(self, row: dict, now: float, remember: bool) -> None:
        try:
            event = event_of_row(row)
        except MalformedRow:
            self.counts[MALFORMED] += 1
            return
        if event is None:
            return
        if event.at < self.cutoff(now):
            self.counts[BEFORE_WINDOW] += 1
            return
        if self._duplicate(EVENTS_TABLE, event.event_id, remember):
            return
        self.add_event(event, now)

    # ------------------------------------------------------------------ the join
    def add_impression(self, impression: Impression) -> None:
        self.metrics.add_impression(impression)
        for event_id in self._waiting.pop(impression.recommendation_id, ()):
            held = self._held.pop(event_id, None)
            if held is not None:
                self._count(self._attribute(held.event))

    def add_event(self, event: AttributedEvent, now: float) -> None:
        if event.event_type not in CLICK_TYPES and event.event_type not in RATE_TYPES:
            self.counts[OTHER_TYPE] += 1
            return
        if self.metrics.knows(event.recommendation_id):
            self._count(self._attribute(event))
            return
        if event.event_id in self._held:
            return
        self._held[event.event_id] = _Held(event, now + self.hold_s)
        self._waiting.setdefault(event.recommendation_id, []).append(event.event_id)
        while len(self._held) > self.max_held:          # bounded: the oldest hold ends early
            self._release(next(iter(self._held)))
            self.counts[NO_IMPRESSION] += 1

    def _attribute(self, event: AttributedEvent) -> str:
        return self.metrics.attribute(event.recommendation_id, event.event_type, event.item_id, event.at)

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def _release(self, event_id: str) -> None:
        held = self._held.pop(event_id)
        waiting = self._waiting.get(held.event.recommendation_id)
        if waiting is not None:
            try:
                waiting.remove(event_id)
            except ValueError:
                pass
            if not waiting:
                del self._waiting[held.event.recommendation_id]
