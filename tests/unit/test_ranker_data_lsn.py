"""An answer's `data_lsn` (issue 11, defect 2): the position the answer's data is known to include —
never newer than what any part of it has, never older than what it reflects for the user.

The parts: the replica's items (the catalog, which includes every item change up to its
watermark W), and the user's state (exact as of D, whose latest change is at U <= D). The rules,
checked here without servers: data_lsn = min(W, D), and the answer waits for the items to reach U
when the user's state was read fresher than them (else it is marked degraded); a user the answer
has no state for contributes 0; and the user-change feed never moves a receiver's position past a
change it has not announced, so a cached user is never claimed exact at a position past its own
next change.
"""
from __future__ import annotations

import threading
import time

import pytest

from services.ranker.read_your_writes import DataBehind
from services.ranker.user_cache import UserCache, UserHistory
from services.features.item_feed import LsnNotifier
from services.features.user_feed import UserChangeFeed
from tests.unit.test_ranker_requests import PURCHASE, VIEW, world  # noqa: F401 - the fixture


def bought(item: str, data_lsn: int, updated_lsn: int) -> UserHistory:
    now = time.time()
    return UserHistory(("i1", item), (VIEW, PURCHASE), (now - 60, now - 1), data_lsn, updated_lsn,
                       seen_item_ids=("i1", item), purchased_item_ids=(item,))


def advance_later(catalog, lsn: int, after_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after_s), catalog.apply([], watermark=lsn)))
    thread.start()
    return thread


def test_a_user_read_fresher_than_the_items_waits_for_them(world):  # noqa: F811
    # The items are at 1000; features answered the user at 1200 with a purchase at 1100 (the
    # item feed brings 1200 a moment later). The answer reflects the purchase: its data_lsn must
    # not be older than 1100, and may not be newer than what the items have when it is computed.
    world["histories"].users["u1"] = bought("i7", 1200, 1100)
    feeding = advance_later(world["catalog"], 1200, 0.05)
    answer = world["recommender"].recommend("u1", 10, timeout_s=5)
    feeding.join()
    assert "i7" not in {item.item_id for item in answer.items}          # the purchase is reflected
    assert 1100 <= answer.data_lsn <= 1200 and not answer.degraded

    world["histories"].users["u2"] = bought("i8", 1400, 1300)
    feeding = advance_later(world["catalog"], 1400, 0.05)
    found = world["searcher"].search("Rose", "u2", k=5, timeout_s=5)
    feeding.join()
    assert 1300 <= found.data_lsn <= 1400 and not found.degraded


def test_items_that_never_catch_up_give_a_degraded_answer_that_claims_only_what_it_has(world):  # noqa: F811
    world["histories"].users["u1"] = bought("i7", 1200, 1100)
    answer = world["recommender"].recommend("u1", 10, timeout_s=0.2)
    # No valid position exists (the user part is past the items): the answer keeps the safe
    # bound (what every part includes) and says it is not one consistent read.
    assert answer.data_lsn == 1000 and answer.degraded


def test_a_user_state_older_than_the_items_bounds_the_answer(world):  # noqa: F811
    world["catalog"].apply([], watermark=2000)
    world["histories"].users["u1"] = bought("i7", 1500, 1100)    # e.g. a degraded or slower read
    assert world["recommender"].recommend("u1", 10, timeout_s=5).data_lsn == 1500


def test_a_degraded_answer_without_any_user_state_claims_nothing(world):  # noqa: F811
    world["histories"].down = True
    answer = world["recommender"].recommend("never-cached", 5, timeout_s=1)
    assert answer.degraded and answer.cold_start
    assert answer.data_lsn == 0      # it has none of this user's writes, whatever W says


def test_a_user_read_older_than_min_data_lsn_is_not_answered(world):  # noqa: F811
    # The items reached 1500, but the user's state came back at 1200 (a feature store that went
    # back, a lagging replica): answering would silently miss the caller's own write.
    world["catalog"].apply([], watermark=1500)
    world["histories"].users["u1"] = bought("i7", 1200, 1100)
    with pytest.raises(DataBehind):
        world["recommender"].recommend("u1", 5, min_data_lsn=1500, timeout_s=0.2)


class RacingStore:
    """user_features as the feed reads it, one statement per page (rows and the watermark of the
    same snapshot); `between` runs once, after the round learned of a commit and before its read:
    the window in which a user can change again."""

    def __init__(self) -> None:
        self.applied = 100
        self.users: dict[str, int] = {}
        self.between = None

    def applied_lsn(self) -> int:
        return self.applied

    def read_user_changes(self, after, limit):
        if self.between is not None:
            hook, self.between = self.between, None
            hook()
        lsn, user = after
        rows = sorted((l, u) for u, l in self.users.items()
                      if l > lsn or (l == lsn and user is not None and u > user))
        return [(u, l) for l, u in rows[:limit]], self.applied


def test_a_user_changed_again_during_a_round_is_never_claimed_current():
    # A ranker cached u at 100. u changes at 110 (the round is woken for it) and again at 130
    # before the round reads: the page that moves the receiver past 110 must announce u.
    store, notifier = RacingStore(), LsnNotifier(100)
    cache = UserCache(source=None, ttl_s=0.0)
    cache.stream_started(100)
    cache._entries["u"] = cache_entry = _entry(100)          # noqa: SLF001 - the state under test
    pages = UserChangeFeed(store, notifier, poll_s=0.01).pages(100, 10, lambda: True)

    def changes_again():
        store.users["u"], store.applied = 130, 130
        notifier.publish(130)

    store.users["u"], store.applied = 110, 110
    store.between = changes_again
    notifier.publish(110)
    page = next(pages)
    cache.apply_changes(page.changes, page.watermark)
    if page.watermark >= 110:
        assert ("u", 130) in page.changes
    assert cache._entries.get("u") is not cache_entry       # noqa: SLF001 - dropped, not claimed at 110+


def _entry(lsn: int):
    from services.ranker.user_cache import CachedUser
    return CachedUser(UserHistory(("old",), (VIEW,), (0.0,), lsn, lsn), time.monotonic())
