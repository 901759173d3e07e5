"""Live vector index over faiss: add, update and remove items without a rebuild.

Items are addressed by small int ids (the catalog's slots). The index keeps its own dense copy of
every vector it was given (`vectors_of`, the checksum, rebuilds and SimilarItems read it) and a
faiss structure used for retrieval, flat or HNSW (`index_structures.py`). A removed or updated
item's old HNSW row is only marked dead; once dead rows exceed a share of the live ones the
structure is rebuilt in the background from the dense copy; changes made during the rebuild are
replayed onto the new structure before one reference swap.

With kind `auto` the index starts flat and switches to HNSW (by the same background rebuild) when
it grows past `hnsw_min_items`, and back below 80 % of it.

Background builds of all the indexes of a process take turns through one `BuildGate`, the most
urgent first (`IndexOptions.build_priority`: a model index before the text index), and a build
gives way between chunks when a more urgent one waits: on two cores, two HNSW builds at once
each took about as long as both in turn, so a swap waited for the text index's build too.

Searches take a shared lock and mutations an exclusive one (`RWLock`; faiss structures are safe
for concurrent searches, not for a search concurrent with an add). Each request calls faiss
itself: combining concurrent queries into one call cost more GIL time in thread handoffs than it
saved (README "Serving").
"""
from __future__ import annotations

import hashlib
import logging
import threading
from typing import Callable, Sequence

import numpy as np

import faiss

from services.ranker import metrics
from services.ranker.index_structures import KINDS, STRUCTURES, HnswStructure, IndexOptions, ScanStructure
from services.ranker.rwlock import RWLock

log = logging.getLogger(__name__)

# A rebuild copies the vectors it adds this many rows at a time (not all at once: at 1M 384-d
# items a full copy is 1.5 GB on top of the store and the structure being built); between chunks
# a background build gives way to a more urgent one (a 384-d HNSW chunk is seconds of CPU).
REBUILD_CHUNK = 16_384
# Changes made during a rebuild are replayed in rounds outside the write lock until at most this
# many are left; those are replayed under it (searches wait only for them).
REPLAY_UNDER_LOCK = 4096
# Graph reuse (VectorIndex.reuse_graph) is kept when its sampled recall is at most this much
# below the recall of the lineage's fresh build.
REUSE_RECALL_TOLERANCE = 0.02
SAMPLED_RECALL_K = 30
# A structure with float16 codes returns this many candidates beyond k, re-ranked with the exact
# float32 vectors; a row it left out could only belong to the top k if the codes' error bound
# (float16_score_error) allows it, which is checked per query (else: an exact scan).
RERANK_MARGIN = 16
SAMPLED_RECALL_QUERIES = 64


def sampled_recall(structure, store: np.ndarray, ids: np.ndarray, *, k: int = SAMPLED_RECALL_K,
                   queries: int = SAMPLED_RECALL_QUERIES, seed: int = 0) -> float:
    """Recall@k of `structure` against an exact scan of `store[ids]`, the queries being the
    vectors of a seeded sample of `ids` (items stand in for users: both live in the item space)."""
    if not ids.size:
        return 1.0
    k = min(k, int(ids.size))
    sample = np.random.default_rng(seed).choice(ids, size=min(queries, int(ids.size)), replace=False)
    query = np.ascontiguousarray(store[sample], np.float32)
    for start in range(0, ids.size, REBUILD_CHUNK * 4):       # bounded scratch memory
        part = ids[start:start + REBUILD_CHUNK * 4]
        scores = query @ store[part].T
        if start:
            scores = np.concatenate([best_scores, scores], axis=1)
            part = np.concatenate([best_ids, np.broadcast_to(part, (sample.size, part.size))], axis=1)
        else:
            part = np.broadcast_to(part, (sample.size, part.size))
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_ids = np.take_along_axis(part, top, axis=1)
    exact = best_ids
    _, found = structure.search(query, k, None)
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / float(sample.size * k)


def float16_score_error(dim: int, max_norm: float, query: np.ndarray) -> float:
    """An upper bound of |score of the float16 code - exact score| for any row of norm <= max_norm:
    each component is rounded by at most 2^-11 of itself (2^-25 absolute below float16's normal
    range), and both scores are float32 sums of `dim` products (at most dim * 2^-24 relative
    each); with 1% to spare."""
    query_norm = float(np.sqrt(query @ query))
    relative = 2.0 ** -11 + dim * 2.0 ** -23
    return 1.01 * (relative * max_norm * query_norm + 2.0 ** -25 * float(np.abs(query).sum()))


class BuildGate:
    """Lets one background structure build run at a time, the lowest `priority` first; a running
    build calls `checkpoint` between chunks and waits there while a more urgent one runs."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = False
        self._waiting: list[int] = []       # priorities of the builds waiting for their turn

    def acquire(self, priority: int) -> None:
        with self._cond:
            self._waiting.append(priority)
            try:
                while self._running or min(self._waiting) < priority:
                    self._cond.wait()
            finally:
                self._waiting.remove(priority)
            self._running = True

    def release(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()

    def more_urgent_waiting(self, priority: int) -> bool:
        with self._cond:
            return any(waiting < priority for waiting in self._waiting)

    def checkpoint(self, priority: int) -> bool:
        """Gives the turn to a more urgent waiting build and takes it back after; True if it did."""
        if not self.more_urgent_waiting(priority):
            return False
        self.release()
        self.acquire(priority)
        return True

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)


# The process's one gate: a replica's indexes (text, each model version's) share its cores.
BUILD_GATE = BuildGate()


class VectorIndex:
    def __init__(self, dim: int, options: IndexOptions | None = None, *, kind: str | None = None,
                 build_gate: BuildGate | None = None) -> None:
        self.dim = dim
        self._gate = build_gate or BUILD_GATE
        self._holds_gate = False
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
        self._structure = STRUCTURES[kind or self.options.initial_kind(0)](dim, self.options)
        self._rebuilding = False
        # False while a bulk load streams in (one rebuild at the end instead of HNSW inserts).
        self.auto_rebuild = True
        self._bulk_loading = False
        self._checksum_cache: tuple[int, str] | None = None
        self.rebuilds = 0
        self.graph_reuses = 0
        # Sampled recall@SAMPLED_RECALL_K of the HNSW graph searched now, and of the fresh build
        # it descends from (graph reuse is judged against the latter); None before an HNSW build.
        self.graph_recall: float | None = None
        self.built_graph_recall: float | None = None

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

    def contains_many(self, item_ids: np.ndarray) -> np.ndarray:
        """contains for many ids at once (bool array)."""
        item_ids = np.asarray(item_ids, np.int64)
        present = self._present
        inside = (item_ids >= 0) & (item_ids < present.shape[0])
        out = np.zeros(item_ids.shape[0], bool)
        out[inside] = present[item_ids[inside]]
        return out

    def has_vector(self, item_id: int) -> bool:
        return 0 <= item_id < self._has.shape[0] and bool(self._has[item_id])

    def has_vectors(self, item_ids: np.ndarray) -> np.ndarray:
        """has_vector for many ids at once (bool array)."""
        item_ids = np.asarray(item_ids, np.int64)
        has = self._has
        inside = (item_ids >= 0) & (item_ids < has.shape[0])
        out = np.zeros(item_ids.shape[0], bool)
        out[inside] = has[item_ids[inside]]
        return out

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

        def grown(array: np.ndarray) -> np.ndarray:
            # np.zeros of a large size maps zero pages that are touched only when written:
            # copying the old rows in writes only those (a concatenate with a zero block
            # wrote and faulted the whole new size: a third of a 1M-item load's time, py-spy)
            out = np.zeros((capacity,) + array.shape[1:], array.dtype)
            out[: array.shape[0]] = array
            return out
        self._vectors = grown(self._vectors)
        self._has, self._present, self._changed = grown(self._has), grown(self._present), grown(self._changed)

    # ------------------------------------------------------------------ bulk load
    def begin_bulk_load(self) -> None:
        """Until `end_bulk_load`: vectors go to the store only, with no faiss structure (a
        search is an exact scan of the store), so a large load neither fills a flat copy of
        itself nor inserts into HNSW item by item."""
        with self._lock.write():
            self._bulk_loading = True
            self.auto_rebuild = False
            self._structure = ScanStructure(self.dim, self._scan_view)

    def end_bulk_load(self, reuse_graph_of: "VectorIndex | None" = None) -> None:
        """Builds the structure the loaded size wants from the store in one pass: a flat one
        inline; an HNSW one in the background (options.background), the scan answering
        meanwhile; then changes kind / compacts by itself."""
        if not self._bulk_loading:
            self.auto_rebuild = True
            self.maybe_rebuild()
            return
        self._bulk_loading = False
        self.auto_rebuild = True
        if not self.options.reuse_graph:
            reuse_graph_of = None
        kind = self.options.initial_kind(self._count) if self.options.kind == "auto" else self.options.kind
        if kind == "hnsw" and self.options.background and self._count:
            self._start_background_rebuild(kind, reuse_graph_of)
        elif kind == "hnsw" and reuse_graph_of is not None and self._count:
            self._rebuilding = True
            try:
                if not self.reuse_graph(reuse_graph_of):
                    self.rebuild(kind)
            finally:
                self._rebuilding = False
        else:
            self.rebuild(kind)

    def _scan_view(self) -> tuple[np.ndarray, np.ndarray]:
        return self._vectors, self._present

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
            if self._structure.approximate:
                return self._exact_top_k(queries, k, allowed)
            return self._structure.search(queries, k, allowed)

    def _exact_top_k(self, queries: np.ndarray, k: int, allowed: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The exact top k from a structure of approximate (float16) scores: its best
        k + RERANK_MARGIN candidates re-scored with the float32 vectors. Exact when the k-th exact
        score beats the weakest candidate's approximate score by more than the codes' error bound
        (no row left out can reach it), or when every row was a candidate; otherwise that query is
        answered by an exact scan (counted: deltarec_ranker_index_exact_rescans_total)."""
        structure = self._structure
        fetch = min(self._count, k + RERANK_MARGIN)
        approximate, found = structure.search(queries, fetch, allowed)
        out_scores = np.full((queries.shape[0], k), -np.inf, np.float32)
        out_ids = np.full((queries.shape[0], k), -1, np.int64)
        for row in range(queries.shape[0]):
            candidates = found[row][found[row] >= 0]
            if not candidates.size:
                continue
            query = queries[row]
            exact = self._vectors[candidates] @ query
            order = np.argsort(-exact, kind="stable")[:k]
            # Otherwise fetch (> k) candidates came back, so `order` holds k of them.
            every_row = candidates.size < fetch or fetch >= self._count
            proven = every_row or (
                not structure.codes_exceeded
                and exact[order[-1]] > approximate[row, candidates.size - 1]
                + float16_score_error(self.dim, structure.max_norm, query))
            if proven:
                out_scores[row, :order.size] = exact[order]
                out_ids[row, :order.size] = candidates[order]
            else:
                metrics.EXACT_RESCANS.inc()
                scores, ids = ScanStructure(self.dim, self._scan_view).search(query[None, :], k, allowed)
                out_scores[row], out_ids[row] = scores[0], ids[0]
        return out_scores, out_ids

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
        if self.kind == "scan":
            return self.options.initial_kind(self._count)
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
        if self.options.background:
            self._start_background_rebuild(None)
        else:
            self._rebuilding = True
            self.rebuild()

    def _start_background_rebuild(self, kind: str | None, reuse_graph_of: "VectorIndex | None" = None) -> None:
        self._rebuilding = True
        threading.Thread(target=self._gated_rebuild, args=(kind, reuse_graph_of), name="index-rebuild",
                         daemon=True).start()

    def _gated_rebuild(self, kind: str | None, reuse_graph_of: "VectorIndex | None" = None) -> None:
        """`rebuild` (or first `reuse_graph`) in its turn among the process's background builds
        (BuildGate)."""
        try:
            self._gate.acquire(self.options.build_priority)
        except BaseException:
            self._rebuilding = False
            raise
        self._holds_gate = True
        try:
            reused = False
            if reuse_graph_of is not None:
                try:
                    reused = self.reuse_graph(reuse_graph_of)
                except Exception:  # noqa: BLE001 - a failed reuse falls back to the build it saves
                    log.exception("index graph reuse failed; building a new graph")
            if not reused:
                self.rebuild(kind)
            else:
                self._rebuilding = False
        finally:
            self._holds_gate = False
            self._gate.release()

    def rebuild(self, kind: str | None = None) -> None:
        """A fresh structure from the dense copy, built without blocking searches or writes; the
        changes made meanwhile are replayed before the swap: in rounds without the write lock
        while they are many (a bulk load still streaming in), the last few under it."""
        self._rebuilding = True
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, self.options.build_threads))   # this thread only
        try:
            kind = kind or self._wanted_kind()
            with self._lock.read():
                seq = self._seq
                ids = np.flatnonzero(self._present)
                store = self._vectors
            structure = STRUCTURES[kind](self.dim, self.options)
            inside = np.zeros(store.shape[0], bool)      # ids the new structure has a live row for
            inside[ids] = True
            # Read without the lock, a chunk at a time: a row written meanwhile has a newer
            # sequence and is replayed below; a grown store is a new array (this one stays).
            for start in range(0, ids.size, REBUILD_CHUNK):
                if self._holds_gate and self._gate.checkpoint(self.options.build_priority):
                    log.info("index build resumed after a more urgent one",
                             extra={"kind": kind, "rows_built": start, "items": int(ids.size)})
                part = ids[start:start + REBUILD_CHUNK]
                structure.add(part, store[part], np.zeros(0, np.int64))
            recall = sampled_recall(structure, store, ids) if kind == "hnsw" else 1.0
            del ids
            previous = self._install(structure, inside, seq)
            self.graph_recall = self.built_graph_recall = recall
            log.info("index rebuilt", extra={"kind": kind, "previous_kind": previous.kind,
                                             "items": self._count, "dead_rows_dropped": previous.dead,
                                             "sampled_recall": round(recall, 3)})
        finally:
            faiss.omp_set_num_threads(threads)
            self._rebuilding = False

    def _install(self, structure, inside: np.ndarray, seq: int):
        """Replays onto `structure` what changed after `seq` and makes it the one searched;
        returns the structure it replaced."""
        while True:
            with self._lock.read():
                changed = np.flatnonzero(self._changed > seq)
                if changed.size <= REPLAY_UNDER_LOCK:
                    break            # these few: under the write lock below
                seq = self._seq
            # A chunk read after `seq` may already show a later change: that one is
            # replayed again next round (replaying an id's latest state is idempotent).
            for start in range(0, changed.size, REBUILD_CHUNK):
                part = changed[start:start + REBUILD_CHUNK]
                with self._lock.read():
                    present = self._present[part]
                    live = part[present]
                    vectors = self._vectors[live]
                inside = self._replay(structure, inside, part, present, live, vectors)
        with self._lock.write():
            changed = np.flatnonzero(self._changed > seq)
            if changed.size:
                present = self._present[changed]
                live = changed[present]
                self._replay(structure, inside, changed, present, live, self._vectors[live])
            previous = self._structure
            self._structure = structure
            self.rebuilds += 1
        return previous

    # ------------------------------------------------------------------ graph reuse
    def reuse_graph(self, parent: "VectorIndex") -> bool:
        """Gives this index (after a bulk load) `parent`'s HNSW graph with this index's vectors in
        its rows, instead of building a graph: a copy, seconds at 1M items where a build takes
        minutes. Kept only when its sampled recall is within REUSE_RECALL_TOLERANCE of the
        recall of the graph's own fresh build (the lineage's, not the parent's: reuse after
        reuse cannot slide further than that); False, and nothing changed, otherwise.

        Why it works: an incremental model update moves item vectors a little, and a graph's
        neighbour lists stay good for slightly moved points (measured: 200k clustered 64-d
        vectors each moved by 10% of their norm: recall@30 0.972 reused vs 0.975 rebuilt; by
        50%: 0.881 vs 0.987, refused). A full retrain's new space is refused the same way."""
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, self.options.build_threads))
        try:
            reference = parent.built_graph_recall
            with parent._lock.read():
                graph = parent._structure
                if graph.kind != "hnsw" or parent.dim != self.dim or reference is None:
                    return False
                cloned = faiss.clone_index(graph.index)   # owns its copy (already its class)
                row_ids = graph.row_ids[:graph.rows].copy()
                row_by_id = graph.row_by_id.copy()
            with self._lock.read():
                seq = self._seq
                ids = np.flatnonzero(self._present)
                store = self._vectors
            structure = HnswStructure.from_graph(self.dim, self.options, cloned, row_ids, row_by_id, ids, store)
            recall = sampled_recall(structure, store, ids)
            if recall < reference - REUSE_RECALL_TOLERANCE:
                log.info("parent's index graph not reused: its recall with the new vectors is too low",
                         extra={"sampled_recall": round(recall, 3), "built_recall": round(reference, 3),
                                "items": int(ids.size)})
                return False
            inside = np.zeros(store.shape[0], bool)
            inside[ids] = True
            del ids
            self._install(structure, inside, seq)
            self.graph_reuses += 1
            self.graph_recall, self.built_graph_recall = recall, reference
            log.info("index graph reused from the previous version",
                     extra={"sampled_recall": round(recall, 3), "built_recall": round(reference, 3),
                            "items": self._count, "dead_rows": structure.dead})
            return True
        finally:
            faiss.omp_set_num_threads(threads)

    @staticmethod
    def _replay(structure, inside: np.ndarray, changed: np.ndarray, present: np.ndarray, live: np.ndarray,
                vectors: np.ndarray) -> np.ndarray:
        """Brings `structure` to the state of the `changed` ids (`present` flags; `live` those
        present, with their `vectors`); returns the updated `inside` marks."""
        top = int(changed.max()) + 1
        if top > inside.shape[0]:
            grown = np.zeros(max(top, 2 * inside.shape[0]), bool)
            grown[: inside.shape[0]] = inside
            inside = grown
        gone = changed[~present & inside[changed]]
        structure.remove(gone)
        structure.add(live, vectors, live[inside[live]])
        inside[gone] = False
        inside[live] = True
        return inside
