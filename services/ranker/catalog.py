"""The replica's view of the catalog, kept current from features.WatchItems.

Holds per item the metadata filters and reasons need (title, brand, category, price, active), the
MiniLM text vectors (in `text_index`, the model-independent index Search retrieves from), the
lexical index, the cold-start lists (popular, fresh) and this replica's data watermark: the LSN
up to which item changes are applied. Model bundles register as listeners and receive every
change in the same critical section, so when the watermark says L every index reflects L.

Items get a small int id (`iid`) the first time they are seen; ids are never reused while the
process lives, so every index and array is addressed by them.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

from services.ranker.index_structures import IndexOptions
from services.ranker.vector_index import VectorIndex
from services.ranker.lexical import LexicalIndex

log = logging.getLogger(__name__)

TEXT_DIM = 384


@dataclass(frozen=True, slots=True)
class ItemMeta:
    item_id: str
    iid: int
    title: str = ""
    brand: str = ""
    category: str = ""
    price: float | None = None
    active: bool = True
    updated_lsn: int = 0


@dataclass(frozen=True)
class ItemUpdate:
    """One change from the feed: an upsert (metadata, optionally a new text vector) or a removal."""
    item_id: str
    lsn: int = 0
    remove: bool = False
    title: str = ""
    brand: str = ""
    category: str = ""
    price: float | None = None
    active: bool = True
    vector: np.ndarray | None = None     # MiniLM text vector; None = keep the one we have
    popularity: float = 0.0


class CatalogListener(Protocol):
    def items_upserted(self, iids: np.ndarray, item_ids: list[str], text_vectors: np.ndarray) -> None: ...

    def items_removed(self, iids: np.ndarray) -> None: ...


class Catalog:
    def __init__(self, index_options: IndexOptions | None = None, *, text_dim: int = TEXT_DIM,
                 cold_start_size: int = 500) -> None:
        self.text_dim = text_dim
        self.cold_start_size = cold_start_size
        self.text_index = VectorIndex(text_dim, index_options)
        self.text_index.auto_rebuild = False     # until the initial load is in: see mark_ready()
        self.lexical = LexicalIndex()
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._iid_of: dict[str, int] = {}
        self._metas: list[ItemMeta | None] = []
        self._active = np.zeros(0, bool)
        self._popularity = np.zeros(0, np.float64)
        self._fresh = np.zeros(0, np.int64)
        self._changed = np.zeros(0, np.int64)
        self._seq = 0
        self._by_category: dict[str, set[int]] = {}
        self._listeners: list[CatalogListener] = []
        self._watermark = 0
        self.popular: np.ndarray = np.zeros(0, np.int64)   # iids, most popular first
        self.fresh: np.ndarray = np.zeros(0, np.int64)     # iids, newest first
        self.ready = threading.Event()                     # set by the feed once caught up
        self.applied_changes = 0
        self.last_apply_at = 0.0

    # ------------------------------------------------------------------ lookups (any thread)
    @property
    def watermark(self) -> int:
        return self._watermark

    @property
    def active_count(self) -> int:
        return int(self._active.sum())

    def iid(self, item_id: str) -> int | None:
        return self._iid_of.get(item_id)

    def known_iids(self, item_ids: Iterable[str]) -> set[int]:
        """The slots of those of `item_ids` the catalog has (unknown ids are skipped)."""
        return {iid for iid in map(self._iid_of.get, item_ids) if iid is not None}

    def meta(self, iid: int) -> ItemMeta | None:
        return self._metas[iid] if 0 <= iid < len(self._metas) else None

    def meta_of(self, item_id: str) -> ItemMeta | None:
        iid = self._iid_of.get(item_id)
        return None if iid is None else self._metas[iid]

    def name_of(self, iid: int) -> str:
        meta = self._metas[iid]
        return meta.item_id if meta is not None else ""

    def active_mask(self, iids: np.ndarray) -> np.ndarray:
        """is_active for many ids at once (bool array; -1 and unknown ids are inactive)."""
        active = self._active
        inside = (iids >= 0) & (iids < active.shape[0])
        out = np.zeros(iids.shape[0], bool)
        out[inside] = active[iids[inside]]
        return out

    def popularity_of(self, iids: np.ndarray) -> np.ndarray:
        """Features' item popularity as of each item's last change in the feed (0 when unknown)."""
        iids = np.asarray(iids, np.int64)
        out = np.zeros(iids.shape[0], np.float64)
        known = iids < self._popularity.shape[0]
        out[known] = self._popularity[iids[known]]
        return out

    def is_active(self, iid: int) -> bool:
        return 0 <= iid < self._active.shape[0] and bool(self._active[iid])

    def in_categories(self, prefixes: Sequence[str], limit: int | None = None) -> set[int] | None:
        """Active items whose category starts with one of the prefixes (None when there are
        more than `limit`: the caller filters search results instead of scanning them)."""
        matching = [members for category, members in list(self._by_category.items())
                    if any(category.startswith(prefix) for prefix in prefixes)]
        if limit is not None and sum(len(members) for members in matching) > limit:
            return None
        found: set[int] = set()
        for members in matching:
            found |= members
        return found

    def mark_ready(self) -> None:
        """The initial load is in: from now on the text index changes kind / compacts by itself
        (and does so now if the load took it past a threshold)."""
        self.text_index.auto_rebuild = True
        self.text_index.maybe_rebuild()
        self.ready.set()

    # ------------------------------------------------------------------ read-your-writes
    def wait_for(self, lsn: int, timeout_s: float | None) -> bool:
        """True once the watermark reaches `lsn` (False when the timeout runs out first)."""
        if self._watermark >= lsn:
            return True
        deadline = None if timeout_s is None else time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            while self._watermark < lsn:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def advance_watermark(self, lsn: int) -> None:
        if lsn > self._watermark:
            with self._cond:
                self._watermark = max(self._watermark, lsn)
                self._cond.notify_all()

    def reset_watermark(self, lsn: int) -> None:
        """Only for a full resync (the feature store was rebuilt): the watermark may go back."""
        with self._cond:
            self._watermark = lsn
            self._cond.notify_all()

    def retain_only(self, item_ids: set[str], watermark: int) -> int:
        """Removes every active item not in `item_ids` (end of a full resync); returns how many."""
        gone = [ItemUpdate(meta.item_id, watermark, remove=True) for meta in list(self._metas)
                if meta is not None and meta.active and meta.item_id not in item_ids]
        if gone:
            self.apply(gone, watermark)
        return len(gone)

    # ------------------------------------------------------------------ listeners
    def snapshot(self) -> tuple[np.ndarray, list[str], np.ndarray, int]:
        """(iids, item ids, text vectors, sequence) of every active item with a vector, for a
        bundle build; pass the sequence to `attach` to receive what changed since."""
        with self._lock:
            iids = np.flatnonzero(self._active)
            iids = iids[[self.text_index.has_vector(int(i)) for i in iids]] if iids.size else iids
            return (iids.astype(np.int64), [self._metas[i].item_id for i in iids],
                    self.text_index.vectors_of(iids), self._seq)

    def attach(self, listener: CatalogListener, since_seq: int) -> None:
        """Replays the changes after `since_seq` to `listener`, then keeps it informed."""
        with self._lock:
            changed = np.flatnonzero(self._changed > since_seq)
            if changed.size:
                live = np.array([i for i in changed
                                 if self._active[i] and self.text_index.has_vector(int(i))], np.int64)
                gone = np.array([i for i in changed if not self._active[i]], np.int64)
                if gone.size:
                    listener.items_removed(gone)
                if live.size:
                    listener.items_upserted(live, [self._metas[i].item_id for i in live],
                                            self.text_index.vectors_of(live))
            self._listeners.append(listener)

    def detach(self, listener: CatalogListener) -> None:
        with self._lock:
            self._listeners = [other for other in self._listeners if other is not listener]

    @property
    def listener_count(self) -> int:
        return len(self._listeners)

    # ------------------------------------------------------------------ the writer
    def _grow(self, size: int) -> None:
        if size <= self._active.shape[0]:
            return
        capacity = max(size, 2 * self._active.shape[0], 256)
        extra = capacity - self._active.shape[0]
        self._active = np.concatenate([self._active, np.zeros(extra, bool)])
        self._popularity = np.concatenate([self._popularity, np.zeros(extra, np.float64)])
        self._fresh = np.concatenate([self._fresh, np.zeros(extra, np.int64)])
        self._changed = np.concatenate([self._changed, np.zeros(extra, np.int64)])

    def apply(self, updates: Iterable[ItemUpdate], watermark: int = 0) -> int:
        """Applies a batch of changes (the last change of an item wins) and advances the
        watermark; returns how many items changed."""
        latest: dict[str, ItemUpdate] = {}
        for update in updates:
            latest[update.item_id] = update
        with self._lock:
            if latest:
                self._apply_locked(list(latest.values()))
            self.applied_changes += len(latest)
            self.last_apply_at = time.time()
        self.advance_watermark(watermark)
        return len(latest)

    def _apply_locked(self, updates: list[ItemUpdate]) -> None:
        upsert_iids, upsert_vectors, new_vector_iids, removed = [], [], [], []
        self._seq += 1
        for update in updates:
            iid = self._iid_of.get(update.item_id)
            if iid is None:
                if update.remove:
                    continue
                iid = len(self._metas)
                self._iid_of[update.item_id] = iid
                self._metas.append(None)
                self._grow(iid + 1)
            previous = self._metas[iid]
            was_active = bool(self._active[iid])
            if update.remove:
                meta = (previous if previous is not None else ItemMeta(update.item_id, iid))
                meta = ItemMeta(meta.item_id, iid, meta.title, meta.brand, meta.category, meta.price,
                                False, update.lsn)
            else:
                meta = ItemMeta(update.item_id, iid, update.title, update.brand, update.category,
                                update.price, update.active, update.lsn)
            self._metas[iid] = meta
            self._changed[iid] = self._seq
            if previous is not None and previous.active and previous.category:
                members = self._by_category.get(previous.category)
                if members is not None:
                    members.discard(iid)
                    if not members:
                        del self._by_category[previous.category]
            vector = None if update.vector is None else np.asarray(update.vector, np.float32).reshape(-1)
            if vector is not None and vector.shape[0] != self.text_dim:
                log.warning("item vector of wrong dimension ignored",
                            extra={"item_id": update.item_id, "dim": int(vector.shape[0])})
                vector = None
            has_vector = vector is not None or self.text_index.has_vector(iid)
            if meta.active and has_vector:
                self._active[iid] = True
                if meta.category:
                    self._by_category.setdefault(meta.category, set()).add(iid)
                if not was_active:
                    self._fresh[iid] = max(update.lsn, 1)
                self._popularity[iid] = update.popularity
                if vector is not None:
                    upsert_iids.append(iid)
                    upsert_vectors.append(vector)
                    new_vector_iids.append(iid)
                elif not was_active:
                    new_vector_iids.append(iid)   # re-activated with the vector we kept
                self.lexical.add(iid, meta.title, meta.brand)
            else:
                if meta.active and not has_vector:
                    log.warning("active item without a text vector is not indexed",
                                extra={"item_id": update.item_id})
                self._active[iid] = False
                if was_active:
                    removed.append(iid)
                self.lexical.remove(iid)
        if upsert_iids:
            self.text_index.upsert(np.asarray(upsert_iids, np.int64), np.stack(upsert_vectors))
        reactivated = [i for i in new_vector_iids if not self.text_index.contains(i)]
        if reactivated:
            ids = np.asarray(reactivated, np.int64)
            self.text_index.upsert(ids, self.text_index.vectors_of(ids))
        if removed:
            self.text_index.remove(np.asarray(removed, np.int64))
        if new_vector_iids:
            ids = np.asarray(sorted(set(new_vector_iids)), np.int64)
            names = [self._metas[i].item_id for i in ids]
            vectors = self.text_index.vectors_of(ids)
            for listener in self._listeners:
                listener.items_upserted(ids, names, vectors)
        if removed:
            ids = np.asarray(removed, np.int64)
            for listener in self._listeners:
                listener.items_removed(ids)
        self._refresh_cold_start_lists()

    def _refresh_cold_start_lists(self) -> None:
        size = self.cold_start_size
        active = np.flatnonzero(self._active)
        if not active.size:
            self.popular = self.fresh = np.zeros(0, np.int64)
            return
        popularity = self._popularity[active]
        positive = active[popularity > 0]
        if positive.size:
            scores = self._popularity[positive]
            top = positive[np.argsort(-scores, kind="stable")[:size]] if positive.size <= size else \
                positive[np.argpartition(-scores, size - 1)[:size]]
            self.popular = top[np.argsort(-self._popularity[top], kind="stable")]
        else:
            self.popular = np.zeros(0, np.int64)
        fresh = self._fresh[active]
        take = min(size, active.size)
        top = active[np.argpartition(-fresh, take - 1)[:take]] if active.size > take else active
        self.fresh = top[np.argsort(-self._fresh[top], kind="stable")]
