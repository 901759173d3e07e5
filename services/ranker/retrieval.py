"""Request-side building blocks shared by Recommend, Search and SimilarItems: plain request and
answer types, filters, filtered top-k retrieval, the user-feature cache and the read-your-writes
wait. No gRPC here (the edge converts messages)."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument
from services.ranker import metrics
from services.ranker.catalog import Catalog, ItemMeta
from services.ranker.vector_index import VectorIndex

log = logging.getLogger(__name__)

MAX_K = 200
DEFAULT_K = 10
# Candidate sets (e.g. one category) up to this size are scored exactly instead of searched.
CANDIDATE_SCAN_MAX = 4096
# Most rows one filtered retrieval asks of the index.
MAX_FETCH = 4096


def check_k(k: int) -> int:
    if k == 0:
        return DEFAULT_K
    if not 1 <= k <= MAX_K:
        raise InvalidArgument(f"k: must be in 1..{MAX_K}, got {k}")
    return int(k)


def check_id(name: str, value: str, required: bool = True) -> str:
    if required and not value:
        raise InvalidArgument(f"{name}: required")
    if len(value.encode()) > 128:
        raise InvalidArgument(f"{name}: at most 128 bytes")
    return value


class DataBehind(FailedPrecondition):
    """min_data_lsn not reached within the deadline; carries this replica's watermark."""

    def __init__(self, watermark: int, wanted: int) -> None:
        super().__init__(f"data watermark {watermark} is behind min_data_lsn {wanted}; retry later "
                         f"or on another replica")
        self.watermark, self.wanted = watermark, wanted


def wait_for_lsn(catalog: Catalog, min_lsn: int, timeout_s: float | None, max_wait_s: float) -> None:
    """Read-your-writes: wait (within the call's deadline, at most max_wait_s) until this replica
    applied `min_lsn`, else DataBehind."""
    if not min_lsn or catalog.watermark >= min_lsn:
        return
    wait = max_wait_s if timeout_s is None else min(max_wait_s, timeout_s * 0.9 - 0.005)
    started = time.monotonic()
    reached = wait > 0 and catalog.wait_for(min_lsn, wait)
    metrics.MIN_LSN_WAIT.observe(time.monotonic() - started)
    if not reached:
        raise DataBehind(catalog.watermark, min_lsn)


@dataclass(frozen=True)
class FilterSpec:
    exclude_purchased: bool = True
    exclude_seen: bool = False
    categories: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None
    exclude_item_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise InvalidArgument("filters.min_price: greater than max_price")
        if len(self.exclude_item_ids) > 10_000:
            raise InvalidArgument("filters.exclude_item_ids: at most 10000")

    @property
    def restricts_items(self) -> bool:
        return bool(self.categories) or self.min_price is not None or self.max_price is not None


NO_FILTERS = FilterSpec(exclude_purchased=False)


def make_acceptor(catalog: Catalog, filters: FilterSpec, excluded: set[int]) -> Callable[[int], bool]:
    categories, low, high = filters.categories, filters.min_price, filters.max_price

    def accept(iid: int) -> bool:
        if iid < 0 or iid in excluded or not catalog.is_active(iid):
            return False
        if not (categories or low is not None or high is not None):
            return True
        meta: ItemMeta | None = catalog.meta(iid)
        if meta is None:
            return False
        if categories and not any(meta.category.startswith(prefix) for prefix in categories):
            return False
        if low is not None or high is not None:
            if meta.price is None:
                return False
            if (low is not None and meta.price < low) or (high is not None and meta.price > high):
                return False
        return True
    return accept


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
    first = True
    while True:
        # The first (usual) search is batched with concurrent requests; wider retries are not.
        scores, ids = index.search_one(query, fetch) if first else index.search(query, fetch)
        first = False
        found = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0 and accept(int(i))]
        if len(found) >= k or fetch >= min(size, MAX_FETCH):
            return found[:k]
        fetch = min(size, MAX_FETCH, fetch * 4)


@dataclass
class Scored:
    item_id: str
    score: float
    reason: str = ""
    title: str = ""


@dataclass
class Answer:
    items: list[Scored]
    model_version: int
    data_lsn: int
    variant: str = "current"
    cold_start: bool = False


# ---------------------------------------------------------------------- user features
@dataclass(frozen=True)
class UserHistory:
    """A user's recent interactions (oldest first) as read from features."""
    item_ids: tuple[str, ...] = ()
    event_types: tuple[int, ...] = ()
    timestamps: tuple[float, ...] = ()     # seconds since the epoch
    data_lsn: int = 0
    updated_lsn: int = 0


class FeaturesUnavailable(Exception):
    pass


class UserSource(Protocol):
    def user_history(self, user_id: str, max_history: int, timeout_s: float | None) -> UserHistory: ...


@dataclass
class CachedUser:
    history: UserHistory
    fetched_at: float
    # user vectors per model spec, valid while the entry lives (the history is the same)
    vectors: dict = field(default_factory=dict)


class UserCache:
    """A short-lived LRU of user histories (and the user vectors computed from them).

    An entry serves requests for `ttl_s` seconds; a request with min_data_lsn above the entry's
    data_lsn always reads through, so read-your-writes holds. ttl 0 disables the cache."""

    def __init__(self, source: UserSource, ttl_s: float = 1.0, capacity: int = 10_000) -> None:
        self.source, self.ttl_s, self.capacity = source, ttl_s, capacity
        self._entries: OrderedDict[str, CachedUser] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, user_id: str, max_history: int, min_lsn: int, timeout_s: float | None) -> CachedUser:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is not None:
                self._entries.move_to_end(user_id)
        if entry is not None and now - entry.fetched_at < self.ttl_s and entry.history.data_lsn >= min_lsn:
            metrics.USER_CACHE.labels("hit").inc()
            return entry
        metrics.USER_CACHE.labels("miss").inc()
        history = self.source.user_history(user_id, max_history, timeout_s)
        fresh = CachedUser(history, time.monotonic())
        if self.ttl_s > 0:
            with self._lock:
                self._entries[user_id] = fresh
                self._entries.move_to_end(user_id)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
                # Expired entries at the old end go too: memory stays ~ request rate x ttl.
                while self._entries:
                    oldest = next(iter(self._entries.values()))
                    if fresh.fetched_at - oldest.fetched_at < self.ttl_s:
                        break
                    self._entries.popitem(last=False)
        return fresh

    def __len__(self) -> int:
        return len(self._entries)
