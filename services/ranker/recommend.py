"""Recommend and SimilarItems: the request logic, plain Python (the gRPC edge is server.py).

Recommend: route the user (current or canary), read the user's state from features (through the
stream-kept cache, user_cache.py; plus the current session's items, session.py), run the model's
user tower over the history's item vectors, retrieve from the bundle's item index with the
filters, and explain each item by the history item it is most similar to ("because you bought
X"). Seen/purchased exclusions cover the user's whole history (seen_filter.py); the default
policy is the deployment's (RANKER_DEFAULT_EXCLUDE). A user without usable history, or a replica
without a model, gets popular items (live popularity from features, else the model's popular
list) mixed with the newest items.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Iterator, Sequence

import numpy as np

from services.common.errors import InvalidArgument, NotFound
from services.contracts.event_types import EventType
from services.model.new_items import DEFAULT_NEW_ITEM_SLOTS
from services.ranker.answer import Answer, Scored
from services.ranker.arguments import check_id, check_k
from services.ranker.catalog import Catalog
from services.ranker.filters import FilterSpec, make_acceptor
from services.ranker.model_bundle import ModelBundle
from services.ranker.request_path import RequestPath
from services.ranker.retrieval import retrieve, with_id_less_prior, with_new_item_slots
from services.ranker.routing import ServingState
from services.ranker.seen_filter import excluded_items
from services.ranker.session import SessionEvent, check_session, with_session
from services.ranker.user_cache import CachedUser
from services.ranker.user_vector import user_vector

log = logging.getLogger(__name__)

_VERBS = {
    int(EventType.PURCHASE): "because you bought {}",
    int(EventType.ADD_TO_CART): "because you added {} to your cart",
    int(EventType.CLICK): "because you viewed {}",
    int(EventType.VIEW): "because you viewed {}",
}
_TITLE_CHARS = 80
# An item the model has no id for yet: new in the catalog, chosen for its likeness to this history item.
_NEW_ITEM_REASON = "new in the catalog, like {}"


def short(title: str) -> str:
    return title if len(title) <= _TITLE_CHARS else title[: _TITLE_CHARS - 1].rstrip() + "…"


class Recommender:
    def __init__(self, catalog: Catalog, state: ServingState, path: RequestPath, *,
                 fresh_share: float = 0.3, default_filters: FilterSpec | None = None,
                 new_item_slots: int = DEFAULT_NEW_ITEM_SLOTS) -> None:
        self.catalog, self.state, self.path = catalog, state, path
        self.fresh_share = fresh_share
        # The last places of a personal answer kept for new items with traction (RANKER_NEW_ITEM_SLOTS).
        self.new_item_slots = new_item_slots
        # The deployment's exclusion policy (RANKER_DEFAULT_EXCLUDE) for requests that leave it unset.
        self.default_filters = default_filters if default_filters is not None else FilterSpec()

    # ------------------------------------------------------------------ Recommend
    def recommend(self, user_id: str, k: int = 10, filters: FilterSpec | None = None, min_data_lsn: int = 0,
                  timeout_s: float | None = None, session: Sequence[SessionEvent] = ()) -> Answer:
        session = check_session(session)
        if not user_id and not session:
            raise InvalidArgument("user_id: required (or the items of the current session)")
        check_id("user_id", user_id, required=False)
        k = check_k(k)
        filters = filters if filters is not None else self.default_filters
        with self.path.admitted(min_data_lsn, timeout_s) as time_left:
            watermark = self.catalog.watermark
            bundle, variant = self.state.route(user_id)
            version = bundle.version if bundle is not None else 0
            cached = self.path.user(user_id, min_data_lsn, time_left) if user_id else None
            degraded = cached is not None and cached.degraded
            if session:
                cached = with_session(cached, session, watermark)
            data_lsn, consistent = self.path.data_lsn(watermark, cached, min_data_lsn, time_left)
            degraded = degraded or not consistent
            excluded = excluded_items(self.catalog, cached, filters)
            if bundle is not None and cached is not None:
                personal = self._personal(bundle, cached, k, filters, excluded)
                if personal:
                    return Answer(personal, version, data_lsn, variant, cold_start=False, degraded=degraded)
            items = self.cold_start(bundle, k, filters, excluded)
            return Answer(items, version, data_lsn, variant, cold_start=True, degraded=degraded)

    def _personal(self, bundle: ModelBundle, cached: CachedUser, k: int, filters: FilterSpec,
                  excluded: set[int]) -> list[Scored]:
        user = user_vector(self.catalog, bundle, cached)
        if user is None:
            return []
        iids, events = user.iids, user.event_types
        found = retrieve(self.catalog, bundle.index, user.vector, k, filters, excluded)
        found = with_id_less_prior(self.catalog, bundle.index, user.vector, k, filters, excluded, found,
                                   bundle.id_less_iids, bundle.id_less_popularity_weight,
                                   bundle.id_less_popularity_scale)
        if self.new_item_slots > 0:
            candidates, priors = bundle.new_items_with_traction()
            found = with_new_item_slots(self.catalog, bundle.index, user.vector, k, filters, excluded, found,
                                        candidates, priors, self.new_item_slots)
        if not found:
            return []
        history_vectors = bundle.index.vectors_of(iids) if user.indexed else bundle.history_vectors(iids)
        found_vectors = bundle.index.vectors_of([iid for iid, _ in found])
        closest = (found_vectors @ history_vectors.T).argmax(axis=1).tolist()
        # Only ids and titles are needed: read them, not a whole ItemMeta per item.
        name_of, title_of = self.catalog.name_of, self.catalog.title_of
        # One reason per anchor (several found items often share their closest history item).
        reasons: dict[int, str] = {}
        id_less = bundle.id_less_iids
        items = []
        for (iid, score), position in zip(found, closest):
            reason = reasons.get(position)
            if reason is None:
                anchor = int(iids[position])
                anchor_name = name_of(anchor)
                reason = (_VERBS.get(int(events[position]), "because you viewed {}").format(
                    short(title_of(anchor) or anchor_name)) if anchor_name else "picked for you")
                reasons[position] = reason
            if iid in id_less:   # new since the model's training (often in the reserved place)
                anchor = int(iids[position])
                reason = _NEW_ITEM_REASON.format(short(title_of(anchor) or name_of(anchor)))
            items.append(Scored(name_of(iid), score, reason, title_of(iid)))
        return items

    # ------------------------------------------------------------------ cold start
    def _popular(self, bundle: ModelBundle | None) -> Iterator[int]:
        """The model's popular list (interactions up to its training), then the popularity that
        came with item changes from features (it only moves when an item changes)."""
        if bundle is not None:
            for item_id in bundle.popular_item_ids:
                iid = self.catalog.iid(item_id)
                if iid is not None:
                    yield iid
        yield from (int(i) for i in self.catalog.popular)

    def cold_start(self, bundle: ModelBundle | None, k: int, filters: FilterSpec,
                   excluded: set[int]) -> list[Scored]:
        """Popular items with a share of the newest ones; never empty while any item qualifies."""
        accept = make_acceptor(self.catalog, filters, excluded)
        fresh_slots = int(math.floor(k * self.fresh_share)) if k > 1 else 0
        picked: list[tuple[int, str]] = []
        seen: set[int] = set()

        def take(source: Iterable[int], limit: int, reason: str) -> None:
            for iid in source:
                if len(picked) >= limit:
                    return
                if iid not in seen and accept(iid):
                    seen.add(iid)
                    picked.append((iid, reason))

        take(self._popular(bundle), k - fresh_slots, "popular right now")
        take((int(i) for i in self.catalog.fresh), k, "new in the catalog")
        take(self._popular(bundle), k, "popular right now")
        if len(picked) < k and filters.categories:
            take(sorted(self.catalog.in_categories(filters.categories, limit=10 * k) or ()), k,
                 "in your chosen category")
        items = []
        for rank, (iid, reason) in enumerate(picked):
            meta = self.catalog.meta(iid)
            items.append(Scored(meta.item_id, 1.0 / (rank + 1), reason, meta.title))
        return items

    # ------------------------------------------------------------------ SimilarItems
    def similar(self, item_id: str, k: int = 10, filters: FilterSpec | None = None,
                timeout_s: float | None = None) -> Answer:
        check_id("item_id", item_id)
        k = check_k(k)
        filters = filters if filters is not None else FilterSpec(exclude_purchased=False)
        iid = self.catalog.iid(item_id)
        if iid is None:
            raise NotFound(f"item {item_id!r} is not in the catalog")
        with self.path.admitted(0, timeout_s):
            watermark = self.catalog.watermark
            bundle = self.state.current
            if bundle is not None and bundle.index.has_vector(iid):
                index, version = bundle.index, bundle.version
            elif self.catalog.text_index.has_vector(iid):
                index, version = self.catalog.text_index, 0
            else:
                raise NotFound(f"item {item_id!r} has no vector yet")
            query = index.vectors_of([iid])[0]
            excluded = {iid} | self.catalog.known_iids(filters.exclude_item_ids)
            anchor = self.catalog.meta(iid)
            reason = f"similar to {short(anchor.title or anchor.item_id)}"
            name_of, title_of = self.catalog.name_of, self.catalog.title_of
            items = [Scored(name_of(found), score, reason, title_of(found))
                     for found, score in retrieve(self.catalog, index, query, k, filters, excluded)]
            return Answer(items, version, watermark)
