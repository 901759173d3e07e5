"""The two faiss structures a `VectorIndex` retrieves with, and the options that choose and tune them.

- `flat` (`FlatStructure`): IndexIDMap over a flat scan of every row; add is an append,
  remove/update compact the arrays (O(n) per batch). Best for small catalogs (see the crossover
  measured by bench/ranker.py). Its codes are float16 by default (`flat_codes`,
  RANKER_FLAT_CODES): a Recommend's scan reads half the bytes (12k x 64: 1.5 MB instead of 3.1;
  the 384-d text index of Search 9.3 MB instead of 18.6), and that memory traffic costs twice —
  the scan itself, and the rest of the request running on evicted caches (README "Serving").
  float16 scores are approximate, so the owning index re-ranks an over-fetched candidate list
  with its exact float32 vectors and proves the answer exact (VectorIndex._exact_top_k).
- `scan` (`ScanStructure`): no structure, an exact scan of the index's own vector store; what a
  large index answers from while its first HNSW structure is built after a bulk load.
- `hnsw` (`HnswStructure`): IndexHNSWFlat (inner product). Sub-linear search for large catalogs.
  HNSW cannot delete, so a removed or updated item's old row is cleared in a live-row bitmap that
  every search passes as an IDSelector (the search-time deletion filter); `dead` counts those
  rows so the index knows when to rebuild.

Neither structure is thread-safe for a search concurrent with an add: the index's lock guards them.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

KINDS = ("flat", "hnsw", "auto")
FLAT_CODES = ("float16", "float32")
FLOAT16_SAFE_MAX = 60_000.0        # float16's largest finite value is 65,504
# Background builds of a replica run one at a time, the lowest number first (vector_index.BuildGate):
# a model index (rebuilt on every swap, what Recommend waits for) before the text index (built
# once at start; Search answers by an exact scan meanwhile).
MODEL_BUILD_PRIORITY = 0
TEXT_BUILD_PRIORITY = 1


@dataclass(frozen=True)
class IndexOptions:
    kind: str = "auto"
    # Measured at dim 64 (bench/scale.py and bench/ranker.py, one query, k=30, load ~2): exact
    # flat search 643 us at 100k and 1.5 ms at 200k, HNSW 327 us / 0.37 ms but with recall@30
    # 0.925 / 0.883 and a build of 12.8 s / 31 s on every model swap (at load 4+, minutes). Below
    # 200k the exact index answers well inside the 25 ms p99 target and makes a swap a copy.
    hnsw_min_items: int = 200_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    # Rebuild an HNSW structure once dead rows exceed this share of live ones (and min_dead).
    rebuild_dead_fraction: float = 0.25
    rebuild_min_dead: int = 512
    # False: rebuilds run inline (tests, benchmarks that want a settled index).
    background: bool = True
    # faiss threads of a structure build (the build runs in a thread of its own; requests keep
    # RANKER_TORCH_THREADS): an HNSW build is most of a large replica's start and of its swaps.
    build_threads: int = 2
    # A swap's index takes the served version's HNSW graph with its own vectors when that keeps
    # the recall (VectorIndex.reuse_graph), instead of building one.
    reuse_graph: bool = True
    # Order among the replica's background builds (MODEL_BUILD_PRIORITY first).
    build_priority: int = MODEL_BUILD_PRIORITY
    # What a flat structure scans: float16 codes (re-ranked exactly) or the float32 vectors.
    flat_codes: str = "float16"

    def initial_kind(self, size: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "hnsw" if size >= self.hnsw_min_items else "flat"


class FlatStructure:
    kind = "flat"

    def __init__(self, dim: int, options: IndexOptions) -> None:
        if options.flat_codes not in FLAT_CODES:
            raise ValueError(f"flat codes {options.flat_codes!r} not in {FLAT_CODES}")
        # approximate: scores are of float16 codes; the owner re-ranks (VectorIndex._exact_top_k).
        self.approximate = options.flat_codes == "float16"
        inner = (faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                 if self.approximate else faiss.IndexFlatIP(dim))
        self.index = faiss.IndexIDMap(inner)
        self.dead = 0
        # The largest norm ever added (removals do not lower it): the error bound of the codes.
        self.max_norm = 0.0
        self.codes_exceeded = False

    def add(self, ids: np.ndarray, vectors: np.ndarray, replaced: np.ndarray) -> None:
        if replaced.size:
            self.index.remove_ids(replaced)
        if ids.size:
            if self.approximate:
                self.max_norm = max(self.max_norm, float(np.sqrt((vectors * vectors).sum(axis=1).max())))
                # Beyond float16's range a code is inf: no bound holds, the owner scans exactly.
                self.codes_exceeded |= bool(np.abs(vectors).max() > FLOAT16_SAFE_MAX)
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        if ids.size:
            self.index.remove_ids(ids)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None:
            return self.index.search(queries, k)
        params = faiss.SearchParameters()
        params.sel = faiss.IDSelectorBatch(allowed)
        return self.index.search(queries, k, params=params)

    @property
    def rows(self) -> int:
        return self.index.ntotal


class HnswStructure:
    kind = "hnsw"
    approximate = False      # its recall is below 1, but the scores it returns are exact

    def __init__(self, dim: int, options: IndexOptions) -> None:
        self.index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = options.hnsw_ef_construction
        self.ef_search = options.hnsw_ef_search
        # Arrays, not a dict and a per-row loop: at 1M items a dict item id -> row cost ~100 MB
        # and its filling a second per build.
        self.row_ids = np.zeros(0, np.int64)        # row -> item id
        self.live = np.zeros(0, np.uint8)           # bitmap over rows, 1 = live
        self.row_by_id = np.zeros(0, np.int64)      # item id -> its live row, -1 = none
        self.dead = 0

    @classmethod
    def from_graph(cls, dim: int, options: IndexOptions, index, row_ids: np.ndarray, row_by_id: np.ndarray,
                   ids: np.ndarray, store: np.ndarray) -> "HnswStructure":
        """A structure on `index`, a clone of another index's HNSW graph (`row_ids`: its row ->
        item id, `row_by_id`: its item id -> live row), whose rows are given the vectors `store`
        holds now for their items. An item's live row stays live when the item is among `ids`;
        every other row is dead, its vector the item's new one (zero when there is none), so a
        walk through it still moves in the new space; items of `ids` without a row are added."""
        structure = cls(dim, options)
        structure.index = index
        rows = int(row_ids.size)
        storage = faiss.downcast_index(index.storage)
        rows_view = faiss.rev_swig_ptr(storage.get_xb(), rows * dim).reshape(rows, dim)
        known = (row_ids >= 0) & (row_ids < store.shape[0])
        for start in range(0, rows, 65_536):                  # in place, no full-size temporary
            stop = min(start + 65_536, rows)
            part = np.where(known[start:stop], row_ids[start:stop], 0)
            block = store[part]
            block[~known[start:stop]] = 0.0
            rows_view[start:stop] = block
        top = int(max(ids.max() if ids.size else 0, row_ids.max() if rows else 0))
        structure._grow(rows, top)
        structure.row_ids[:rows] = row_ids
        inside = ids[ids < row_by_id.shape[0]]
        live_rows = row_by_id[inside]
        kept = live_rows >= 0
        inside, live_rows = inside[kept], live_rows[kept]
        structure.row_by_id[inside] = live_rows
        structure._set_live(live_rows, True)
        structure.dead = rows - int(live_rows.size)
        has_row = np.zeros(top + 1, bool)
        has_row[inside] = True
        new = ids[~has_row[ids]]
        if new.size:
            structure.add(new, store[new], np.zeros(0, np.int64))
        return structure

    def _grow(self, rows: int, max_id: int) -> None:
        if rows > self.row_ids.shape[0]:
            capacity = max(rows, 2 * self.row_ids.shape[0], 1024)
            extra = np.full(capacity - self.row_ids.shape[0], -1, np.int64)
            self.row_ids = np.concatenate([self.row_ids, extra])
        need = (rows + 7) // 8
        if need > self.live.shape[0]:
            capacity = max(need, 2 * self.live.shape[0], 128)
            self.live = np.concatenate([self.live, np.zeros(capacity - self.live.shape[0], np.uint8)])
        if max_id >= self.row_by_id.shape[0]:
            capacity = max(max_id + 1, 2 * self.row_by_id.shape[0], 1024)
            extra = np.full(capacity - self.row_by_id.shape[0], -1, np.int64)
            self.row_by_id = np.concatenate([self.row_by_id, extra])

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """The live rows of those of `item_ids` that have one."""
        item_ids = np.asarray(item_ids, np.int64)
        item_ids = item_ids[(item_ids >= 0) & (item_ids < self.row_by_id.shape[0])]
        rows = self.row_by_id[item_ids]
        return rows[rows >= 0]

    def _set_live(self, rows: np.ndarray, live: bool) -> None:
        cells = rows >> 3
        bits = np.left_shift(1, rows & 7).astype(np.uint8)
        if live:
            np.bitwise_or.at(self.live, cells, bits)
        else:
            np.bitwise_and.at(self.live, cells, ~bits)

    def _kill(self, item_ids: np.ndarray) -> None:
        rows = self.rows_of(item_ids)
        if rows.size:
            rows = np.unique(rows)
            self._set_live(rows, False)
            self.row_by_id[self.row_ids[rows]] = -1
            self.dead += int(rows.size)

    def add(self, ids: np.ndarray, vectors: np.ndarray, replaced: np.ndarray) -> None:
        if replaced.size:
            self._kill(replaced)
        if not ids.size:
            return
        start = self.index.ntotal
        self._grow(start + ids.size, int(ids.max()))
        self.index.add(np.ascontiguousarray(vectors, np.float32))
        rows = np.arange(start, start + ids.size)
        self.row_ids[rows] = ids
        self._set_live(rows, True)
        self.row_by_id[ids] = rows

    def remove(self, ids: np.ndarray) -> None:
        if ids.size:
            self._kill(ids)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        rows = self.index.ntotal
        if allowed is not None:
            selector = faiss.IDSelectorBatch(self.rows_of(allowed))
            params.sel = selector
        elif self.dead:
            selector = faiss.IDSelectorBitmap(rows, faiss.swig_ptr(self.live))
            params.sel = selector
        distances, found = self.index.search(queries, k, params=params)
        ids = np.where(found >= 0, self.row_ids[np.maximum(found, 0)], -1)
        return distances, ids

    @property
    def rows(self) -> int:
        return self.index.ntotal


class ScanStructure:
    """No structure at all: an exact scan of the owning index's own vector store (the rows it
    marks present). What a large index searches while its first real structure is built from
    a bulk load (a flat copy of 1M 384-d vectors would be 1.5 GB more for those minutes)."""
    kind = "scan"
    approximate = False

    def __init__(self, dim: int, store) -> None:
        self.store = store      # () -> (vectors [capacity, dim], present [capacity]) of the owner
        self.dead = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray, replaced: np.ndarray) -> None:
        pass                    # the owner's store is what is searched

    def remove(self, ids: np.ndarray) -> None:
        pass

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        vectors, present = self.store()
        if allowed is not None:
            allowed = allowed[(allowed >= 0) & (allowed < present.shape[0])]
            candidates = allowed[present[allowed]]
        else:
            candidates = np.flatnonzero(present)
        out_scores = np.full((queries.shape[0], k), -np.inf, np.float32)
        out_ids = np.full((queries.shape[0], k), -1, np.int64)
        if not candidates.size:
            return out_scores, out_ids
        contiguous = candidates[-1] - candidates[0] + 1 == candidates.size
        base = vectors[candidates[0]:candidates[-1] + 1] if contiguous else vectors[candidates]
        scores = queries @ base.T                     # [b, candidates]
        take = min(k, candidates.size)
        for row in range(queries.shape[0]):
            top = np.argpartition(-scores[row], take - 1)[:take] if candidates.size > take else \
                np.arange(candidates.size)
            top = top[np.argsort(-scores[row, top], kind="stable")]
            out_scores[row, :take] = scores[row, top]
            out_ids[row, :take] = candidates[top]
        return out_scores, out_ids

    @property
    def rows(self) -> int:
        return 0


STRUCTURES = {"flat": FlatStructure, "hnsw": HnswStructure}
