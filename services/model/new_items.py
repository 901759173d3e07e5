"""New items in the answer: the reserved slots of items without a learned id.

An item created after the model was trained has no id row: it reaches the model through its text
alone, and its text score sits below the id-carrying items' for almost every user (bench/accuracy.py,
cold start: text-only Recall@10 0.018 on held-out items against popularity's 0.040), so a single
ranking never shows it, and an item that is never shown gathers no interactions for the next
model to learn from. So the last `slots` places of an answer's top k are reserved for such items
that already have *traction* (a positive popularity from the features service: someone
interacted with them since), ranked among themselves by their text score plus
`new_item_popularity_weight * log(1 + popularity / new_item_popularity_scale)`
(services/model/network.py, id_less_popularity_prior; the two settings are the model's,
chosen on validation). An answer without such candidates is the plain ranking.

The one rule here is what the ranker serves (services/ranker/retrieval.py, with_new_item_slots)
and what bench/accuracy.py scores (services/trainer/evaluation.py, ranks_with_new_item_slots).
"""
from __future__ import annotations

from typing import Hashable, Sequence, TypeVar

import numpy as np

# Places of the top k reserved for new items with traction. Measured on Beauty validation (5% of
# the items held out of training, README "Accuracy", cold start; without the candidate cap below):
# 1 place lifts held-out targets' Recall@10 0.018 -> 0.062 (popularity 0.040) for 3.5% of all
# targets' Recall@10; 2 places 0.097 for 7.6%. A ranker setting (RANKER_NEW_ITEM_SLOTS): how much of a page goes to new items is the
# shop's call.
DEFAULT_NEW_ITEM_SLOTS = 1

# Only the most popular new items with traction are candidates of the places: what a request
# scores is then a short array (in-process Recommend +420 us CPU with 512 candidates, +60-75 us
# with 128), and with the popularity term in the order the less popular ones rarely win a place
# (Beauty validation, held-out Recall@10: 0.0616 uncapped, 0.0587 at 128).
MAX_NEW_ITEM_CANDIDATES = 128

Item = TypeVar("Item", bound=Hashable)


def new_item_candidates(ids: np.ndarray, popularity: np.ndarray, limit: int = MAX_NEW_ITEM_CANDIDATES) -> np.ndarray:
    """Of items without a learned id (`ids`, their `popularity`), those with traction
    (popularity > 0), the `limit` most popular, most popular first (ties: smaller id first)."""
    ids, popularity = np.asarray(ids, np.int64), np.asarray(popularity, np.float64)
    traction = popularity > 0
    ids, popularity = ids[traction], popularity[traction]
    order = np.lexsort((ids, -popularity))[:limit]
    return ids[order]


def reserve_new_item_slots(ranked: Sequence[Item], new: Sequence[Item], k: int, slots: int) -> list[Item]:
    """The top `k` served. `ranked`: the plain ranking, best first (at least k when there are);
    `new`: new items with traction, best first by their own order. The best of `new` that are
    not in the first `k - slots` of `ranked`, up to `slots`, take the last places; the rest of the
    answer is `ranked` without them, in its order. No slot when `k <= slots` (a one-item answer
    stays the best item) or `slots <= 0`; fewer candidates than slots leave the places to `ranked`."""
    if slots <= 0 or k <= slots or not new:
        return list(ranked[:k])
    shown = set(ranked[:k - slots])
    placed: list[Item] = []
    for item in new:
        if len(placed) == slots:
            break
        if item not in shown and item not in placed:
            placed.append(item)
    chosen = set(placed)
    head = [item for item in ranked if item not in chosen][:k - len(placed)]
    return head + placed
