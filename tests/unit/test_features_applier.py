"""The applier's folding of changes into item and user rows, on plain data (no database)."""
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from services.features.applier import ApplierSettings, affected_ids, fold_changes
from services.contracts.item_text import ItemText
from services.features.content import content_hash
from services.features.deltas import CatalogCleared, ItemRemoval, ItemRow, ItemUpsert
from services.features.items import ItemRecord, embedding_task, fold_catalog_change, set_embedding
from services.contracts.event_row import EventRow

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SETTINGS = ApplierSettings(model_name="m", history_length=3, recent_queries=2, popularity_half_life_s=86400.0)


def row(item_id="i1", title="Rose Lip Balm", price="4.5", active=True, **text):
    return ItemRow(item_id, ItemText(title, text.get("description", ""), text.get("category", "Lips"),
                                     text.get("brand", "Belle")), Decimal(price), "EUR", active)


def embedded(item_id="i1", **kwargs) -> ItemRecord:
    """A stored item whose vector matches its text."""
    record = ItemRecord(item_id)
    task = fold_catalog_change(record, row(item_id, **kwargs), row(item_id, **kwargs).text, 10, "m")
    set_embedding(record, task, b"\0" * 8, "m", fallback=False)
    return record


def event(n, kind="view", user="u1", item="i1", query=None):
    return EventRow(f"e{n}", kind, user, item, query, T0 + timedelta(minutes=n), row_id=n)


def test_new_item_needs_a_vector():
    records = {}
    folded = fold_changes([ItemUpsert(row())], 50, records, {}, {}, SETTINGS)
    assert list(folded.due) == ["i1"]
    assert folded.due["i1"].content_hash == content_hash(row().text)
    assert records["i1"].listed and records["i1"].updated_lsn == 50


def test_price_only_change_keeps_the_vector_but_is_a_visible_change():
    records = {"i1": embedded()}
    folded = fold_changes([ItemUpsert(row(price="9.99"))], 60, records, {}, {}, SETTINGS)
    assert folded.due == {} and folded.report.kept_vectors == 1
    assert records["i1"].price == Decimal("9.99") and records["i1"].updated_lsn == 60


def test_title_change_needs_a_vector():
    records = {"i1": embedded()}
    folded = fold_changes([ItemUpsert(row(title="Rose Lip Balm XL"))], 60, records, {}, {}, SETTINGS)
    assert list(folded.due) == ["i1"]


def test_vector_from_another_model_is_stale():
    records = {"i1": embedded()}
    folded = fold_changes([ItemUpsert(row())], 60, records, {}, {},
                          ApplierSettings(model_name="other"))
    assert list(folded.due) == ["i1"]


def test_identical_upsert_changes_nothing_a_watcher_sees():
    records = {"i1": embedded()}
    fold_changes([ItemUpsert(row())], 60, records, {}, {}, SETTINGS)
    assert records["i1"].updated_lsn == 10


def test_change_and_revert_in_one_batch_needs_no_vector():
    records = {"i1": embedded()}
    folded = fold_changes([ItemUpsert(row(title="Other")), ItemUpsert(row())], 60, records, {}, {}, SETTINGS)
    assert folded.due == {}


def test_unknown_text_keeps_the_stored_text_and_vector():
    records = {"i1": embedded()}
    incomplete = row(title="ignored", price="1")
    folded = fold_changes([ItemUpsert(incomplete)], 60, records, {}, {incomplete: None}, SETTINGS)
    assert folded.due == {} and records["i1"].title == "Rose Lip Balm" and records["i1"].price == Decimal("1")


def test_deactivation_and_deletion_leave_the_active_set():
    records = {"i1": embedded(), "i2": embedded("i2")}
    fold_changes([ItemUpsert(row(active=False)), ItemRemoval("i2")], 70, records, {}, {}, SETTINGS)
    assert not records["i1"].listed and records["i1"].in_catalog and records["i1"].updated_lsn == 70
    assert not records["i2"].listed and not records["i2"].in_catalog and records["i2"].updated_lsn == 70
    assert records["i2"].embedding is not None     # kept: the same text back costs no model call


def test_deleted_then_reinserted_in_one_batch():
    records = {"i1": embedded()}
    folded = fold_changes([ItemRemoval("i1"), ItemUpsert(row())], 70, records, {}, {}, SETTINGS)
    assert records["i1"].listed and folded.due == {}


def test_catalog_cleared_then_new_item():
    records = {"i1": embedded()}
    changes = [ItemUpsert(row(title="x")), CatalogCleared(), ItemUpsert(row("i3"))]
    folded = fold_changes(changes, 80, records, {}, {}, SETTINGS)
    assert folded.catalog_cleared and not records["i1"].in_catalog and list(folded.due) == ["i3"]


def test_events_fold_into_users_and_item_stats():
    users, records = {}, {}
    changes = [event(1), event(2, "purchase"), event(3, "search", item=None, query="balm"),
               event(4, "view", user="u2", item="i9")]
    folded = fold_changes(changes, 90, records, users, {}, SETTINGS)
    assert users["u1"].counters == {"view": 1, "purchase": 1, "search": 1}
    assert [h.event_type for h in users["u1"].history] == ["view", "purchase"]
    assert [q.query for q in users["u1"].recent_queries] == ["balm"]
    assert records["i1"].stats.views == 1 and records["i1"].stats.purchases == 1
    # An event about an item not in the catalog keeps its statistics in a row outside it.
    assert not records["i9"].in_catalog and records["i9"].stats.views == 1 and records["i9"].updated_lsn == 0
    assert folded.latest_event_time == T0 + timedelta(minutes=4)


def test_history_length_is_the_setting():
    users = {}
    fold_changes([event(n, item=f"i{n}") for n in range(10)], 90, {}, users, {}, SETTINGS)
    assert [h.item_id for h in users["u1"].history] == ["i7", "i8", "i9"]


def test_affected_ids():
    changes = [ItemUpsert(row("a")), ItemRemoval("b"), event(1, user="u", item="c"),
               event(2, "search", user="v", item=None, query="q"), CatalogCleared()]
    assert affected_ids(changes) == ({"a", "b", "c"}, {"u", "v"})


def test_embedding_task_of_empty_text_is_unusable_with_an_item_key():
    task = embedding_task("i1", ItemText("  ", "", "", ""))
    assert not task.usable and task.key == "item:i1"
