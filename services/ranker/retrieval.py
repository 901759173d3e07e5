"""Filtered top-k retrieval from a vector index, shared by Recommend, Search and SimilarItems."""
from __future__ import annotations

import numpy as np

from services.ranker.catalog import Catalog
from services.ranker.filters import FilterSpec, make_acceptor
from services.model.network import id_less_popularity_prior
from services.model.new_items import reserve_new_item_slots
from services.ranker.vector_index import VectorIndex

# Candidate sets (e.g. one category) up to this size are scored exactly instead of searched.
CANDIDATE_SCAN_MAX = 4096
# Most rows one filtered retrieval asks of the index.
MAX_FETCH = 4096


def retrieve(catalog: Catalog, index: VectorIndex, query: np.ndarray, k: int, filters: FilterSpec,
             excluded: set[int]) -> list[tuple[int, float]]:
    """Top k (iid, score) by inner product that pass the filters.

    Over-fetches from the index and filters; a small category candidate set is scored exactly;
    a selective filter widens the fetch up to MAX_FETCH rows."""
    accept = make_acceptor(catalog, filters, excluded)
    size = index.size
    if not size:
        return []
    if filters.categories:
        candidates = catalog.in_categories(filters.categories, limit=CANDIDATE_SCAN_MAX)
        if candidates is not None:
            ids = np.fromiter((i for i in candidates if accept(i) and index.contains(i)), np.int64)
            if not ids.size:
                return []
            scores = index.score(query, ids)
            order = np.argsort(-scores, kind="stable")[:k]
            return [(int(ids[o]), float(scores[o])) for o in order]
    fetch = min(size, max(2 * k, k + len(excluded) + 8))
    query = np.asarray(query, np.float32).reshape(1, -1)
    while True:
        # A direct faiss call, not the search batcher: for the model's 64-d index the scan is
        # ~0.14 ms and runs without the GIL, while the batcher's handoff (queue, Event wake-up of
        # the other requests' threads) costs GIL time, which is what bounds a replica's req/s
        # (bench/ranker.py: README "Serving").
        scores, ids = index.search(query, fetch)
        if filters.restricts_items:
            found = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0 and accept(int(i))]
        else:   # only activity and exclusions: activity for the whole row at once, then a set test
            row = ids[0]
            found = [(i, s) for i, s, active in zip(row.tolist(), scores[0].tolist(), catalog.active_mask(row).tolist())
                     if active and i not in excluded]
        if len(found) >= k or fetch >= min(size, MAX_FETCH):
            return found[:k]
        fetch = min(size, MAX_FETCH, fetch * 4)


def with_id_less_prior(catalog: Catalog, index: VectorIndex, query: np.ndarray, k: int, filters: FilterSpec,
                       excluded: set[int], found: list[tuple[int, float]], id_less: set[int],
                       weight: float, scale: float = 1.0) -> list[tuple[int, float]]:
    """``found`` (the index's top k by inner product) re-ranked with the model's popularity prior
    for items without a learned id (services/model/network.py, id_less_popularity_prior): only
    those with a positive popularity change score, so they are scored exactly (at most
    CANDIDATE_SCAN_MAX, the most popular) and merged; every other item's index score is already
    its served score. bench/accuracy.py evaluates this score."""
    if weight <= 0 or not id_less:
        return found
    ids = np.asarray(list(id_less), np.int64)   # list(set) is one step: the feed thread may add to it
    popularity = catalog.popularity_of(ids)
    lifted = popularity > 0
    ids, popularity = ids[lifted], popularity[lifted]
    if not ids.size:
        return found
    if ids.size > CANDIDATE_SCAN_MAX:
        top = np.argpartition(-popularity, CANDIDATE_SCAN_MAX - 1)[:CANDIDATE_SCAN_MAX]
        ids, popularity = ids[top], popularity[top]
    accept = make_acceptor(catalog, filters, excluded)
    keep = np.fromiter((accept(int(i)) and index.contains(int(i)) for i in ids), bool, ids.size)
    ids, popularity = ids[keep], popularity[keep]
    if not ids.size:
        return found
    scores = index.score(np.asarray(query, np.float32).reshape(-1), ids)
    scores = scores + id_less_popularity_prior(popularity, np.ones(ids.size, bool), weight, scale)
    merged = {iid: score for iid, score in found}
    merged.update(zip(ids.tolist(), scores.tolist()))
    return sorted(merged.items(), key=lambda pair: -pair[1])[:k]


def with_new_item_slots(catalog: Catalog, index: VectorIndex, query: np.ndarray, k: int, filters: FilterSpec,
                        excluded: set[int], found: list[tuple[int, float]], candidates: np.ndarray,
                        priors: np.ndarray, slots: int) -> list[tuple[int, float]]:
    """``found`` (the top k) with its last ``slots`` places given to ``candidates`` (the most
    popular items without a learned id that have traction, ModelBundle.new_items_with_traction)
    that pass the filters, best first by inner product + ``priors`` (their popularity term of the
    model's order; services/model/new_items.py: the rule, which bench/accuracy.py scores). A slot's
    item keeps its inner product as its score: the place is the policy's, the score the model's."""
    if slots <= 0 or k <= slots or not candidates.size:
        return found
    keep = index.contains_many(candidates) & catalog.active_mask(candidates)
    if filters.restricts_items:
        accept = make_acceptor(catalog, filters, excluded)
        keep &= np.fromiter((accept(i) for i in candidates.tolist()), bool, candidates.size)
    elif excluded:
        keep &= np.fromiter((i not in excluded for i in candidates.tolist()), bool, candidates.size)
    ids = candidates[keep]
    if not ids.size:
        return found
    plain = index.score(np.asarray(query, np.float32).reshape(-1), ids)
    ordered = plain + priors[keep]
    best = np.argsort(-ordered, kind="stable")[:k]
    score_of = dict(found)
    score_of.update((int(ids[o]), float(plain[o])) for o in best)
    served = reserve_new_item_slots([iid for iid, _ in found], [int(ids[o]) for o in best], k, slots)
    return [(iid, score_of[iid]) for iid in served]
