"""The replica's view of the catalog, kept current from features.WatchItems.

Holds per item the metadata filters and reasons need (title, brand, category, price, active), the
MiniLM text vectors (in `text_index`, the model-independent index Search retrieves from), the
lexical index, the cold-start lists (popular, fresh) and this replica's data watermark: the LSN
up to which item changes are applied. Model bundles register as listeners and receive every
change in the same critical section, so when the watermark says L every index reflects L.

Items get a small int id (`iid`) the first time they are seen; ids are never reused while the
process lives, so every index and array is addressed by them.

The metadata is stored column by column (a list of ids and titles, numpy arrays of prices,
flags and LSNs, brands and categories as codes into a table of their distinct values), not as
one Python object per item: at 1M items an object per item, with its own copy of each brand and
category string, cost ~0.3 GB more and was built item by item. `meta(iid)` assembles an
`ItemMeta` when one is asked for. Changes arrive a feed page at a time (`ItemBatch`: the page's
text vectors one float32 matrix, decoded at once), so the text index takes a page in one call.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

from services.common.handler_pool import blocking
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


@dataclass
class ItemBatch:
    """Changes column by column (one feed page): position n of every list is one change; the
    text vectors are one [n, dim] float32 matrix whose row n counts only where has_vector[n]."""
    item_ids: list[str]
    lsns: list[int]
    remove: list[bool]
    titles: list[str]
    brands: list[str]
    categories: list[str]
    prices: list[float | None]
    active: list[bool]
    popularity: list[float]
    vectors: np.ndarray
    has_vector: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def of(cls, updates: Sequence[ItemUpdate], dim: int) -> "ItemBatch":
        vectors = np.zeros((len(updates), dim), np.float32)
        has_vector = np.zeros(len(updates), bool)
        for row, update in enumerate(updates):
            if update.vector is None:
                continue
            vector = np.asarray(update.vector, np.float32).reshape(-1)
            if vector.shape[0] != dim:
                log.warning("item vector of wrong dimension ignored",
                            extra={"item_id": update.item_id, "dim": int(vector.shape[0])})
                continue
            vectors[row] = vector
            has_vector[row] = True
        return cls([u.item_id for u in updates], [u.lsn for u in updates], [u.remove for u in updates],
                   [u.title for u in updates], [u.brand for u in updates], [u.category for u in updates],
                   [u.price for u in updates], [u.active for u in updates],
                   [u.popularity for u in updates], vectors, has_vector)

    def updates(self) -> list[ItemUpdate]:
        """The same changes as one object each (a failure drill's hook takes them so)."""
        return [ItemUpdate(self.item_ids[n], self.lsns[n], self.remove[n], self.titles[n], self.brands[n],
                           self.categories[n], self.prices[n], self.active[n],
                           self.vectors[n] if self.has_vector[n] else None, self.popularity[n])
                for n in range(len(self.item_ids))]


class CatalogListener(Protocol):
    def items_upserted(self, iids: np.ndarray, item_ids: list[str], text_vectors: np.ndarray) -> None: ...

    def items_removed(self, iids: np.ndarray) -> None: ...


class RowsOf:
    """Rows `iids` of a vector store, gathered a slice at a time (`rows[a:b]` is a copy of those
    rows only): a bundle build reads the catalog's text vectors through it instead of a copy of
    them all (1.5 GB at 1M items)."""

    def __init__(self, store: np.ndarray, iids: np.ndarray) -> None:
        self.store, self.iids = store, iids
        self.shape = (iids.shape[0], store.shape[1])

    def __len__(self) -> int:
        return self.iids.shape[0]

    def __getitem__(self, part: slice) -> np.ndarray:
        return self.store[self.iids[part]]


class _Codes:
    """Distinct strings (brands, categories) and their small int codes; code 0 is ""."""

    def __init__(self) -> None:
        self.values: list[str] = [""]
        self._code_of: dict[str, int] = {"": 0}

    def code(self, value: str) -> int:
        code = self._code_of.get(value)
        if code is None:
            code = self._code_of[value] = len(self.values)
            self.values.append(value)
        return code


class Catalog:
    def __init__(self, index_options: IndexOptions | None = None, *, text_dim: int = TEXT_DIM,
                 cold_start_size: int = 500) -> None:
        self.text_dim = text_dim
        self.cold_start_size = cold_start_size
        self.text_index = VectorIndex(text_dim, index_options)
        # Until the initial load is in (mark_ready): no faiss structure, one build at the end.
        self.text_index.begin_bulk_load()
        self.lexical = LexicalIndex()
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._iid_of: dict[str, int] = {}
        # the columns, by iid
        self._item_ids: list[str] = []
        self._titles: list[str] = []
        self._brands, self._categories = _Codes(), _Codes()
        self._brand = np.zeros(0, np.int32)
        self._category = np.zeros(0, np.int32)
        self._price = np.zeros(0, np.float64)           # NaN = no price
        self._listed = np.zeros(0, bool)                # the feed's `active` flag
        self._updated_lsn = np.zeros(0, np.int64)
        self._active = np.zeros(0, bool)                # listed and indexed (has a text vector)
        self._popularity = np.zeros(0, np.float64)
        # Moves whenever any popularity may have changed: a reader's cache key (model_bundle.py).
        self.popularity_changes = 0
        self._fresh = np.zeros(0, np.int64)
        self._changed = np.zeros(0, np.int64)
        self._seq = 0
        self._by_category: dict[str, set[int]] = {}
        self._listeners: list[CatalogListener] = []
        self._watermark = 0
        self._popular = np.zeros(0, np.int64)
        self._fresh_list = np.zeros(0, np.int64)
        self._lists_stale = False
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

    @property
    def popular(self) -> np.ndarray:
        """iids, most popular first."""
        if self._lists_stale:
            self._refresh_stale_lists()
        return self._popular

    @property
    def fresh(self) -> np.ndarray:
        """iids, newest first."""
        if self._lists_stale:
            self._refresh_stale_lists()
        return self._fresh_list

    def _refresh_stale_lists(self) -> None:
        with self._lock:
            if self._lists_stale:
                self._refresh_cold_start_lists()

    def iid(self, item_id: str) -> int | None:
        return self._iid_of.get(item_id)

    def known_iids(self, item_ids: Iterable[str]) -> set[int]:
        """The slots of those of `item_ids` the catalog has (unknown ids are skipped)."""
        return {iid for iid in map(self._iid_of.get, item_ids) if iid is not None}

    def meta(self, iid: int) -> ItemMeta | None:
        if not 0 <= iid < len(self._item_ids):
            return None
        price = float(self._price[iid])
        return ItemMeta(self._item_ids[iid], iid, self._titles[iid], self._brands.values[self._brand[iid]],
                        self._categories.values[self._category[iid]], None if math.isnan(price) else price,
                        bool(self._listed[iid]), int(self._updated_lsn[iid]))

    def meta_of(self, item_id: str) -> ItemMeta | None:
        iid = self._iid_of.get(item_id)
        return None if iid is None else self.meta(iid)

    def name_of(self, iid: int) -> str:
        return self._item_ids[iid] if 0 <= iid < len(self._item_ids) else ""

    def title_of(self, iid: int) -> str:
        """The title alone (an answer's items need only id and title: `meta` assembles all)."""
        return self._titles[iid] if 0 <= iid < len(self._titles) else ""

    def category_of(self, iid: int) -> str:
        return self._categories.values[self._category[iid]] if 0 <= iid < len(self._item_ids) else ""

    def price_of(self, iid: int) -> float | None:
        if not 0 <= iid < len(self._item_ids):
            return None
        price = float(self._price[iid])
        return None if math.isnan(price) else price

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

    def set_popularity(self, iids: np.ndarray, popularity: np.ndarray) -> None:
        """Newer popularity for known items, read from features outside the item feed (the feed
        carries an item's statistics only with its catalog changes; new_item_stats.py reads them
        for the items that need them between changes). The cold-start lists keep theirs."""
        iids = np.asarray(iids, np.int64)
        with self._lock:
            known = (iids >= 0) & (iids < self._popularity.shape[0])
            self._popularity[iids[known]] = np.asarray(popularity, np.float64)[known]
            self.popularity_changes += 1

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
        """The initial load is in: the text index builds its structure from the whole load in
        one go (HNSW in the background, exact search over the stored vectors meanwhile), and
        from now on changes kind / compacts by itself."""
        self.text_index.end_bulk_load()
        self._refresh_stale_lists()
        self.ready.set()

    # ------------------------------------------------------------------ read-your-writes
    def wait_for(self, lsn: int, timeout_s: float | None) -> bool:
        """True once the watermark reaches `lsn` (False when the timeout runs out first)."""
        if self._watermark >= lsn:
            return True
        deadline = None if timeout_s is None else time.monotonic() + max(timeout_s, 0.0)
        with blocking(), self._cond:
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
        with self._lock:
            listed = np.flatnonzero(self._listed).tolist()
            gone = [ItemUpdate(self._item_ids[iid], watermark, remove=True) for iid in listed
                    if self._item_ids[iid] not in item_ids]
        if gone:
            self.apply(gone, watermark)
        return len(gone)

    # ------------------------------------------------------------------ listeners
    def snapshot(self) -> tuple[np.ndarray, list[str], RowsOf, int]:
        """(iids, item ids, their text vectors, sequence) of every active item with a vector,
        for a bundle build; pass the sequence to `attach` to receive what changed since. The
        vectors are read from the text index's store a slice at a time (`RowsOf`): rows that
        change after the snapshot are replayed by `attach`."""
        with self._lock:
            iids = np.flatnonzero(self._active)
            iids = iids[self.text_index.has_vectors(iids)].astype(np.int64)
            names = [self._item_ids[i] for i in iids.tolist()]
            return iids, names, RowsOf(self.text_index.vector_view(), iids), self._seq

    def attach(self, listener: CatalogListener, since_seq: int) -> None:
        """Replays the changes after `since_seq` to `listener`, then keeps it informed."""
        with self._lock:
            changed = np.flatnonzero(self._changed > since_seq)
            if changed.size:
                active = self._active[changed]
                live = changed[active & self.text_index.has_vectors(changed)].astype(np.int64)
                gone = changed[~active].astype(np.int64)
                if gone.size:
                    listener.items_removed(gone)
                if live.size:
                    listener.items_upserted(live, [self._item_ids[i] for i in live.tolist()],
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

        def grown(array: np.ndarray, fill=0) -> np.ndarray:
            out = np.full(capacity, fill, array.dtype)
            out[: array.shape[0]] = array
            return out
        self._brand, self._category = grown(self._brand), grown(self._category)
        self._price = grown(self._price, np.nan)
        self._listed, self._updated_lsn = grown(self._listed), grown(self._updated_lsn)
        self._active, self._popularity = grown(self._active), grown(self._popularity)
        self._fresh, self._changed = grown(self._fresh), grown(self._changed)

    def apply(self, updates: Iterable[ItemUpdate], watermark: int = 0) -> int:
        """Applies a batch of changes (the last change of an item wins) and advances the
        watermark; returns how many items changed."""
        return self.apply_batch(ItemBatch.of(list(updates), self.text_dim), watermark)

    def apply_batch(self, batch: ItemBatch, watermark: int = 0) -> int:
        """`apply` for changes already in columns (a decoded feed page)."""
        last: dict[str, int] = {}
        for position, item_id in enumerate(batch.item_ids):
            last[item_id] = position
        positions = list(last.values())
        with self._lock:
            if positions:
                self._apply_locked(batch, positions)
                self.popularity_changes += 1
            self.applied_changes += len(positions)
            self.last_apply_at = time.time()
        self.advance_watermark(watermark)
        return len(positions)

    def _apply_locked(self, batch: ItemBatch, positions: list[int]) -> None:
        upsert_iids, upsert_rows, new_vector_iids, removed = [], [], [], []
        self._seq += 1
        seq = self._seq
        iid_of, item_ids, titles = self._iid_of, self._item_ids, self._titles
        categories = self._categories
        has_vector = batch.has_vector.tolist()
        known_vector = self.text_index.has_vector
        lexical = self.lexical
        for n in positions:
            item_id = batch.item_ids[n]
            iid = iid_of.get(item_id)
            remove = batch.remove[n]
            if iid is None:
                if remove:
                    continue
                iid = len(item_ids)
                iid_of[item_id] = iid
                item_ids.append(item_id)
                titles.append("")
                self._grow(iid + 1)
            was_active = bool(self._active[iid])
            if was_active:
                old_category = categories.values[self._category[iid]]
                if old_category:
                    members = self._by_category.get(old_category)
                    if members is not None:
                        members.discard(iid)
                        if not members:
                            del self._by_category[old_category]
            self._updated_lsn[iid] = batch.lsns[n]
            self._changed[iid] = seq
            if remove:
                listed = False
            else:
                listed = bool(batch.active[n])
                category = batch.categories[n]
                titles[iid] = batch.titles[n]
                self._brand[iid] = self._brands.code(batch.brands[n])
                self._category[iid] = categories.code(category)
                price = batch.prices[n]
                self._price[iid] = np.nan if price is None else price
            self._listed[iid] = listed
            vector = not remove and has_vector[n]
            if listed and (vector or known_vector(iid)):
                self._active[iid] = True
                if category:
                    self._by_category.setdefault(category, set()).add(iid)
                if not was_active:
                    self._fresh[iid] = max(batch.lsns[n], 1)
                self._popularity[iid] = batch.popularity[n]
                if vector:
                    upsert_iids.append(iid)
                    upsert_rows.append(n)
                    new_vector_iids.append(iid)
                elif not was_active:
                    new_vector_iids.append(iid)   # re-activated with the vector we kept
                lexical.add(iid, titles[iid], batch.brands[n])
            else:
                if listed:
                    log.warning("active item without a text vector is not indexed",
                                extra={"item_id": item_id})
                self._active[iid] = False
                if was_active:
                    removed.append(iid)
                lexical.remove(iid)
        if upsert_iids:
            rows = np.asarray(upsert_rows, np.int64)
            vectors = batch.vectors if rows.shape[0] == batch.vectors.shape[0] and \
                np.array_equal(rows, np.arange(rows.shape[0])) else batch.vectors[rows]
            self.text_index.upsert(np.asarray(upsert_iids, np.int64), vectors)
        reactivated = [i for i in new_vector_iids if not self.text_index.contains(i)]
        if reactivated:
            ids = np.asarray(reactivated, np.int64)
            self.text_index.upsert(ids, self.text_index.vectors_of(ids))
        if removed:
            self.text_index.remove(np.asarray(removed, np.int64))
        if new_vector_iids and self._listeners:
            ids = np.asarray(sorted(set(new_vector_iids)), np.int64)
            names = [item_ids[i] for i in ids.tolist()]
            vectors = self.text_index.vectors_of(ids)
            for listener in self._listeners:
                listener.items_upserted(ids, names, vectors)
        if removed:
            ids = np.asarray(removed, np.int64)
            for listener in self._listeners:
                listener.items_removed(ids)
        if self.ready.is_set():
            self._refresh_cold_start_lists()
        else:
            # Each refresh scans every item: during the initial load (pages of 512 into up
            # to 1M items) that was O(n^2); the lists are made when first read, or at ready.
            self._lists_stale = True

    def _refresh_cold_start_lists(self) -> None:
        self._lists_stale = False
        size = self.cold_start_size
        active = np.flatnonzero(self._active)
        if not active.size:
            self._popular = self._fresh_list = np.zeros(0, np.int64)
            return
        popularity = self._popularity[active]
        positive = active[popularity > 0]
        if positive.size:
            scores = self._popularity[positive]
            top = positive[np.argsort(-scores, kind="stable")[:size]] if positive.size <= size else \
                positive[np.argpartition(-scores, size - 1)[:size]]
            self._popular = top[np.argsort(-self._popularity[top], kind="stable")]
        else:
            self._popular = np.zeros(0, np.int64)
        fresh = self._fresh[active]
        take = min(size, active.size)
        top = active[np.argpartition(-fresh, take - 1)[:take]] if active.size > take else active
        self._fresh_list = top[np.argsort(-self._fresh[top], kind="stable")]
