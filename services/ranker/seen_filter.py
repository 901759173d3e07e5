"""The items a user's filters exclude: the request's own list, and from the user's WHOLE history
(features' bounded seen/purchased sets, shipped with the user state) the seen or purchased ones.

"Seen" is every item the user interacted with (view, click, add_to_cart, purchase), which
includes the purchased ones. The sets come from features (`FEATURES_SEEN_ITEMS` distinct items per
user, exact for what they hold; beyond that the least recently touched drop out), completed by
the recent history (always covered) and, for a session, its items.

Resolving a few thousand item ids to the catalog's int ids costs about as much as the rest of a
request, so the resolved set is memoised in the cache entry (`CachedUser.exclusions`): a later
request of the same user only resolves the ids the catalog did not know yet (items that arrive
later are then excluded too).
"""
from __future__ import annotations

from services.contracts.event_types import EventType
from services.ranker.catalog import Catalog
from services.ranker.filters import FilterSpec
from services.ranker.user_cache import CachedUser

_PURCHASE = int(EventType.PURCHASE)


def _history_ids(cached: CachedUser, purchased_only: bool) -> list[str]:
    history = cached.history
    if purchased_only:
        recent = [item for item, event in zip(history.item_ids, history.event_types) if event == _PURCHASE]
        return list(history.purchased_item_ids) + recent
    return list(history.seen_item_ids) + list(history.item_ids)


def _resolved(catalog: Catalog, cached: CachedUser, purchased_only: bool) -> frozenset[int]:
    key = "purchased" if purchased_only else "seen"
    memo = cached.exclusions.get(key)
    if memo is None:
        ids = _history_ids(cached, purchased_only)
        resolved = {iid for iid in map(catalog.iid, ids) if iid is not None}
        unresolved = tuple(item for item in dict.fromkeys(ids) if catalog.iid(item) is None)
        memo = (frozenset(resolved), unresolved)
    elif memo[1]:
        now_known = {iid for iid in map(catalog.iid, memo[1]) if iid is not None}
        if now_known:
            memo = (memo[0] | now_known, tuple(item for item in memo[1] if catalog.iid(item) is None))
    cached.exclusions[key] = memo
    return memo[0]


def excluded_items(catalog: Catalog, cached: CachedUser | None, filters: FilterSpec) -> set[int]:
    """Catalog ids the answer must leave out."""
    excluded = catalog.known_iids(filters.exclude_item_ids)
    if cached is not None and (filters.exclude_seen or filters.exclude_purchased):
        excluded |= _resolved(catalog, cached, purchased_only=not filters.exclude_seen)
    return excluded
