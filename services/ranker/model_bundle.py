"""One model version ready to answer.

A `ModelBundle` is named by a `ModelPointer` (the etcd value, services/contracts/model_pointer.py)
and holds the torch model (user tower), its item vectors for every active catalog item in a live
`VectorIndex`, and the artifact's popular list. It is built in the background from a catalog
snapshot, then attached to the catalog (which replays what changed meanwhile and from then on
hands it every item change), and only then made visible by the routing (`routing.py`).

Item vectors are computed in float64 and rounded to multiples of 2^-16 (exact in float32), so an
item's vector has the same bits whether it was computed in the bulk build or alone when it arrived
live (BLAS results depend on a row's position in a batch by a few float32 ulps; a float64 error
moves a value across a 2^-16 rounding boundary with probability ~1e-10): replicas that saw the
same changes in different batches agree on the index checksum. The rounding (< 1e-5) does not
change rankings in any measurable way.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from services.contracts.model_pointer import ModelPointer
from services.model.artifact import ArtifactInvalid, ModelArtifact
from services.model.network import DeltaRecModel, id_less_popularity_prior
from services.model.new_items import new_item_candidates
from services.ranker.catalog import Catalog
from services.ranker.index_structures import IndexOptions
from services.ranker.numpy_tower import serving_tower
from services.ranker.vector_index import VectorIndex

log = logging.getLogger(__name__)

VECTOR_BLOCK = 4096
VECTOR_GRID = 2.0 ** 16


class ModelBundle:
    def __init__(self, artifact: ModelArtifact, spec: ModelPointer, model: DeltaRecModel, catalog: Catalog,
                 index_options: IndexOptions | None = None) -> None:
        config = model.config
        if config.text_dim != catalog.text_dim:
            raise ArtifactInvalid(f"model text_dim {config.text_dim} != catalog text vectors "
                                  f"{catalog.text_dim}")
        self.spec = spec
        self.version = artifact.version
        self.sha256 = spec.sha256
        self.data_lsn = artifact.data_lsn
        self.model = model
        self.catalog = catalog
        self.dim = config.dim
        self.max_len = config.max_len
        self.model_index = {item_id: position + 1 for position, item_id in enumerate(artifact.item_ids)}
        # Indexed items without a learned id row (new since training or absent from its data):
        # served with the model's popularity prior on top of their text score (retrieval.py).
        self.id_less_popularity_weight = float(config.id_less_popularity_weight)
        self.id_less_popularity_scale = float(config.id_less_popularity_scale)
        # ... and the order of those with traction in the answer's reserved places (new_items.py).
        self.new_item_popularity_weight = float(config.new_item_popularity_weight)
        self.new_item_popularity_scale = float(config.new_item_popularity_scale)
        self._id_less_changes = 0
        self._traction: tuple[tuple[int, int], np.ndarray, np.ndarray] = (
            (-1, -1), np.zeros(0, np.int64), np.zeros(0, np.float64))
        self.id_less_iids: set[int] = set()
        self.popular_item_ids = list(artifact.popular_item_ids)
        # The item tower as plain arrays: text projection + learned id row (0 = text only).
        with torch.inference_mode():
            self._weight = np.ascontiguousarray(model.text_projection.weight.detach().numpy().T, np.float64)
            self._bias = model.text_projection.bias.detach().numpy().astype(np.float64)
            self._id_rows = model.item_id_embedding.weight.detach().numpy()   # float32, cast per block
        for name, array in (("text_projection", self._weight), ("item_id_embedding", self._id_rows)):
            if not np.isfinite(array).all():
                raise ArtifactInvalid(f"{name} has non-finite weights")
        for name, parameter in model.named_parameters():
            if not torch.isfinite(parameter).all():
                raise ArtifactInvalid(f"parameter {name} has non-finite values")
        self.index = VectorIndex(self.dim, index_options)
        # The numpy serving kernel when it reproduces this model (checked here), else torch.
        self.tower = serving_tower(model)

    # ------------------------------------------------------------------ item side
    def compute_vectors(self, item_ids: list[str], text_vectors: np.ndarray) -> np.ndarray:
        """Item tower output [n, dim] for items and their MiniLM vectors [n, 384] (see the module
        docstring for the float64 + grid rounding)."""
        count = len(item_ids)
        out = np.empty((count, self.dim), np.float32)
        rows = np.array([self.model_index.get(item_id, 0) for item_id in item_ids], np.int64)
        for start in range(0, count, VECTOR_BLOCK):
            stop = min(start + VECTOR_BLOCK, count)
            block = np.asarray(text_vectors[start:stop], np.float64) @ self._weight
            block += self._bias
            block += self._id_rows[rows[start:stop]]
            block *= VECTOR_GRID
            np.rint(block, out=block)
            block /= VECTOR_GRID
            out[start:stop] = block
        return out

    def build_index(self, reuse_graph_of: "ModelBundle | None" = None) -> None:
        """Fills the index from a catalog snapshot and attaches to the catalog (which replays
        the changes made during the build). Runs in the loader thread, never on a request.
        `reuse_graph_of`: the version served now, whose HNSW graph this one's index takes with
        its own vectors when that keeps the recall (VectorIndex.reuse_graph: an incremental
        update moves the vectors little), instead of building one."""
        iids, item_ids, text_vectors, seq = self.catalog.snapshot()
        vectors = self.compute_vectors(item_ids, text_vectors)
        if vectors.size and not np.isfinite(vectors).all():
            raise ArtifactInvalid("item tower produced non-finite vectors")
        # One structure build from the whole set (flat inline; HNSW in the background, an
        # exact scan of the vectors answering until it is in), not a flat copy first.
        self.index.begin_bulk_load()
        self.index.upsert(iids, vectors)
        del vectors
        parent = reuse_graph_of.index if reuse_graph_of is not None and reuse_graph_of.dim == self.dim else None
        self.index.end_bulk_load(reuse_graph_of=parent)
        self._note_id_less(iids, item_ids)
        self.catalog.attach(self, seq)

    def _note_id_less(self, iids: np.ndarray, item_ids: list[str]) -> None:
        for iid, item_id in zip(np.asarray(iids).tolist(), item_ids):
            if self.model_index.get(item_id, 0):
                self.id_less_iids.discard(iid)
            else:
                self.id_less_iids.add(iid)
        self._id_less_changes += 1          # after the change: a reader's key never runs ahead of it

    def new_items_with_traction(self) -> tuple[np.ndarray, np.ndarray]:
        """The candidates of an answer's new-item places (services/model/new_items.py,
        new_item_candidates: the most popular id-less items with traction) and each one's
        popularity term of the model's order. Made again only when the id-less set or any
        popularity changed since (the item feed, new_item_stats.py), not per request."""
        key = (self.catalog.popularity_changes, self._id_less_changes)
        made, candidates, priors = self._traction
        if made == key:
            return candidates, priors
        ids = np.asarray(list(self.id_less_iids), np.int64)   # list(set): one step against the feed thread
        candidates = new_item_candidates(ids, self.catalog.popularity_of(ids))
        priors = id_less_popularity_prior(self.catalog.popularity_of(candidates), np.ones(candidates.size, bool),
                                          self.new_item_popularity_weight, self.new_item_popularity_scale)
        self._traction = (key, candidates, priors)
        return candidates, priors

    def items_upserted(self, iids: np.ndarray, item_ids: list[str], text_vectors: np.ndarray) -> None:
        self.index.upsert(iids, self.compute_vectors(item_ids, text_vectors))
        self._note_id_less(iids, item_ids)

    def items_removed(self, iids: np.ndarray) -> None:
        self.index.remove(iids)
        self.id_less_iids.difference_update(np.asarray(iids).tolist())
        self._id_less_changes += 1

    def detach(self) -> None:
        self.catalog.detach(self)

    def history_vectors(self, iids: np.ndarray) -> np.ndarray:
        """Vectors of history items, also of items no longer active (computed on the fly when
        this bundle never indexed them)."""
        known = self.index.has_vectors(iids)
        if known.all():
            return self.index.vectors_of(iids)
        out = np.empty((iids.shape[0], self.dim), np.float32)
        if known.any():
            out[known] = self.index.vectors_of(iids[known])
        missing = iids[~known]
        out[~known] = self.compute_vectors([self.catalog.name_of(int(i)) for i in missing],
                                           self.catalog.text_index.vectors_of(missing))
        return out

    def artifact_agreement(self, artifact: ModelArtifact, sample: int = 256) -> float | None:
        """Share of a sample of the artifact's items whose vector we reproduce (cosine > 0.99)
        from the live catalog text; informative only (the text may have changed since)."""
        pairs = [(row, self.catalog.iid(item_id))
                 for row, item_id in enumerate(artifact.item_vector_ids[:sample])]
        pairs = [(row, iid) for row, iid in pairs if iid is not None and self.index.has_vector(iid)]
        if not pairs:
            return None
        ours = self.index.vectors_of([iid for _, iid in pairs])
        theirs = artifact.item_vectors[[row for row, _ in pairs]]
        norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1) + 1e-9
        cosine = (ours * theirs).sum(1) / norms
        return float((cosine > 0.99).mean())

    # ------------------------------------------------------------------ user side
    def user_vector(self, history_iids: np.ndarray, event_types: np.ndarray,
                    ages_s: np.ndarray) -> np.ndarray:
        """User tower for one user: history (oldest first, at most max_len) -> [dim] float32."""
        if not history_iids.size:
            return self.model.empty_history_vector.detach().numpy().astype(np.float32)
        vectors = self.history_vectors(history_iids)
        if self.tower is not None:
            return self.tower(vectors, event_types, ages_s)
        length = history_iids.shape[0]
        with torch.inference_mode():
            user = self.model.user_vector(
                torch.ones((1, length), dtype=torch.long),   # only marks "not padding": vectors are given
                torch.from_numpy(np.ascontiguousarray(event_types, np.int64)).view(1, length),
                torch.from_numpy(np.ascontiguousarray(ages_s, np.float32)).view(1, length),
                history_item_vectors=torch.from_numpy(vectors).view(1, length, self.dim))
            return user[0].numpy()

    def warm_up(self) -> None:
        """First calls allocate and pick kernels; do them here, not on a request."""
        iids = self.index.ids()[: self.max_len]
        if not iids.size:
            probe = self.model.empty_history_vector.detach().numpy()
        else:
            for length in sorted({1, min(8, iids.size), iids.size}):
                probe = self.user_vector(iids[-length:], np.full(length, 4, np.int64),
                                         np.arange(length, 0, -1, dtype=np.float32) * 3600.0)
                if not np.isfinite(probe).all():
                    raise ArtifactInvalid("user tower produced non-finite output")
        self.index.search(np.asarray(probe, np.float32).reshape(1, -1), 10)
