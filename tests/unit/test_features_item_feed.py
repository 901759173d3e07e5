"""WatchItems paging: which changes go out and what watermark each page claims. The store is
replaced by an in-memory list of item rows with the same two reads (applied_lsn, read_changes: a
page and the watermark of the same snapshot)."""
import threading

from services.features.item_feed import REMOVE, UPSERT, ItemChangeFeed, LsnNotifier
from services.features.items import ItemRecord


class RowsInMemory:
    def __init__(self, applied_lsn=0):
        self.rows: dict[str, ItemRecord] = {}
        self.watermark = applied_lsn
        self.before_read = None     # runs once, just before the next page is read

    def put(self, item_id, lsn, listed=True):
        self.rows[item_id] = ItemRecord(item_id, in_catalog=listed, active=listed, embedding=b"v",
                                        updated_lsn=lsn)
        self.watermark = max(self.watermark, lsn)

    def applied_lsn(self):
        return self.watermark

    def read_changes(self, after, limit):
        if self.before_read is not None:
            hook, self.before_read = self.before_read, None
            hook()
        lsn, item = after
        def after_cursor(r):
            return r.updated_lsn > lsn or (item is not None and r.updated_lsn == lsn and r.item_id > item)
        rows = sorted((r for r in self.rows.values() if after_cursor(r)),
                      key=lambda r: (r.updated_lsn, r.item_id))
        return rows[:limit], self.watermark


def first_round(store, after_lsn, max_batch):
    """The pages of the catch-up round (the feed is stopped as soon as it would wait)."""
    notifier = LsnNotifier()
    pages = []
    feed = ItemChangeFeed(store, notifier, poll_s=0.01)
    stop = threading.Event()
    for page in feed.pages(after_lsn, max_batch, lambda: not stop.is_set()):
        pages.append(page)
        if page.watermark >= store.applied_lsn():
            stop.set()
    return pages


def test_exactly_the_changes_after_the_watermark():
    store = RowsInMemory()
    for i, lsn in enumerate([10, 20, 20, 30, 40]):
        store.put(f"i{i}", lsn)
    pages = first_round(store, 20, 100)
    assert [c.item.item_id for p in pages for c in p.changes] == ["i3", "i4"]
    assert pages[-1].watermark == 40


def test_full_pages_never_claim_a_partly_sent_lsn():
    store = RowsInMemory()
    for i in range(5):
        store.put(f"a{i}", 100)          # five changes of one commit
    store.put("b", 200)
    pages = first_round(store, 50, 2)
    assert [len(p.changes) for p in pages] == [2, 2, 2, 0]
    # Pages inside a round claim nothing new (a row may move past them while the round runs);
    # the page that ends it says "caught up".
    assert [p.watermark for p in pages] == [50, 50, 50, 200]
    assert [c.item.item_id for p in pages for c in p.changes] == ["a0", "a1", "a2", "a3", "a4", "b"]


def test_an_item_changed_again_during_a_round_goes_out_before_the_position_passes_it():
    # "x" changes at 60 (a round starts for it) and again at 70 before the round reads its page:
    # the page that moves the receiver past 60 must carry x (at 70), not leave it for later.
    store = RowsInMemory(applied_lsn=50)
    store.put("x", 60)
    store.before_read = lambda: store.put("x", 70)
    notifier = LsnNotifier(60)
    stop = threading.Event()
    first = next(ItemChangeFeed(store, notifier, poll_s=0.01).pages(50, 10, lambda: not stop.is_set()))
    assert first.watermark >= 60
    assert [(c.item.item_id, c.lsn) for c in first.changes] == [("x", 70)]
    stop.set()


def test_from_zero_only_listed_items_and_later_removals():
    store = RowsInMemory()
    store.put("kept", 10)
    store.put("gone", 20, listed=False)
    pages = first_round(store, 0, 10)
    assert [(c.kind, c.item.item_id) for p in pages for c in p.changes] == [(UPSERT, "kept")]
    pages = first_round(store, 10, 10)
    assert [(c.kind, c.item.item_id) for p in pages for c in p.changes] == [(REMOVE, "gone")]


def test_caught_up_watcher_gets_one_empty_page_then_live_changes():
    store = RowsInMemory(applied_lsn=50)
    notifier = LsnNotifier(50)
    feed = ItemChangeFeed(store, notifier, poll_s=5.0)
    stop = threading.Event()
    pages = feed.pages(50, 10, lambda: not stop.is_set())
    first = next(pages)
    assert first.changes == [] and first.watermark == 50

    def commit():
        store.put("new", 60)
        notifier.publish(60)
    threading.Timer(0.05, commit).start()
    live = next(pages)
    assert [c.item.item_id for c in live.changes] == ["new"] and live.watermark == 60
    stop.set()
    notifier.close()
