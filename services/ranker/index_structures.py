"""The two faiss structures a `VectorIndex` retrieves with, and the options that choose and tune them.

- `flat` (`FlatStructure`): IndexIDMap over IndexFlatIP. Exact; add is an append, remove/update
  compact the arrays (O(n) per batch). Best for small catalogs (see the crossover measured by
  bench/ranker.py).
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


@dataclass(frozen=True)
class IndexOptions:
    kind: str = "auto"
    hnsw_min_items: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    # Rebuild an HNSW structure once dead rows exceed this share of live ones (and min_dead).
    rebuild_dead_fraction: float = 0.25
    rebuild_min_dead: int = 512
    # False: rebuilds run inline (tests, benchmarks that want a settled index).
    background: bool = True

    def initial_kind(self, size: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "hnsw" if size >= self.hnsw_min_items else "flat"


class FlatStructure:
    kind = "flat"

    def __init__(self, dim: int, options: IndexOptions) -> None:
        self.index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        self.dead = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray, replaced: np.ndarray) -> None:
        if replaced.size:
            self.index.remove_ids(replaced)
        if ids.size:
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

    def __init__(self, dim: int, options: IndexOptions) -> None:
        self.index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = options.hnsw_ef_construction
        self.ef_search = options.hnsw_ef_search
        self.row_ids = np.zeros(0, np.int64)        # row -> item id
        self.live = np.zeros(0, np.uint8)           # bitmap over rows, 1 = live
        self.row_of: dict[int, int] = {}            # item id -> its live row
        self.dead = 0

    def _grow(self, rows: int) -> None:
        if rows > self.row_ids.shape[0]:
            capacity = max(rows, 2 * self.row_ids.shape[0], 1024)
            extra = np.full(capacity - self.row_ids.shape[0], -1, np.int64)
            self.row_ids = np.concatenate([self.row_ids, extra])
        need = (rows + 7) // 8
        if need > self.live.shape[0]:
            capacity = max(need, 2 * self.live.shape[0], 128)
            self.live = np.concatenate([self.live, np.zeros(capacity - self.live.shape[0], np.uint8)])

    def _kill(self, item_id: int) -> None:
        row = self.row_of.pop(int(item_id), None)
        if row is not None:
            self.live[row >> 3] &= np.uint8(~(1 << (row & 7)) & 0xFF)
            self.dead += 1

    def add(self, ids: np.ndarray, vectors: np.ndarray, replaced: np.ndarray) -> None:
        for item_id in replaced:
            self._kill(item_id)
        if not ids.size:
            return
        start = self.index.ntotal
        self._grow(start + ids.size)
        self.index.add(vectors)
        for offset, item_id in enumerate(ids):
            row = start + offset
            self.row_ids[row] = item_id
            self.live[row >> 3] |= np.uint8(1 << (row & 7))
            self.row_of[int(item_id)] = row

    def remove(self, ids: np.ndarray) -> None:
        for item_id in ids:
            self._kill(item_id)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        rows = self.index.ntotal
        if allowed is not None:
            wanted = [self.row_of[i] for i in allowed.tolist() if i in self.row_of]
            selector = faiss.IDSelectorBatch(np.asarray(wanted, np.int64))
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


STRUCTURES = {"flat": FlatStructure, "hnsw": HnswStructure}
