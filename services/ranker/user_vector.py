"""A user's vector under one model: the user tower over the history items this replica knows.

Recommend retrieves with it and Search personalises with it; it is computed once per cached
history and model (`CachedUser.vectors`), so repeated requests of a user within the cache's TTL
do not run the tower again.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from services.contracts.event_types import EVENT_KINDS, EventType
from services.ranker.catalog import Catalog
from services.ranker.model_bundle import ModelBundle
from services.ranker.user_cache import CachedUser, UserHistory

# The tower reads a history entry's kind as one of the item interactions; anything else as a view.
_ITEM_EVENTS = frozenset(int(kind.model_index) for kind in EVENT_KINDS if kind.has_item)


class UserVector(NamedTuple):
    vector: np.ndarray        # [dim] float32
    iids: np.ndarray          # the history items it was computed from (oldest first)
    event_types: np.ndarray   # their event types (model indexes)
    # every one of them had a vector in the bundle's index when this was computed: then their
    # vectors are the index's rows for good (an index keeps a vector once it had one), and a
    # request reads them without the per-item check of ModelBundle.history_vectors
    indexed: bool = False


def tower_input(catalog: Catalog, bundle: ModelBundle, history: UserHistory
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last max_len history items the replica knows, as (iids, event types, ages in s)."""
    now = time.time()
    iids, events, ages = [], [], []
    text_index = catalog.text_index
    for item_id, event, stamp in zip(history.item_ids, history.event_types, history.timestamps):
        iid = catalog.iid(item_id)
        if iid is None or not (bundle.index.has_vector(iid) or text_index.has_vector(iid)):
            continue
        iids.append(iid)
        events.append(event if event in _ITEM_EVENTS else int(EventType.VIEW))
        ages.append(max(now - stamp, 0.0))
    limit = bundle.max_len
    return (np.asarray(iids[-limit:], np.int64), np.asarray(events[-limit:], np.int64),
            np.asarray(ages[-limit:], np.float32))


def user_vector(catalog: Catalog, bundle: ModelBundle, cached: CachedUser) -> UserVector | None:
    """The user's vector for this bundle, memoised in the cache entry; None when no history item
    is usable."""
    state = cached.vectors.get(bundle.spec)
    if state is None:
        iids, events, ages = tower_input(catalog, bundle, cached.history)
        if not iids.size:
            return None
        state = UserVector(bundle.user_vector(iids, events, ages), iids, events,
                           bool(bundle.index.has_vectors(iids).all()))
        cached.vectors[bundle.spec] = state
    return state
