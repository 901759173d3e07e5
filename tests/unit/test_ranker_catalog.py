"""Catalog state from item changes, lexical search, the data watermark."""
from __future__ import annotations

import threading

import numpy as np

from services.ranker.catalog import Catalog, ItemUpdate
from services.ranker.index_structures import IndexOptions
from services.ranker.lexical import LexicalIndex, normalize
from tests import fakes


def upsert(item_id: str, lsn: int, title: str = "", **fields) -> ItemUpdate:
    vector = fields.pop("vector", fakes.text_vectors([title or item_id])[0])
    return ItemUpdate(item_id, lsn, title=title or item_id, vector=vector, **fields)


def test_bm25_prefers_rare_matching_terms_and_updates_incrementally():
    lexical = LexicalIndex()
    lexical.add(1, "Rose Lip Balm", "Belle Rose")
    lexical.add(2, "Lip Gloss Shine")
    lexical.add(3, "Hair Shampoo")
    ranked = [doc for doc, _ in lexical.search("rose balm")]
    assert ranked[0] == 1 and 3 not in ranked
    lexical.add(3, "Rose Balm Shampoo")          # replaces the old text
    assert 3 in [doc for doc, _ in lexical.search("rose balm")]
    assert lexical.search("hair") == []
    lexical.remove(1)
    assert 1 not in [doc for doc, _ in lexical.search("rose")]
    assert len(lexical) == 2


def test_exact_title_and_brand_matches():
    lexical = LexicalIndex()
    lexical.add(1, "OPI Nail Lacquer, Simmer and Shimmer", "OPI")
    lexical.add(2, "Nail Lacquer Red", "Essie")
    lexical.add(3, "Hydrating Face Cream", "Nordic Glow")
    assert lexical.exact_title("opi nail lacquer simmer  and shimmer!") == [1]
    assert lexical.exact_title("nail lacquer") == []
    assert lexical.brands_in("cheap nordic glow cream") == [3]
    assert normalize("  Rosé-Lip  BALM ") == "rosé lip balm"


def test_apply_upserts_removals_and_watermark():
    catalog = Catalog(IndexOptions(kind="flat"))
    catalog.apply([upsert("a", 10, "Rose Lip Balm", brand="Belle", category="Beauty > Lips", price=4.5,
                          popularity=3.0),
                   upsert("b", 11, "Hair Oil", category="Beauty > Hair", popularity=7.0),
                   upsert("c", 12, "Face Cream", active=False)], watermark=12)
    assert catalog.watermark == 12 and catalog.active_count == 2
    assert catalog.text_index.size == 2 and len(catalog.lexical) == 2
    a = catalog.meta_of("a")
    assert (a.title, a.brand, a.category, a.price, a.active) == ("Rose Lip Balm", "Belle", "Beauty > Lips", 4.5, True)
    assert [catalog.name_of(i) for i in catalog.popular] == ["b", "a"]
    assert catalog.in_categories(["Beauty > L"]) == {catalog.iid("a")}

    catalog.apply([ItemUpdate("a", 13, remove=True)], watermark=13)
    assert not catalog.is_active(catalog.iid("a")) and catalog.text_index.size == 1
    assert catalog.lexical.exact_title("rose lip balm") == []
    assert catalog.in_categories(["Beauty"]) == {catalog.iid("b")}
    # re-activated without a new vector: the one we kept is used again
    catalog.apply([ItemUpdate("a", 14, title="Rose Lip Balm", vector=None)], watermark=14)
    assert catalog.is_active(catalog.iid("a")) and catalog.text_index.size == 2
    # a removal of an unknown item is a no-op; the last change of an item in a batch wins
    catalog.apply([ItemUpdate("zzz", 15, remove=True), upsert("d", 15, "One"), ItemUpdate("d", 15, remove=True)], 15)
    assert catalog.iid("zzz") is None and catalog.iid("d") is None


def test_fresh_list_is_newest_first():
    catalog = Catalog(IndexOptions(kind="flat"))
    catalog.apply([upsert(f"i{n}", 100 + n) for n in range(5)], watermark=104)
    catalog.apply([upsert("late", 500)], watermark=500)
    assert catalog.name_of(int(catalog.fresh[0])) == "late"
    assert catalog.name_of(int(catalog.fresh[1])) == "i4"


def test_wait_for_watermark_returns_when_reached_or_times_out():
    catalog = Catalog(IndexOptions(kind="flat"))
    catalog.apply([], watermark=5)
    assert catalog.wait_for(5, 0)
    assert not catalog.wait_for(6, 0.01)
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("ok", catalog.wait_for(20, 30)))
    waiter.start()
    catalog.apply([upsert("x", 20)], watermark=20)
    waiter.join(30)
    assert result["ok"] is True


class Recorder:
    def __init__(self):
        self.upserted, self.removed = set(), set()

    def items_upserted(self, iids, item_ids, text_vectors):
        assert text_vectors.shape == (len(iids), 384)
        self.upserted |= set(item_ids)
        self.removed -= set(item_ids)

    def items_removed(self, iids):
        self.removed |= set(iids.tolist())


def test_attach_replays_changes_after_the_snapshot():
    catalog = Catalog(IndexOptions(kind="flat"))
    catalog.apply([upsert("a", 1), upsert("b", 2)], watermark=2)
    iids, names, vectors, seq = catalog.snapshot()
    assert sorted(names) == ["a", "b"] and vectors.shape == (2, 384)
    catalog.apply([upsert("c", 3), ItemUpdate("a", 3, remove=True)], watermark=3)   # during a "build"
    recorder = Recorder()
    catalog.attach(recorder, seq)
    assert recorder.upserted == {"c"} and recorder.removed == {catalog.iid("a")}
    catalog.apply([upsert("d", 4)], watermark=4)
    assert "d" in recorder.upserted
    catalog.detach(recorder)
    catalog.apply([upsert("e", 5)], watermark=5)
    assert "e" not in recorder.upserted and catalog.listener_count == 0


def test_wrong_dimension_vectors_are_not_indexed():
    catalog = Catalog(IndexOptions(kind="flat"))
    catalog.apply([ItemUpdate("bad", 1, title="Bad", vector=np.ones(7, np.float32))], watermark=1)
    assert catalog.text_index.size == 0 and not catalog.is_active(catalog.iid("bad"))


def test_a_feed_page_decodes_to_columns_with_one_vector_matrix():
    from deltarec.v1 import features_pb2
    from services.ranker.item_feed import decode_page
    page = features_pb2.WatchItemsResponse(watermark=30)
    good = fakes.text_vectors(["a", "b"])
    for n, item_id in enumerate(("a", "b")):
        change = page.changes.add(kind=features_pb2.ITEM_CHANGE_KIND_UPSERT, lsn=10 + n)
        change.item.item_id, change.item.title, change.item.active = item_id, f"Title {item_id}", True
        change.item.embedding.dim, change.item.embedding.values = 384, good[n].astype("<f4").tobytes()
    short = page.changes.add(kind=features_pb2.ITEM_CHANGE_KIND_UPSERT, lsn=20)
    short.item.item_id, short.item.active = "c", True
    short.item.embedding.dim, short.item.embedding.values = 8, np.ones(8, "<f4").tobytes()
    page.changes.add(kind=features_pb2.ITEM_CHANGE_KIND_REMOVE, lsn=21).item.item_id = "a"
    page.changes.add(kind=features_pb2.ITEM_CHANGE_KIND_UPSERT, lsn=22)        # no item id: skipped
    batch = decode_page(page, 384)
    assert batch.item_ids == ["a", "b", "c", "a"] and batch.remove == [False, False, False, True]
    assert batch.has_vector.tolist() == [True, True, False, False] and batch.vectors.shape == (4, 384)
    assert np.array_equal(batch.vectors[1], good[1])
    catalog = Catalog(IndexOptions(kind="flat"))
    catalog.apply_batch(batch, page.watermark)
    # the last change of "a" (its removal) wins; "c" has no usable vector and is not indexed
    assert catalog.watermark == 30 and catalog.active_count == 1 and catalog.text_index.size == 1
    assert catalog.meta_of("b").title == "Title b" and catalog.meta_of("b").price is None
    assert not catalog.is_active(catalog.iid("c")) and catalog.iid("a") is None


def test_columns_keep_metadata_and_filters_read_them():
    from services.ranker.filters import FilterSpec, make_acceptor
    catalog = Catalog(IndexOptions(kind="flat"))
    catalog.apply([upsert("a", 1, "A", brand="X", category="Beauty > Lips", price=4.5),
                   upsert("b", 2, "B", brand="X", category="Beauty > Hair"),
                   upsert("c", 3, "C", category="Beauty > Lips", price=12.0)], watermark=3)
    catalog.apply([ItemUpdate("c", 4, remove=True)], watermark=4)
    c = catalog.meta_of("c")
    assert (c.title, c.category, c.price, c.active, c.updated_lsn) == ("C", "Beauty > Lips", 12.0, False, 4)
    assert catalog.meta_of("b").brand == "X" and catalog.meta_of("b").price is None
    accept = make_acceptor(catalog, FilterSpec(categories=("Beauty > L",), max_price=10.0), set())
    assert [catalog.name_of(i) for i in range(3) if accept(i)] == ["a"]
