"""The user-change feed behind WatchUsers and the whole-history seen set, without a database."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from services.common.errors import FailedPrecondition
from services.contracts.event_row import EventRow
from services.features.item_feed import LsnNotifier
from services.features.user_feed import UserChangeFeed
from services.features.user_state import UserState, apply_event, remember_item


class Store:
    """user_features as the feed reads it: (user id, updated_lsn) rows and the watermark."""

    def __init__(self) -> None:
        self.applied = 100
        self.users: dict[str, int] = {}

    def applied_lsn(self) -> int:
        return self.applied

    def read_user_changes(self, after, limit):
        """One statement: the page and the watermark of the same snapshot."""
        lsn, user = after
        rows = sorted((l, u) for u, l in self.users.items()
                      if l > lsn or (l == lsn and user is not None and u > user))
        return [(u, l) for l, u in rows[:limit]], self.applied


def take(pages, count):
    return [next(pages) for _ in range(count)]


def test_from_now_then_every_commit_with_or_without_users():
    store, notifier = Store(), LsnNotifier(100)
    pages = UserChangeFeed(store, notifier, poll_s=0.01).pages(0, 10, lambda: True)
    first = next(pages)
    assert first.changes == [] and first.watermark == 100          # from now: nothing to replay
    store.users.update({"a": 110, "b": 110})
    store.applied = 110
    assert next(pages).changes == [("a", 110), ("b", 110)]
    store.applied = 120                                             # a commit that changed no user
    bare = next(pages)
    assert bare.changes == [] and bare.watermark == 120
    store.users["a"] = 130                                          # a changed again: its latest LSN
    store.applied = 130
    assert next(pages).changes == [("a", 130)]


def test_resume_sends_what_changed_after_the_position_in_pages():
    store, notifier = Store(), LsnNotifier(100)
    store.users = {f"u{n}": 100 + n // 2 for n in range(7)}       # pairs of users per LSN
    store.applied = 110
    pages = UserChangeFeed(store, notifier, poll_s=0.01).pages(101, 2, lambda: True)
    sent, watermark = [], 101
    while watermark < 110:
        page = next(pages)
        assert page.watermark >= watermark
        watermark = page.watermark
        sent += page.changes
    assert sorted(sent) == sorted((u, l) for u, l in store.users.items() if l > 101)   # each once


def test_a_rebuilt_store_refuses_a_position_ahead_of_it():
    store = Store()
    with pytest.raises(FailedPrecondition):
        next(UserChangeFeed(store, LsnNotifier(100), poll_s=0.01).pages(500, 10, lambda: True))


def event(item: str, kind: str = "view", row: int = 1) -> EventRow:
    return EventRow(row_id=row, event_id=f"e{row}", event_type=kind, user_id="u", item_id=item, query=None,
                    occurred_at=datetime(2026, 1, 1, tzinfo=timezone.utc), attributes={})


def test_seen_set_covers_the_whole_history_and_is_bounded():
    state = UserState("u")
    apply_event(state, event("first", "purchase", 0), 10, history_length=50, recent_queries=5, seen_items=600)
    for n in range(500):
        apply_event(state, event(f"other-{n % 20}", row=n + 1), 11, history_length=50, recent_queries=5,
                    seen_items=600)
    assert "first" not in {entry.item_id for entry in state.history}   # out of the recent history
    assert state.seen["first"] is True and len(state.seen) == 21 and not state.seen_truncated
    assert UserState.seen_from_json(state.seen_to_json()) == state.seen
    small = UserState("v")
    for n in range(5):
        remember_item(small, f"i{n}", purchased=False, limit=3)
    remember_item(small, "i2", purchased=True, limit=3)               # touched again: most recent
    assert list(small.seen) == ["i3", "i4", "i2"] and small.seen["i2"] and small.seen_truncated
