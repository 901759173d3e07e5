"""Decoding delta batches and selecting what is new against the stored progress (pure)."""
from datetime import datetime, timezone
from decimal import Decimal

from google.protobuf import json_format

from deltarec.v1 import collector_pb2

from services.contracts.item_text import ItemText
from services.features.deltas import (CatalogCleared, DecodedBatch, ItemRemoval, ItemUpsert, Progress,
                                      Transaction, decode_batch, decode_change, select_new)
from services.contracts.event_row import EventRow

INSERT, UPDATE, DELETE, TRUNCATE = (collector_pb2.OPERATION_INSERT, collector_pb2.OPERATION_UPDATE,
                                    collector_pb2.OPERATION_DELETE, collector_pb2.OPERATION_TRUNCATE)
ITEM = {"item_id": "42", "title": "Rose Lip Balm", "description": "", "category": "Lips", "brand": "Belle",
        "price": "4.500000000", "currency": "EUR", "attributes": {}, "active": True,
        "updated_at": "2026-01-01T00:00:00Z"}
EVENT = {"id": "7", "event_id": "e-7", "event_type": "purchase", "user_id": "u1", "item_id": "42",
         "query": None, "occurred_at": "2026-01-02T03:04:05.5+00:00", "attributes": {},
         "received_at": "2026-01-02T03:04:06Z"}


def row_of(struct):
    return json_format.MessageToDict(struct)


def test_item_insert_becomes_an_upsert_with_typed_values():
    [change] = decode_change("items", INSERT, {"item_id": "42"}, ITEM, None)
    assert isinstance(change, ItemUpsert)
    assert change.row.text == ItemText("Rose Lip Balm", "", "Lips", "Belle")
    assert change.row.price == Decimal("4.5") and change.row.currency == "EUR" and change.row.active


def test_item_delete_uses_the_old_key():
    assert decode_change("items", DELETE, None, None, {"item_id": "42"}) == [ItemRemoval("42")]


def test_item_key_change_removes_the_old_id():
    changes = decode_change("items", UPDATE, {"item_id": "43"}, dict(ITEM, item_id="43"), {"item_id": "42"})
    assert changes[0] == ItemRemoval("42") and changes[1].row.item_id == "43"


def test_truncate_of_items_clears_the_catalog_and_of_events_changes_nothing():
    assert decode_change("items", TRUNCATE, None, None, None) == [CatalogCleared()]
    assert decode_change("events", TRUNCATE, None, None, None) == []


def test_unchanged_toast_text_columns_are_marked_missing():
    row = {k: v for k, v in ITEM.items() if k != "description"}
    [change] = decode_change("items", UPDATE, {"item_id": "42"}, row, None, ["description", "attributes"])
    assert change.row.missing_text == ("description",)


def test_event_insert_becomes_an_event():
    [change] = decode_change("events", INSERT, {"id": "7"}, EVENT, None)
    assert change == EventRow("e-7", "purchase", "u1", "42", None,
                              datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=timezone.utc), row_id=7)


def test_event_updates_and_deletes_are_ignored():
    assert decode_change("events", UPDATE, {"id": "7"}, EVENT, None) == []
    assert decode_change("events", DELETE, None, None, {"id": "7"}) == []


def batch_message(commit_lsn, deltas):
    batch = collector_pb2.DeltaBatch(commit_lsn=commit_lsn)
    for xid, table, op, row in deltas:
        delta = batch.deltas.add(lsn=commit_lsn - 10, xid=xid, table=table, op=op)
        delta.commit_time.FromDatetime(datetime(2026, 1, 1, tzinfo=timezone.utc))
        if row is not None:
            delta.new_row.update(row)
            delta.key.update({"item_id": row["item_id"]} if table == "items" else {"id": row["id"]})
    return batch


def test_batch_groups_consecutive_deltas_by_transaction():
    message = batch_message(500, [(1, "items", INSERT, ITEM), (1, "events", INSERT, EVENT),
                                  (2, "events", INSERT, dict(EVENT, id="8", event_id="e-8")),
                                  (3, "events", INSERT, dict(EVENT, event_type="bogus"))])
    decoded = decode_batch(message, row_of)
    assert [t.xid for t in decoded.transactions] == [1, 2, 3]
    assert [len(t.changes) for t in decoded.transactions] == [2, 1, 0]
    assert decoded.ignored == 1          # the malformed event: logged, not fatal
    assert decoded.commit_lsn == 500 and not decoded.snapshot
    assert decoded.latest_commit_time == datetime(2026, 1, 1, tzinfo=timezone.utc)


# ------------------------------------------------------------------------- selection

def stream_batch(commit_lsn, *xids):
    return DecodedBatch(commit_lsn, False, [Transaction(x, [ItemRemoval(f"item-{x}")]) for x in xids])


def snapshot_batch(commit_lsn, point, *, begin=False, end=False, rows=1):
    changes = [ItemRemoval(f"s{commit_lsn}-{i}") for i in range(rows)]
    return DecodedBatch(commit_lsn, True, [Transaction(0, changes)], snapshot_begin=begin, snapshot_end=end,
                        snapshot_lsn=point)


def test_new_batch_is_applied_whole_and_moves_the_mark():
    selection = select_new(stream_batch(200, 5, 6), Progress(applied_lsn=100, last_xid=4))
    assert selection.changes == [ItemRemoval("item-5"), ItemRemoval("item-6")]
    assert selection.progress == Progress(applied_lsn=200, last_xid=6, stream_lsn=200)


def test_batch_at_or_below_the_mark_is_skipped():
    for lsn in (100, 90):
        selection = select_new(stream_batch(lsn, 5), Progress(applied_lsn=100, last_xid=5))
        assert selection.changes == [] and selection.progress == Progress(applied_lsn=100, last_xid=5)
        assert selection.skipped_transactions == 1


def test_regrouped_redelivery_drops_the_applied_prefix():
    # Applied and committed up to transaction 6 (commit 200) but the ack was lost: the collector
    # resends 5, 6 and a new 7 as one batch.
    selection = select_new(stream_batch(300, 5, 6, 7), Progress(applied_lsn=200, last_xid=6))
    assert selection.changes == [ItemRemoval("item-7")]
    assert selection.skipped_transactions == 2
    assert selection.progress.applied_lsn == 300 and selection.progress.last_xid == 7


def test_xids_are_compared_not_change_positions():
    # Transaction 9 began before 8 committed: its changes sit below 8's commit in the WAL, but it
    # committed later and must be applied.
    selection = select_new(stream_batch(400, 9), Progress(applied_lsn=300, last_xid=8))
    assert selection.changes == [ItemRemoval("item-9")]


def test_first_snapshot_starts_without_a_reset():
    selection = select_new(snapshot_batch(98, 100, begin=True), Progress())
    assert selection.changes and not selection.restart_from_snapshot
    assert selection.progress == Progress(applied_lsn=98, snapshot_lsn=100, stream_lsn=98)


def test_snapshot_batches_follow_the_mark_and_the_end_closes_the_snapshot():
    progress = select_new(snapshot_batch(98, 100, begin=True), Progress()).progress
    progress = select_new(snapshot_batch(99, 100), progress).progress
    assert select_new(snapshot_batch(99, 100), progress).changes == []      # again: skipped
    last = select_new(snapshot_batch(100, 100, end=True), progress)
    assert last.changes and last.progress.snapshot_done and last.progress.applied_lsn == 100


def test_a_snapshot_started_over_resets_event_state():
    # Crashed in the middle of snapshot 100; the collector starts over with a new slot at 150,
    # whose first positions may even be below the old mark.
    progress = Progress(applied_lsn=99, snapshot_lsn=100, stream_lsn=99)
    selection = select_new(snapshot_batch(90, 150, begin=True), progress)
    assert selection.restart_from_snapshot and selection.changes
    assert selection.progress.applied_lsn == 90 and selection.progress.snapshot_lsn == 150


def test_a_completed_snapshot_sent_again_is_skipped():
    progress = Progress(applied_lsn=500, last_xid=3, snapshot_lsn=100, snapshot_done=True, stream_lsn=500)
    selection = select_new(snapshot_batch(98, 100, begin=True), progress)
    assert selection.changes == [] and selection.progress == progress and not selection.restart_from_snapshot


def test_snapshot_after_a_completed_one_rebuilds():
    # Applied the end of snapshot 100 but crashed before acking it: the collector starts over.
    progress = Progress(applied_lsn=100, snapshot_lsn=100, snapshot_done=True, stream_lsn=100)
    selection = select_new(snapshot_batch(140, 160, begin=True, end=True), progress)
    assert selection.restart_from_snapshot and selection.progress.snapshot_lsn == 160


def test_stream_after_snapshot():
    progress = Progress(applied_lsn=100, snapshot_lsn=100, snapshot_done=True, stream_lsn=100)
    selection = select_new(stream_batch(180, 11), progress)
    assert selection.changes and selection.progress.applied_lsn == 180 and selection.progress.snapshot_done
