"""The ranker's user cache kept exact by the user-change stream, its batched misses, the stream
client's resume rules, whole-history seen filters and anonymous sessions — without servers."""
from __future__ import annotations

import threading

import pytest

from deltarec.v1 import common_pb2, features_pb2

from services.common.errors import InvalidArgument
from services.ranker.catalog import Catalog, ItemUpdate
from services.ranker.filters import FilterSpec, default_exclusions
from services.ranker.index_structures import IndexOptions
from services.ranker.seen_filter import excluded_items
from services.ranker.session import SessionEvent, check_session, session_history, with_session
from services.ranker.user_cache import CachedUser, FeaturesUnavailable, MissBatcher, UserCache, UserHistory
from services.ranker.user_feed import UserFeed
from tests import fakes


class Source:
    """Features as the cache sees it: users' states at a data LSN, with a call log."""

    def __init__(self) -> None:
        self.lsn = 100
        self.items: dict[str, tuple[str, ...]] = {}
        self.calls: list[list[str]] = []
        self.down = False
        self.after_read = None     # runs after the state was read, before the cache gets it

    def user_histories(self, user_ids, max_history, timeout_s):
        self.calls.append(list(user_ids))
        if self.down:
            raise FeaturesUnavailable("down")
        if self.after_read is not None:
            lsn = self.lsn
            self.after_read()
            self.lsn = lsn
        return {u: UserHistory(self.items.get(u, ()), (1,) * len(self.items.get(u, ())),
                               (0.0,) * len(self.items.get(u, ())), self.lsn) for u in user_ids}


def items_of(entry: CachedUser) -> tuple[str, ...]:
    return entry.history.item_ids


def test_stream_keeps_entries_exact_and_a_cached_user_needs_no_call():
    source = Source()
    cache = UserCache(source, ttl_s=0.0)
    cache.stream_started(100)
    source.items["u"] = ("a",)
    assert items_of(cache.get("u", 50, 0, None)) == ("a",) and len(source.calls) == 1
    cache.apply_changes([], 180)                      # other users' commits move the position
    hit = cache.get("u", 50, 0, None)
    assert len(source.calls) == 1 and hit.history.data_lsn == 180   # exact as of the stream
    assert cache.get("u", 50, 180, None).history.data_lsn == 180 and len(source.calls) == 1
    source.items["u"], source.lsn = ("a", "b"), 200
    cache.apply_changes([("u", 200)], 200)            # u changed: the entry goes
    assert items_of(cache.get("u", 50, 0, None)) == ("a", "b") and len(source.calls) == 2
    cache.apply_changes([("u", 200)], 210)            # the same change again: harmless
    assert items_of(cache.get("u", 50, 0, None)) == ("a", "b") and len(source.calls) == 2


def test_a_change_passing_while_the_read_is_in_flight_is_not_cached_stale():
    source = Source()
    cache = UserCache(source, ttl_s=0.0)
    cache.stream_started(100)
    source.items["u"], source.lsn = ("old",), 150
    # read at 150, and u changes at 160 before the answer is stored
    source.after_read = lambda: cache.apply_changes([("u", 160)], 160)
    assert items_of(cache.get("u", 50, 0, None)) == ("old",)
    source.after_read = None
    source.items["u"], source.lsn = ("new",), 160
    assert items_of(cache.get("u", 50, 0, None)) == ("new",)     # read again: it was not kept
    assert len(source.calls) == 2


def test_entries_read_before_what_the_stream_covers_are_not_kept():
    source = Source()
    cache = UserCache(source, ttl_s=0.0, change_memory=2)
    cache.stream_started(100)
    cache.apply_changes([("x", 110), ("y", 120), ("z", 130)], 130)   # x's change is forgotten
    source.lsn = 105                                 # a read older than what is still remembered
    cache.get("u", 50, 0, None)
    cache.get("u", 50, 0, None)
    assert len(source.calls) == 2 and len(cache) == 0


def test_without_a_live_stream_the_short_ttl_and_min_lsn_read_through():
    source = Source()
    cache = UserCache(source, ttl_s=60.0)
    cache.get("u", 50, 0, None)
    cache.get("u", 50, 0, None)
    assert len(source.calls) == 1                     # the fallback TTL
    cache.get("u", 50, 101, None)
    assert len(source.calls) == 2                     # wants newer than the entry: read through
    no_ttl = UserCache(Source(), ttl_s=0.0)
    no_ttl.get("u", 50, 0, None)
    no_ttl.get("u", 50, 0, None)
    assert len(no_ttl.source.calls) == 2              # lost stream, no TTL: every request reads


def test_reset_forgets_everything():
    source = Source()
    cache = UserCache(source, ttl_s=0.0)
    cache.stream_started(100)
    cache.get("u", 50, 0, None)
    cache.reset()
    assert len(cache) == 0 and not cache.live and cache.stream_lsn == 0


def test_capacity_bounds_the_entries():
    cache = UserCache(Source(), ttl_s=0.0, capacity=3)
    cache.stream_started(100)
    for n in range(10):
        cache.get(f"u{n}", 50, 0, None)
    assert len(cache) == 3


def test_concurrent_misses_share_one_read():
    release, first_started = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    class Slow:
        def user_histories(self, user_ids, max_history, timeout_s):
            calls.append(list(user_ids))
            if len(calls) == 1:
                first_started.set()
                release.wait(10)
            return {u: UserHistory(data_lsn=1) for u in user_ids}

    batcher = MissBatcher(Slow(), max_in_flight=1)
    results: dict[str, UserHistory] = {}

    def fetch(user_id):
        results[user_id] = batcher.fetch(user_id, 50, 10.0)
    first = threading.Thread(target=fetch, args=("a",))
    first.start()
    assert first_started.wait(10)
    others = [threading.Thread(target=fetch, args=(f"b{n}",)) for n in range(5)]
    for thread in others:
        thread.start()
    while len(batcher._pending) < 5:                    # all queued behind the read in flight
        threading.Event().wait(0.001)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert calls[0] == ["a"] and sorted(calls[1]) == [f"b{n}" for n in range(5)] and len(calls) == 2
    assert len(results) == 6


def test_a_failed_read_fails_every_queued_request():
    source = Source()
    source.down = True
    with pytest.raises(FeaturesUnavailable):
        MissBatcher(source).fetch("u", 50, 1.0)


def test_user_feed_starts_from_now_and_resumes_from_its_position():
    cache = UserCache(Source(), ttl_s=0.0)
    feed = UserFeed(client=None, cache=cache)
    cache.get("stale", 50, 0, None)
    feed.apply(features_pb2.WatchUsersResponse(watermark=500), fresh_start=True)
    assert cache.live and cache.stream_lsn == 500 and len(cache) == 0    # read before the start: gone
    cache.source.lsn = 500
    cache.get("u", 50, 0, None)
    feed.apply(features_pb2.WatchUsersResponse(
        changes=[features_pb2.UserChange(user_id="u", lsn=520)], watermark=530), fresh_start=False)
    assert cache.stream_lsn == 530 and len(cache) == 0
    # what a reconnect asks for: everything after what it applied
    assert cache.stream_lsn == 530


# ---------------------------------------------------------------------- seen filters and sessions

@pytest.fixture
def catalog():
    catalog = Catalog(IndexOptions(kind="flat"))
    ids = [f"i{n}" for n in range(700)]
    vectors = fakes.text_vectors(ids)
    catalog.apply([ItemUpdate(item, 1, title=item, vector=vectors[n]) for n, item in enumerate(ids)],
                  watermark=10)
    return catalog


def test_an_item_seen_long_ago_is_excluded_through_the_whole_history_set(catalog):
    # 600 interactions; the recent history holds the last 50, the seen set all of them
    seen = tuple(f"i{n}" for n in range(600))
    history = UserHistory(seen[-50:], (1,) * 50, (0.0,) * 50, 10, seen_item_ids=seen,
                          purchased_item_ids=("i3",))
    cached = CachedUser(history, 0.0)
    excluded = excluded_items(catalog, cached, FilterSpec(exclude_seen=True))
    assert catalog.iid("i100") in excluded                     # seen 500 interactions ago
    assert len(excluded) == 600
    bought = excluded_items(catalog, cached, FilterSpec(exclude_purchased=True))
    assert bought == {catalog.iid("i3")}
    assert excluded_items(catalog, None, FilterSpec(exclude_seen=True, exclude_item_ids=("i5",))) == \
        {catalog.iid("i5")}


def test_items_arriving_after_the_memo_are_excluded_too(catalog):
    cached = CachedUser(UserHistory(seen_item_ids=("i1", "later")), 0.0)
    assert excluded_items(catalog, cached, FilterSpec(exclude_seen=True)) == {catalog.iid("i1")}
    catalog.apply([ItemUpdate("later", 11, title="later", vector=fakes.text_vectors(["later"])[0])], 11)
    assert excluded_items(catalog, cached, FilterSpec(exclude_seen=True)) == {catalog.iid("i1"),
                                                                            catalog.iid("later")}


def test_default_exclusion_policies():
    assert default_exclusions("seen") == FilterSpec(exclude_purchased=True, exclude_seen=True)
    assert default_exclusions("purchased") == FilterSpec(exclude_purchased=True, exclude_seen=False)
    assert default_exclusions("none") == FilterSpec(exclude_purchased=False, exclude_seen=False)
    with pytest.raises(ValueError):
        default_exclusions("all")


def test_session_validation_names_the_field():
    view, search = common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_SEARCH
    assert check_session([SessionEvent("a", view)])
    for events, field in (([SessionEvent("", view)], "session[0].item_id"),
                          ([SessionEvent("a", view), SessionEvent("b", search)], "session[1].type"),
                          ([SessionEvent("a", 0)], "session[0].type"),
                          ([SessionEvent("x" * 129, view)], "session[0].item_id"),
                          ([SessionEvent("a", view, 4e9)], "session[0].timestamp"),
                          ([SessionEvent("a", view)] * 201, "session")):
        with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
            check_session(events)


def test_session_follows_the_stored_history():
    purchase = common_pb2.EVENT_TYPE_PURCHASE
    base = UserHistory(("a",), (1,), (5.0,), 10, seen_item_ids=("old", "a"))
    merged = session_history([SessionEvent("b", purchase, 6.0)], base)
    assert merged.item_ids == ("a", "b") and merged.event_types == (1, 4)
    assert merged.seen_item_ids == ("old", "a", "b") and merged.purchased_item_ids == ("b",)
    anonymous = with_session(None, [SessionEvent("c", common_pb2.EVENT_TYPE_CLICK)], 77)
    assert anonymous.history.item_ids == ("c",) and anonymous.history.data_lsn == 77
