"""Applies delta batches to the feature store: exactly-once effects, one transaction per batch.

For each batch from the collector:
  1. decode it into plain changes and select the transactions not applied yet (`deltas.py`);
  2. outside any transaction, compute the vectors that are due: an item whose content hash
     changed (or whose vector came from another model); everything else keeps its vector. This
     is the slow part (the model), so no row lock or snapshot is held while it runs;
  3. in one transaction: lock the progress row, select again against the stored progress
     (authoritative), lock and load the affected item and user rows, fold every change in stream
     order, write items, users and the new progress, commit;
  4. only then report the commit (watermark to etcd, wake WatchItems); the caller acks the batch
     to the collector after `apply_batch` returns.
A crash anywhere before the commit leaves nothing behind; a redelivery after the commit is
recognised by the stored progress and changes nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import FailedPrecondition
from services.contracts.event_row import EventRow
from services.contracts.item_text import ItemText
from services.features import item_stats, user_state
from services.features.content import pack_vector
from services.features.deltas import (CatalogCleared, DecodedBatch, ItemRemoval, ItemRow, ItemUpsert,
                                      Progress, decode_batch, select_new)
from services.features.items import (EmbeddingTask, ItemRecord, embedding_task, fold_catalog_change,
                                     fold_removal, needs_embedding, set_embedding)
from services.features.store import CatalogEntry, FeatureStore
from services.features.user_rebuild import visible_in
from services.features.user_state import UserState

log = logging.getLogger(__name__)

BATCHES = Counter("deltarec_features_batches_total", "Delta batches by outcome", ["outcome"])
CHANGES = Counter("deltarec_features_changes_total", "Changes applied by kind", ["kind"])
REDELIVERED = Counter("deltarec_features_redelivered_transactions_total",
                      "Transactions received again and skipped (at or below the high-water mark)")
EMBEDDINGS = Counter("deltarec_features_embeddings_total",
                     "Item vectors: computed (text changed) or skipped (text unchanged)", ["outcome"])
FALLBACKS = Counter("deltarec_features_fallback_embeddings_total",
                    "Items whose text was empty or unusable and got a deterministic fallback vector")
APPLY_SECONDS = Histogram("deltarec_features_apply_seconds", "Time to apply one delta batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
APPLIED_LSN = Gauge("deltarec_features_applied_lsn", "Highest LSN applied to the feature store")

RESYNC_CHUNK = 1000
PROGRESS_LOG_INTERVAL_S = 10.0
# Writes that do not come from the stream (Resync, RebuildUsers) are stamped just above the
# current watermark (see `stamped_write`). The next commit in the WAL ends at least one heap
# record plus a commit record (~100 bytes) later, so a few stamps always stay below it; past
# this many without new stream data, such writes are refused.
MAX_RESYNC_STAMPS = 32

Encode = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class ApplierSettings:
    model_name: str
    history_length: int = 50
    recent_queries: int = 20
    seen_items: int = user_state.DEFAULT_SEEN_ITEMS
    popularity_half_life_s: float = 7 * 86400.0


@dataclass
class ApplyReport:
    applied: int = 0
    skipped_transactions: int = 0
    embedded: int = 0
    kept_vectors: int = 0
    fallbacks: int = 0
    items_written: int = 0
    users_written: int = 0


@dataclass(frozen=True)
class StampedWrite:
    connection: Any          # the open transaction (progress row locked)
    progress: Progress       # the stored progress, as locked
    stamp: int               # the LSN the written rows carry and the watermark moves to


@dataclass
class ResyncReport:
    recomputed: int = 0
    re_embedded: int = 0
    not_found: list[str] | None = None


class FeatureApplier:
    def __init__(self, store: FeatureStore, encode: Encode, fallback: Callable[[str], np.ndarray],
                 settings: ApplierSettings, *, row_of: Callable[[Any], dict],
                 on_commit: Callable[[int, datetime | None], None] | None = None) -> None:
        """`encode(texts)` returns unit vectors (the micro-batching embedder); `fallback(key)` a
        deterministic unit vector for unusable text; `on_commit(lsn, commit_time)` runs after
        each commit that moved the watermark."""
        self.store, self.encode, self.fallback, self.settings = store, encode, fallback, settings
        self.row_of = row_of
        self.on_commit = on_commit
        self.progress = Progress()
        self.latest_commit_time: datetime | None = None
        # The "data clock": the latest event time folded in. Popularity is read as of this time,
        # so replays of old traffic and live traffic both give comparable values.
        self.latest_event_time: datetime | None = None
        self.embeddings_computed = 0
        self.embeddings_skipped = 0
        self.fallback_embeddings = 0
        self._last_progress_log = 0.0
        self._lock = threading.Lock()

    def load(self) -> Progress:
        """Reads where the store is; call once before applying."""
        self.progress = self.store.read_progress()
        self.latest_event_time = self.store.latest_event_time()
        APPLIED_LSN.set(self.progress.applied_lsn)
        return self.progress

    # ------------------------------------------------------------------ applying
    def apply_batch(self, batch) -> ApplyReport:
        """Applies a deltarec.v1.DeltaBatch; returns once it is committed (then ack it)."""
        started = time.perf_counter()
        report = self.apply(decode_batch(batch, self.row_of))
        APPLY_SECONDS.observe(time.perf_counter() - started)
        return report

    def apply(self, batch: DecodedBatch) -> ApplyReport:
        preview = select_new(batch, self.progress)
        if not preview.advances and preview.progress == self.progress:
            BATCHES.labels("redelivered").inc()
            REDELIVERED.inc(preview.skipped_transactions)
            return ApplyReport(skipped_transactions=preview.skipped_transactions)
        texts = self._resolve_texts(preview.changes)
        vectors = self._compute_vectors(self._due_tasks(preview.changes, texts))
        report = ApplyReport()
        with self._lock, self.store.engine.begin() as connection:
            progress = self.store.lock_progress(connection)
            selection = select_new(batch, progress)
            unresolved = [c for c in selection.changes if isinstance(c, ItemUpsert) and c.row not in texts]
            if unresolved:   # the stored progress differed from ours (another writer): rare
                texts.update(self._resolve_texts(unresolved))
            if selection.restart_from_snapshot:
                log.warning("a snapshot starts over: rebuilding the feature store from it",
                            extra={"snapshot_lsn": batch.snapshot_lsn, "previous_lsn": progress.applied_lsn})
                self.store.start_rebuild(connection)
            report = self._fold(connection, selection.changes, batch.commit_lsn, texts, vectors,
                                xid_of={id(c): t.xid for t in batch.transactions for c in t.changes
                                        if isinstance(c, EventRow)})
            report.skipped_transactions = selection.skipped_transactions
            if batch.snapshot_end and selection.progress != progress:
                self.store.finish_snapshot(connection, batch.commit_lsn)
            self.store.save_progress(connection, selection.progress)
        # Committed.
        self.progress = selection.progress
        if batch.latest_commit_time is not None:
            self.latest_commit_time = batch.latest_commit_time
        self._count(report)
        BATCHES.labels("snapshot" if batch.snapshot else "applied").inc()
        REDELIVERED.inc(report.skipped_transactions)
        APPLIED_LSN.set(self.progress.applied_lsn)
        if self.on_commit is not None:
            self.on_commit(self.progress.applied_lsn, self.latest_commit_time)
        return report

    def advance_idle(self, caught_up_lsn: int) -> bool:
        """The collector said every change of our tables committed at or before `caught_up_lsn`
        was sent and acked (so applied): the store is then current as of that LSN although no
        batch ended there. Moving the mark there lets `data_lsn`, `data/watermark` and WatchItems
        advance while our tables are idle, so that a reader waiting for "at least LSN L" (e.g.
        pg_current_wal_insert_lsn() after its write) is not kept waiting for unrelated traffic. Batches
        that follow end after it, so the skip rule is unaffected. Call between batches."""
        if caught_up_lsn <= self.progress.applied_lsn:
            return False
        with self._lock, self.store.engine.begin() as connection:
            progress = self.store.lock_progress(connection)
            if caught_up_lsn <= progress.applied_lsn:
                self.progress = progress
                return False
            new_progress = replace(progress, applied_lsn=caught_up_lsn,
                                   stream_lsn=max(progress.stream_lsn, caught_up_lsn))
            self.store.save_progress(connection, new_progress)
        self.progress = new_progress
        APPLIED_LSN.set(caught_up_lsn)
        if self.on_commit is not None:
            self.on_commit(caught_up_lsn, self.latest_commit_time)
        return True

    def _resolve_texts(self, changes: Iterable) -> dict[ItemRow, ItemText | None]:
        """Each upsert's embedding text. Columns the stream left out (unchanged TOASTed values)
        come from the catalog; None when the item is gone from it too (a later delete follows)."""
        texts: dict[ItemRow, ItemText | None] = {}
        incomplete = []
        for change in changes:
            if isinstance(change, ItemUpsert):
                if change.row.missing_text:
                    incomplete.append(change.row)
                else:
                    texts[change.row] = change.row.text
        if incomplete:
            with self.store.engine.connect() as connection:
                catalog = self.store.catalog_entries(connection, [row.item_id for row in incomplete])
            for row in incomplete:
                entry = catalog.get(row.item_id)
                if entry is None:
                    texts[row] = None
                    continue
                texts[row] = ItemText(**{
                    name: getattr(entry.text if name in row.missing_text else row.text, name)
                    for name in ("title", "description", "category", "brand")})
        return texts

    def _due_tasks(self, changes: Sequence, texts: dict[ItemRow, ItemText | None]) -> list[EmbeddingTask]:
        """Vectors the batch will need, judged against the stored rows (read without locks; the
        transaction re-checks, and computes inline whatever this guess missed)."""
        final_text: dict[str, ItemText] = {}
        for change in changes:
            if isinstance(change, ItemUpsert) and texts.get(change.row) is not None:
                final_text[change.row.item_id] = texts[change.row]
        if not final_text:
            return []
        with self.store.engine.connect() as connection:
            stored = self.store.load_items(connection, final_text, lock=False)
        tasks = []
        for item_id, text in final_text.items():
            task = embedding_task(item_id, text)
            record = stored.get(item_id)
            if record is None or needs_embedding(record, task.content_hash, self.settings.model_name):
                tasks.append(task)
        return tasks

    def _compute_vectors(self, tasks: Sequence[EmbeddingTask]) -> dict[EmbeddingTask, tuple[bytes, bool]]:
        """(packed vector, is_fallback) per task: one model run for all usable texts (identical
        texts embedded once), the deterministic fallback for the others."""
        vectors: dict[EmbeddingTask, tuple[bytes, bool]] = {}
        usable_texts: dict[str, list[EmbeddingTask]] = {}
        for task in tasks:
            if task.usable:
                usable_texts.setdefault(task.model_text, []).append(task)
            else:
                vectors[task] = (pack_vector(self.fallback(task.key)), True)
        if usable_texts:
            unique = list(usable_texts)
            computed = self.encode(unique)
            for text, vector in zip(unique, computed):
                packed = pack_vector(vector)
                for task in usable_texts[text]:
                    vectors[task] = (packed, False)
        return vectors

    def _fold(self, connection, changes: Sequence, lsn: int, texts: dict[ItemRow, ItemText | None],
              vectors: dict[EmbeddingTask, tuple[bytes, bool]],
              xid_of: dict[int, int] | None = None) -> ApplyReport:
        item_ids, user_ids = affected_ids(changes)
        records = self.store.load_items(connection, item_ids, lock=True)
        users = self.store.load_users(connection, user_ids, lock=True)
        folded = fold_changes(changes, lsn, records, users, texts, self.settings,
                              replayed=self._replayed(connection, changes, user_ids, xid_of or {}))
        report = folded.report
        for item_id, task in folded.due.items():
            vector = vectors.get(task)
            if vector is None:   # the row changed since the unlocked look (rare): compute now
                vector = self._compute_vectors([task])[task]
            set_embedding(records[item_id], task, vector[0], self.settings.model_name, fallback=vector[1])
            report.embedded += 1
            if vector[1]:
                report.fallbacks += 1
                log.warning("empty or unusable item text: fallback vector",
                            extra={"item_id": item_id, "text": task.model_text[:80]})
        if folded.latest_event_time is not None and (
                self.latest_event_time is None or folded.latest_event_time > self.latest_event_time):
            self.latest_event_time = folded.latest_event_time
        if folded.catalog_cleared:
            self.store.remove_all_items(connection, lsn)
        report.items_written = self.store.save_items(connection, records.values())
        report.users_written = self.store.save_users(connection, users.values())
        return report

    def _replayed(self, connection, changes: Sequence, user_ids: set[str],
                  xid_of: dict[int, int]) -> set[int]:
        """Events already folded into their user's state by a RebuildUsers (their transaction is
        visible in the snapshot the state was rebuilt from): see services/features/user_rebuild.py."""
        rebuilt = self.store.rebuilt_snapshots(connection, user_ids) if user_ids else {}
        if not rebuilt:
            return set()
        return {id(change) for change in changes if isinstance(change, EventRow) and change.user_id in rebuilt
                and visible_in(rebuilt[change.user_id], xid_of.get(id(change), 0))}

    def _count(self, report: ApplyReport) -> None:
        self.embeddings_computed += report.embedded
        self.embeddings_skipped += report.kept_vectors
        self.fallback_embeddings += report.fallbacks
        if report.embedded and time.monotonic() - self._last_progress_log >= PROGRESS_LOG_INTERVAL_S:
            # A bulk load takes minutes: say how far it is (make run shows these lines).
            self._last_progress_log = time.monotonic()
            log.info("embedding progress", extra={"embeddings_computed": self.embeddings_computed,
                                                  "embeddings_skipped": self.embeddings_skipped,
                                                  "applied_lsn": self.progress.applied_lsn})
        EMBEDDINGS.labels("computed").inc(report.embedded)
        EMBEDDINGS.labels("skipped").inc(report.kept_vectors)
        FALLBACKS.inc(report.fallbacks)

    # ------------------------------------------------------------------ resync
    def resync(self, item_ids: Sequence[str] | None) -> ResyncReport:
        """Recomputes the given items (None = the whole catalog) from the `items` table and
        re-embeds them; items gone from the catalog become tombstones.

        Resync writes have no WAL position of their own. They are stamped `applied_lsn + 1` and
        the watermark moves there with them, so that WatchItems sends them like any change
        (watchers compare LSNs). That is safe because the next commit in the WAL ends well
        above: stream batches keep comparing correctly against the watermark. The catalog may be
        ahead of the stream; deltas still in flight are applied afterwards as usual, so the
        final state is the catalog's either way."""
        with self.store.engine.connect() as connection:
            catalog = self.store.catalog_entries(connection, item_ids)
            if item_ids is None:
                gone = sorted(set(self.store.item_ids_in_catalog(connection)) - set(catalog))
            else:
                gone = sorted(set(item_ids) - set(catalog))
        not_found = [] if item_ids is None else [i for i in dict.fromkeys(item_ids) if i not in catalog]
        tasks = {item_id: embedding_task(item_id, entry.text) for item_id, entry in catalog.items()}
        vectors = self._compute_vectors(list(tasks.values()))
        report = ResyncReport(not_found=not_found)
        with self.stamped_write("resyncs") as write:
            connection, stamp = write.connection, write.stamp
            ids = sorted(catalog)
            for start in range(0, len(ids), RESYNC_CHUNK):
                chunk = ids[start:start + RESYNC_CHUNK]
                # Re-read under the lock: the catalog may have moved while the model ran.
                fresh = self.store.catalog_entries(connection, chunk)
                records = self.store.load_items(connection, chunk, lock=True)
                for item_id in chunk:
                    entry = fresh.get(item_id)
                    record = records.setdefault(item_id, ItemRecord(item_id))
                    if entry is None:
                        fold_removal(record, stamp)
                        continue
                    fold_catalog_change(record, _row_of_entry(entry), entry.text, stamp,
                                        self.settings.model_name)
                    task = embedding_task(item_id, entry.text)
                    vector = vectors.get(task) or self._compute_vectors([task])[task]
                    set_embedding(record, task, vector[0], self.settings.model_name, fallback=vector[1])
                    record.updated_lsn = stamp
                    report.recomputed += 1
                    report.re_embedded += 1
                self.store.save_items(connection, records.values())
            # Gone from the catalog when we looked; the stream may have brought some back since.
            back = self.store.catalog_entries(connection, gone) if gone else {}
            removed = self.store.load_items(connection, [i for i in gone if i not in back], lock=True)
            for record in removed.values():
                fold_removal(record, stamp)
            self.store.save_items(connection, removed.values())
        self.embeddings_computed += report.re_embedded
        EMBEDDINGS.labels("computed").inc(report.re_embedded)
        return report

    @contextmanager
    def stamped_write(self, what: str) -> Iterator["StampedWrite"]:
        """One transaction of a write that does not come from the stream (Resync, RebuildUsers).

        Such writes have no WAL position of their own. The rows written are stamped
        `write.stamp` = applied_lsn + 1 and the watermark moves there in the same transaction,
        so that WatchItems / WatchUsers send them like any change (watchers compare LSNs; a
        row stamped at or below a watcher's position would never be announced). That is safe
        because the next commit in the WAL ends well above: stream batches keep comparing
        correctly against the watermark. Holds the applier's lock (no batch commits
        meanwhile); the in-memory progress and the watchers follow after the commit. `what`
        names the writes in the refusal when too many stamps piled up without stream data."""
        with self._lock:
            with self.store.engine.begin() as connection:
                progress = self.store.lock_progress(connection)
                if progress.applied_lsn - progress.stream_lsn >= MAX_RESYNC_STAMPS:
                    raise FailedPrecondition(
                        f"{MAX_RESYNC_STAMPS} {what} since the last change from the stream; "
                        "retry once new data has been applied")
                write = StampedWrite(connection, progress, progress.applied_lsn + 1)
                yield write
                new_progress = replace(progress, applied_lsn=write.stamp)
                self.store.save_progress(connection, new_progress)
            self.progress = new_progress
        APPLIED_LSN.set(write.stamp)
        if self.on_commit is not None:
            self.on_commit(write.stamp, self.latest_commit_time)

    # ------------------------------------------------------------------ reading
    def popularity(self, stats: item_stats.ItemStats) -> float:
        """An item's popularity as of the data clock (comparable across items)."""
        when = self.latest_event_time
        if when is None or stats.popularity_at is None:
            return stats.popularity
        return item_stats.popularity_at(stats, when, self.settings.popularity_half_life_s)


# ---------------------------------------------------------------------- pure folding

@dataclass
class Folded:
    report: ApplyReport
    # Items whose vector is due, with what to embed.
    due: dict[str, EmbeddingTask]
    catalog_cleared: bool = False
    latest_event_time: datetime | None = None


def affected_ids(changes: Iterable) -> tuple[set[str], set[str]]:
    """(item ids, user ids) whose rows a list of changes touches."""
    item_ids: set[str] = set()
    user_ids: set[str] = set()
    for change in changes:
        if isinstance(change, ItemUpsert):
            item_ids.add(change.row.item_id)
        elif isinstance(change, ItemRemoval):
            item_ids.add(change.item_id)
        elif isinstance(change, EventRow):
            user_ids.add(change.user_id)
            if change.item_id:
                item_ids.add(change.item_id)
    return item_ids, user_ids


def fold_changes(changes: Sequence, lsn: int, records: dict[str, ItemRecord], users: dict[str, UserState],
                 texts: dict[ItemRow, ItemText | None], settings: ApplierSettings,
                 replayed: Collection[int] = ()) -> Folded:
    """Folds changes, in stream order, into the loaded rows (`records`, `users`; rows are added
    for new items and users). Vectors are not computed here: `due` says which are needed.
    `texts` holds resolved texts of rows the stream sent incomplete; others use their own.
    Events in `replayed` (by id()) are already in their user's rebuilt state: only the item
    statistics take them."""
    folded = Folded(ApplyReport(applied=len(changes)), {})
    due = folded.due
    for change in changes:
        if isinstance(change, EventRow):
            if id(change) not in replayed:
                state = users.setdefault(change.user_id, UserState(change.user_id))
                user_state.apply_event(state, change, lsn, history_length=settings.history_length,
                                       recent_queries=settings.recent_queries, seen_items=settings.seen_items)
            if change.item_id:
                # An event may name an item not (yet) in the catalog: its statistics live in a
                # row that stays out of the catalog until the item arrives.
                record = records.setdefault(change.item_id, ItemRecord(change.item_id))
                item_stats.apply_event(record.stats, change.event_type, change.occurred_at, lsn,
                                       settings.popularity_half_life_s)
            if folded.latest_event_time is None or change.occurred_at > folded.latest_event_time:
                folded.latest_event_time = change.occurred_at
            CHANGES.labels("event").inc()
        elif isinstance(change, ItemUpsert):
            record = records.setdefault(change.row.item_id, ItemRecord(change.row.item_id))
            text = texts[change.row] if change.row in texts else change.row.text
            task = fold_catalog_change(record, change.row, text, lsn, settings.model_name)
            if task is None:
                due.pop(record.item_id, None)
                folded.report.kept_vectors += 1
            else:
                due[record.item_id] = task
            CHANGES.labels("item_upsert").inc()
        elif isinstance(change, ItemRemoval):
            record = records.get(change.item_id)
            if record is not None:
                fold_removal(record, lsn)
            due.pop(change.item_id, None)
            CHANGES.labels("item_removal").inc()
        elif isinstance(change, CatalogCleared):
            for record in records.values():
                fold_removal(record, lsn)
            due.clear()
            folded.catalog_cleared = True
            CHANGES.labels("catalog_cleared").inc()
    return folded


def _row_of_entry(entry: CatalogEntry) -> ItemRow:
    return ItemRow(entry.item_id, entry.text, entry.price, entry.currency, entry.active)
