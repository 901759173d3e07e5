"""One ranker replica's core, assembled: what the gRPC edge calls and what Status reports."""
from __future__ import annotations

from dataclasses import dataclass, field

from services.feedback.variant_outcomes import VARIANT_OUTCOMES_FIELD, VariantOutcomes

from services.ranker.catalog import Catalog
from services.ranker.new_item_stats import NewItemStats
from services.ranker.recommend import Recommender
from services.ranker.routing import ServingState
from services.ranker.search import Searcher
from services.ranker.vector_index import VectorIndex


@dataclass
class RankerReplica:
    replica_id: str
    catalog: Catalog
    state: ServingState
    recommender: Recommender
    searcher: Searcher
    address: str = ""
    # requests and server-side failures per (version, variant): the canary decider's error rates
    outcomes: VariantOutcomes = field(default_factory=VariantOutcomes)
    new_item_stats: NewItemStats | None = None

    def live_index(self) -> VectorIndex:
        """The index Recommend retrieves from: the current model's, else the text index."""
        current = self.state.current
        return current.index if current is not None else self.catalog.text_index

    def status(self) -> dict:
        routing = self.state.routing
        index = self.live_index()
        return {
            "replica_id": self.replica_id,
            "address": self.address,
            "model_version": routing.current.version if routing.current else 0,
            "model_sha256": routing.current.sha256 if routing.current else "",
            "data_lsn": self.catalog.watermark,
            "index_size": index.size,
            "index_kind": index.kind,
            "index_checksum": index.checksum(self.catalog.name_of),
            "text_index_size": self.catalog.text_index.size,
            "text_index_kind": self.catalog.text_index.kind,
            "rebuilding": index.rebuilding or self.catalog.text_index.rebuilding,
            # apart: a swap is complete once its model index is built, whatever the text index does
            "index_rebuilding": index.rebuilding,
            "text_index_rebuilding": self.catalog.text_index.rebuilding,
            "canary_version": routing.canary.version if routing.canary else 0,
            "canary_share": routing.canary_share,
            "refused_version": self.state.refused_version,
            "refused_reason": self.state.refused_reason,
            "swaps": self.state.swaps,
            "user_cache": self.recommender.path.users.status(),
            "new_items": self._new_items(routing),
            VARIANT_OUTCOMES_FIELD: self.outcomes.snapshot(),
        }

    def _new_items(self, routing) -> dict:
        """The new-item places (services/model/new_items.py): how many, how many candidates the
        current model has now, and whether their popularity is being read."""
        candidates = routing.current.new_items_with_traction()[0].size if routing.current else 0
        return {"slots": self.recommender.new_item_slots, "candidates": int(candidates),
                **(self.new_item_stats.status() if self.new_item_stats is not None else {})}
