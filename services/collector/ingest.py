"""The collector's ingest logic, between the gRPC edge and the store.

Plain Python over protobuf messages: validate each event, de-duplicate inside the
batch, store in one round trip, and report per event in request order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

from prometheus_client import Counter

from deltarec.v1 import collector_pb2, common_pb2

from services.collector.store import CollectorStore, Rejection
from services.common.validation import MAX_ID_BYTES, check_ids
from services.collector.validation import (Rejected, check_batch_size, event_payload, validate_event,
                                           validate_item)

ACCEPTED = collector_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = collector_pb2.EVENT_STATUS_DUPLICATE
REJECTED = collector_pb2.EVENT_STATUS_REJECTED

EVENTS = Counter("deltarec_collector_events_total", "Events by outcome", ["outcome"])
UNKNOWN_ITEMS = Counter("deltarec_collector_unknown_item_events_total",
                        "Accepted events about items not (yet) in the catalog")
ITEMS = Counter("deltarec_collector_items_total", "Catalog writes by operation", ["operation"])


@dataclass
class BatchReport:
    results: list[collector_pb2.EventResult] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    unknown_items: int = 0
    commit_lsn: int = 0


class Ingestor:
    def __init__(self, store: CollectorStore, max_batch: int, max_clock_skew_s: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.store, self.max_batch, self.max_clock_skew_s, self.clock = store, max_batch, max_clock_skew_s, clock

    def ingest(self, events: Sequence[common_pb2.Event]) -> BatchReport:
        check_batch_size(len(events), self.max_batch, "events")
        now = self.clock()
        rows, rejections = [], []
        # Per event: ("row", index into rows) | ("rejected", reason) | ("duplicate_in_batch", None)
        fates: list[tuple[str, object]] = []
        first_seen: set[str] = set()
        for event in events:
            try:
                row = validate_event(event, now, self.max_clock_skew_s)
            except Rejected as reason:
                rejections.append(Rejection(event.event_id[:128].replace("\x00", "\ufffd"),  # text refuses NUL
                                            event_payload(event), str(reason)))
                fates.append(("rejected", str(reason)))
                continue
            if row.event_id in first_seen:
                fates.append(("duplicate_in_batch", None))
                continue
            first_seen.add(row.event_id)
            fates.append(("row", row.event_id))
            rows.append(row)
        outcome = self.store.ingest(rows, rejections)

        report = BatchReport(unknown_items=outcome.unknown_items, commit_lsn=outcome.commit_lsn)
        for index, (event, (fate, detail)) in enumerate(zip(events, fates)):
            if fate == "rejected":
                status, reason = REJECTED, str(detail)
                report.rejected += 1
            elif fate == "row" and detail in outcome.stored:
                status, reason = ACCEPTED, ""
                report.accepted += 1
            else:
                status, reason = DUPLICATE, "event_id already stored"
                report.duplicates += 1
            # A rejected id may be the over-long one: never echo more than an id's worth.
            report.results.append(collector_pb2.EventResult(index=index, event_id=event.event_id[:MAX_ID_BYTES],
                                                            status=status, reason=reason))
        EVENTS.labels("accepted").inc(report.accepted)
        EVENTS.labels("duplicate").inc(report.duplicates)
        EVENTS.labels("rejected").inc(report.rejected)
        UNKNOWN_ITEMS.inc(report.unknown_items)
        return report

    def upsert_items(self, items: Sequence[common_pb2.Item]) -> collector_pb2.UpsertItemsResponse:
        check_batch_size(len(items), self.max_batch, "items")
        response = collector_pb2.UpsertItemsResponse()
        rows_by_id = {}
        for index, item in enumerate(items):
            try:
                row = validate_item(item)
            except Rejected as reason:
                response.results.add(index=index, item_id=item.item_id[:MAX_ID_BYTES], ok=False, reason=str(reason))
                response.rejected += 1
                continue
            rows_by_id[row.item_id] = row   # the last version of an item in a batch wins
            response.results.add(index=index, item_id=item.item_id, ok=True)
        response.upserted, response.commit_lsn = self.store.upsert_items(list(rows_by_id.values()))
        ITEMS.labels("upsert").inc(response.upserted)
        return response

    def delete_items(self, item_ids: Sequence[str]) -> collector_pb2.DeleteItemsResponse:
        item_ids = check_ids("item_ids", item_ids, self.max_batch)
        deleted, commit_lsn = self.store.delete_items(item_ids)
        ITEMS.labels("delete").inc(len(deleted))
        return collector_pb2.DeleteItemsResponse(
            deleted=len(deleted), not_found=sorted(set(item_ids) - deleted), commit_lsn=commit_lsn)
