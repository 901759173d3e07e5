"""Search: semantic retrieval over MiniLM item text vectors, blended with BM25 and exact title /
brand matches, personalised with the user's vector when a user is given.

score = semantic_weight * cosine(query, item text)
      + lexical_weight  * BM25 / best BM25 of the query
      + personal_weight * min-max normalised (user vector . item vector)   (with a user)
      + exact_title_boost if the query is the item's whole title
      + brand_boost       if the item's brand appears in the query

Candidates: the semantic top N, the BM25 top N, exact title matches and the brand's items (each
N = max(50, 4k)), filtered. An exact title therefore always reaches the top, with or without a
model, even for an item that arrived a second ago (its text vector and lexical entry come with
the item change, no model update needed).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from services.ranker import metrics
from services.ranker.answer import Answer, Scored
from services.ranker.arguments import check_id, check_k, check_query
from services.ranker.catalog import Catalog
from services.ranker.filters import NO_FILTERS, FilterSpec, make_acceptor
from services.ranker.lexical import normalize
from services.ranker.query_encoder import CachedEncoder
from services.ranker.request_path import RequestPath
from services.ranker.routing import ServingState
from services.ranker.user_cache import FeaturesUnavailable
from services.ranker.user_vector import user_vector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchWeights:
    semantic: float = 0.6
    lexical: float = 0.4
    personal: float = 0.15
    exact_title_boost: float = 1.0
    brand_boost: float = 0.2


class Searcher:
    def __init__(self, catalog: Catalog, state: ServingState, path: RequestPath, encoder: CachedEncoder, *,
                 weights: SearchWeights | None = None) -> None:
        self.catalog, self.state, self.path, self.encoder = catalog, state, path, encoder
        self.weights = weights or SearchWeights()

    def search(self, query: str, user_id: str = "", k: int = 10, filters: FilterSpec | None = None,
               min_data_lsn: int = 0, timeout_s: float | None = None) -> Answer:
        check_query(query)
        check_id("user_id", user_id, required=False)
        k = check_k(k)
        filters = filters if filters is not None else NO_FILTERS
        with self.path.admitted(min_data_lsn, timeout_s) as time_left:
            bundle, variant = self.state.route(user_id)
            version = bundle.version if bundle is not None else 0
            data_lsn = self.catalog.watermark
            excluded = self.catalog.known_iids(filters.exclude_item_ids)
            user, degraded = None, False
            if user_id and bundle is not None:
                cached = self.path.user(user_id, min_data_lsn, time_left)
                data_lsn, consistent = self.path.data_lsn(data_lsn, cached, min_data_lsn, time_left)
                degraded = cached.degraded or not consistent
                if cached is not None:
                    state = user_vector(self.catalog, bundle, cached)
                    if state is not None:
                        user = state.vector
            items = self._rank(query, k, filters, excluded, bundle if user is not None else None, user)
            return Answer(items, version, data_lsn, variant, degraded=degraded)

    def _rank(self, query: str, k: int, filters: FilterSpec, excluded: set[int], bundle,
              user) -> list[Scored]:
        catalog, weights = self.catalog, self.weights
        accept = make_acceptor(catalog, filters, excluded)
        pool = max(50, 4 * k)
        try:
            vector = self.encoder.encode_one(query)
        except FeaturesUnavailable:
            # No query embedding (features unreachable): lexical and exact matches still answer.
            metrics.DEGRADED.inc()
            vector = None
        text_index = catalog.text_index
        semantic = np.zeros(0, np.int64)
        if vector is not None and text_index.size:
            # A direct faiss call (see retrieval.py: the batcher's handoff cost more GIL time than
            # the shared scan saved; 8 queries in one call cost ~the same per query here).
            _, ids = text_index.search(vector, pool)
            semantic = ids[0][ids[0] >= 0]
        found = catalog.lexical.search(query, pool)
        lexical_ids = np.fromiter((doc for doc, _ in found), np.int64, len(found))
        lexical_scores = np.fromiter((score for _, score in found), np.float64, len(found))
        exact = np.asarray(catalog.lexical.exact_title(query), np.int64)
        brands = np.asarray(catalog.lexical.brands_in(query, limit=pool), np.int64)
        # Sorted, distinct; the filters and "has a text vector" tested for all at once.
        candidates = np.unique(np.concatenate([semantic, lexical_ids, exact, brands]))
        keep = text_index.contains_many(candidates)
        if filters.restricts_items:
            keep &= np.fromiter((accept(int(i)) for i in candidates), bool, candidates.shape[0])
        else:
            keep &= catalog.active_mask(candidates)
            if excluded:
                keep &= ~np.isin(candidates, np.fromiter(excluded, np.int64, len(excluded)))
        candidates = candidates[keep]
        if not candidates.size:
            return []
        sem = (text_index.score(vector, candidates) if vector is not None
               else np.zeros(candidates.shape[0], np.float32))
        best_lexical = float(lexical_scores.max()) if found else 0.0
        best_lexical = best_lexical or 1.0
        lex64 = np.zeros(candidates.shape[0], np.float64)
        if found:
            positions = np.searchsorted(candidates, lexical_ids)
            hit = positions < candidates.shape[0]
            hit[hit] = candidates[positions[hit]] == lexical_ids[hit]
            lex64[positions[hit]] = lexical_scores[hit]
        lex = lex64.astype(np.float32) / best_lexical
        total = weights.semantic * sem + weights.lexical * lex
        is_exact = np.isin(candidates, exact)
        is_brand = np.isin(candidates, brands)
        total += weights.exact_title_boost * is_exact + weights.brand_boost * is_brand
        personal = None
        if bundle is not None and user is not None:
            known = bundle.index.contains_many(candidates)
            raw = np.zeros(candidates.shape[0], np.float32)
            if known.any():
                raw[known] = bundle.index.score(user, candidates[known])
                low, high = raw[known].min(), raw[known].max()
                personal = np.where(known, (raw - low) / (high - low) if high > low else 0.5, 0.0)
                total += weights.personal * personal
        order = np.argsort(-total, kind="stable")[:k]
        normalized_query = normalize(query)
        items = []
        for position in order:
            iid = int(candidates[position])
            meta = catalog.meta(iid)
            if is_exact[position]:
                reason = "exact title match"
            elif is_brand[position]:
                reason = f"from the brand {meta.brand}" if meta.brand else "matches the brand"
            elif personal is not None and personal[position] > 0.75:
                reason = f"matches \"{normalized_query[:40]}\" and your taste"
            elif lex[position] > 0.5:
                reason = f"matches \"{normalized_query[:40]}\""
            else:
                reason = f"related to \"{normalized_query[:40]}\""
            items.append(Scored(meta.item_id, float(total[position]), reason, meta.title))
        return items
