"""Live vector index over faiss: add, update and remove items without a rebuild.

Items are addressed by small int ids (the catalog's slots). The index keeps its own dense copy of
every vector it was given (`vectors_of`, the checksum, rebuilds and SimilarItems read it) and a
faiss structure used for retrieval, of one of two kinds:

- `flat`: IndexIDMap over IndexFlatIP. Exact; add is an append, remove/update compact the arrays
  (O(n) per batch). Best for small catalogs (see the crossover measured by bench/ranker.py).
- `hnsw`: IndexHNSWFlat (inner product). Sub-linear search for large catalogs. HNSW cannot delete,
  so a removed or updated item's old row is cleared in a live-row bitmap that every search passes
  as an IDSelector (the search-time deletion filter), and once dead rows exceed a share of the
  live ones the structure is rebuilt in the background from the dense copy; changes made during
  the rebuild are replayed onto the new structure before one reference swap.

With kind `auto` the index starts flat and switches to HNSW (by the same background rebuild) when
it grows past `hnsw_min_items`, and back below 80 % of it.

Searches take a shared lock and mutations an exclusive one (faiss structures are safe for
concurrent searches, not for a search concurrent with an add).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "auto")


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Slot:
    __slots__ = ("query", "k", "event", "result", "error")

    def __init__(self, query: np.ndarray, k: int) -> None:
        self.query, self.k = query, k
        self.event = threading.Event()
        self.result: tuple[np.ndarray, np.ndarray] | None = None
        self.error: BaseException | None = None


class SearchBatcher:
    """Concurrent single-query searches combined into one faiss call.

    A flat search is bound by reading the vectors from memory (the index does not stay in the
    CPU caches between requests): 8 queries in one call cost about 1.6x one query instead of
    8x (bench/ranker.py). No thread and no timer: the first caller searches at once (no added
    latency when alone); callers arriving while a search runs queue up, and when it ends the
    first of them searches for all queued ones."""

    def __init__(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                 max_batch: int = 32) -> None:
        self._search, self.max_batch = search, max_batch
        self._lock = threading.Lock()
        self._pending: list[_Slot] = []
        self._busy = False
        self.batches = 0
        self.queries = 0

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        slot = _Slot(query, k)
        with self._lock:
            self._pending.append(slot)
            lead = not self._busy
            self._busy = True
        if not lead:
            slot.event.wait()
            if slot.result is None and slot.error is None:
                lead = True   # promoted: search for everyone queued, this slot included
        if lead:
            self._lead()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _lead(self) -> None:
        with self._lock:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
        try:
            k = max(s.k for s in batch)
            queries = np.stack([s.query for s in batch]) if len(batch) > 1 else batch[0].query[None, :]
            distances, ids = self._search(queries, k)
            for row, s in enumerate(batch):
                s.result = (distances[row:row + 1, : s.k], ids[row:row + 1, : s.k])
            self.batches += 1
            self.queries += len(batch)
        except BaseException as error:  # noqa: BLE001 - every waiter gets the failure
            for s in batch:
                s.error = error
        finally:
            with self._lock:
                successor = self._pending[0] if self._pending else None
                self._busy = successor is not None
            for s in batch:
                s.event.set()
            if successor is not None:
                successor.event.set()


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


class _Flat:
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


class _Hnsw:
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


_STRUCTURES = {"flat": _Flat, "hnsw": _Hnsw}


class VectorIndex:
    def __init__(self, dim: int, options: IndexOptions | None = None, *, kind: str | None = None) -> None:
        self.dim = dim
        self.options = options or IndexOptions()
        if self.options.kind not in KINDS:
            raise ValueError(f"index kind {self.options.kind!r} not in {KINDS}")
        self._lock = RWLock()
        self._vectors = np.zeros((0, dim), np.float32)  # dense copy by id (kept after removal)
        self._has = np.zeros(0, bool)                    # id has a vector in _vectors
        self._present = np.zeros(0, bool)                # id is searchable
        self._changed = np.zeros(0, np.int64)            # mutation sequence of the id's last change
        self._seq = 0
        self._count = 0
        self._structure = _STRUCTURES[kind or self.options.initial_kind(0)](dim, self.options)
        self._rebuilding = False
        # False while a bulk load streams in (one rebuild at the end instead of HNSW inserts).
        self.auto_rebuild = True
        self._checksum_cache: tuple[int, str] | None = None
        self.rebuilds = 0
        self._batcher = SearchBatcher(self._search_locked)

    # ------------------------------------------------------------------ state
    @property
    def kind(self) -> str:
        return self._structure.kind

    @property
    def size(self) -> int:
        return self._count

    @property
    def version(self) -> int:
        """Increases with every mutation (cache key for checksums)."""
        return self._seq

    @property
    def rebuilding(self) -> bool:
        return self._rebuilding

    @property
    def dead_rows(self) -> int:
        return self._structure.dead

    def __len__(self) -> int:
        return self._count

    def contains(self, item_id: int) -> bool:
        return 0 <= item_id < self._present.shape[0] and bool(self._present[item_id])

    def has_vector(self, item_id: int) -> bool:
        return 0 <= item_id < self._has.shape[0] and bool(self._has[item_id])

    def ids(self) -> np.ndarray:
        return np.flatnonzero(self._present[: self._present.shape[0]])

    def vectors_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Copies of the stored vectors (also for removed ids that once had one)."""
        ids = np.asarray(ids, np.int64)
        return self._vectors[ids]

    def vector_view(self) -> np.ndarray:
        """The dense store itself (read-only use; rows of ids without a vector are zero)."""
        return self._vectors

    def _grow(self, upto: int) -> None:
        if upto <= self._has.shape[0]:
            return
        capacity = max(upto, 2 * self._has.shape[0], 256)
        extra = capacity - self._has.shape[0]
        self._vectors = np.concatenate([self._vectors, np.zeros((extra, self.dim), np.float32)])
        self._has = np.concatenate([self._has, np.zeros(extra, bool)])
        self._present = np.concatenate([self._present, np.zeros(extra, bool)])
        self._changed = np.concatenate([self._changed, np.zeros(extra, np.int64)])

    # ------------------------------------------------------------------ mutations
    def upsert(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray) -> int:
        """Adds new ids and replaces the vectors of present ones; returns how many changed."""
        ids = np.asarray(ids, np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if ids.shape[0] != vectors.shape[0]:
            raise ValueError("ids and vectors differ in length")
        if not ids.size:
            return 0
        # The last occurrence of a repeated id wins.
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.size - 1 - last)
        ids, vectors = ids[keep], vectors[keep]
        with self._lock.write():
            self._grow(int(ids.max()) + 1)
            present = self._present[ids]
            unchanged = present & np.all(self._vectors[ids] == vectors, axis=1)
            ids, vectors, present = ids[~unchanged], vectors[~unchanged], present[~unchanged]
            if not ids.size:
                return 0
            self._structure.add(ids, vectors, ids[present])
            self._vectors[ids] = vectors
            self._has[ids] = True
            self._present[ids] = True
            self._count += int((~present).sum())
            self._seq += 1
            self._changed[ids] = self._seq
        self._maybe_rebuild()
        return int(ids.size)

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        ids = np.unique(np.asarray(ids, np.int64))
        ids = ids[(ids >= 0) & (ids < self._present.shape[0])]
        if not ids.size:
            return 0
        with self._lock.write():
            ids = ids[self._present[ids]]
            if not ids.size:
                return 0
            self._structure.remove(ids)
            self._present[ids] = False
            self._count -= int(ids.size)
            self._seq += 1
            self._changed[ids] = self._seq
        self._maybe_rebuild()
        return int(ids.size)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for each query row: (scores [b, k], ids [b, k]); -1 pads.
        `allowed`: only these ids (a small candidate set, e.g. one category)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(int(k), max(self._count, 1)))
        with self._lock.read():
            allowed = None if allowed is None else np.asarray(allowed, np.int64)
            return self._structure.search(queries, k, allowed)

    def _search_locked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock.read():
            return self._structure.search(queries, k, None)

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query, batched with the concurrent ones of other requests (see SearchBatcher)."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(self.dim)
        k = max(1, min(int(k), max(self._count, 1)))
        return self._batcher.search(query, k)

    def score(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact scores of one query against given ids (candidate-set scoring)."""
        return self._vectors[ids] @ np.asarray(query, np.float32).reshape(self.dim)

    # ------------------------------------------------------------------ checksum
    def checksum(self, name_of: Callable[[int], str]) -> str:
        """sha256 hex over the (item_id, vector) pairs of the searchable items, sorted by item_id:
        `item_id utf-8, NUL, dim float32 little-endian` per item."""
        cached = self._checksum_cache
        if cached is not None and cached[0] == self._seq:
            return cached[1]
        with self._lock.read():
            seq = self._seq
            ids = np.flatnonzero(self._present)
            vectors = self._vectors[ids].astype("<f4", copy=False)
        names = [name_of(int(i)) for i in ids]
        digest = hashlib.sha256()
        for position in sorted(range(len(names)), key=names.__getitem__):
            digest.update(names[position].encode() + b"\x00")
            digest.update(vectors[position].tobytes())
        value = digest.hexdigest()
        self._checksum_cache = (seq, value)
        return value

    # ------------------------------------------------------------------ rebuilds
    def _wanted_kind(self) -> str:
        if self.options.kind != "auto":
            return self.options.kind
        threshold = self.options.hnsw_min_items
        if self.kind == "flat" and self._count >= threshold:
            return "hnsw"
        if self.kind == "hnsw" and self._count < 0.8 * threshold:
            return "flat"
        return self.kind

    def needs_rebuild(self) -> bool:
        structure = self._structure
        if self._wanted_kind() != structure.kind:
            return True
        return (structure.dead >= self.options.rebuild_min_dead
                and structure.dead > self.options.rebuild_dead_fraction * max(self._count, 1))

    def maybe_rebuild(self) -> None:
        self._maybe_rebuild(force=True)

    def _maybe_rebuild(self, force: bool = False) -> None:
        if self._rebuilding or not (self.auto_rebuild or force) or not self.needs_rebuild():
            return
        self._rebuilding = True
        if self.options.background:
            threading.Thread(target=self.rebuild, name="index-rebuild", daemon=True).start()
        else:
            self.rebuild()

    def rebuild(self, kind: str | None = None) -> None:
        """A fresh structure from the dense copy, built without blocking searches or writes; the
        changes made meanwhile are replayed before the swap."""
        self._rebuilding = True
        try:
            kind = kind or self._wanted_kind()
            with self._lock.read():
                seq = self._seq
                ids = np.flatnonzero(self._present)
                vectors = self._vectors[ids]
            structure = _STRUCTURES[kind](self.dim, self.options)
            structure.add(ids, vectors, np.zeros(0, np.int64))
            with self._lock.write():
                changed = np.flatnonzero(self._changed > seq)
                if changed.size:
                    in_snapshot = np.isin(changed, ids)
                    live = changed[self._present[changed]]
                    gone = changed[~self._present[changed] & in_snapshot]
                    structure.remove(gone)
                    structure.add(live, self._vectors[live], live[np.isin(live, ids)])
                previous = self._structure
                self._structure = structure
                self.rebuilds += 1
            log.info("index rebuilt", extra={"kind": kind, "previous_kind": previous.kind,
                                             "items": self._count, "dead_rows_dropped": previous.dead})
        finally:
            self._rebuilding = False
