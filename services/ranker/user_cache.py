"""A user's history as read from features, and the short-lived cache requests read it through."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from services.ranker import metrics


@dataclass(frozen=True)
class UserHistory:
    """A user's recent interactions (oldest first) as read from features."""
    item_ids: tuple[str, ...] = ()
    event_types: tuple[int, ...] = ()     # model indexes (EventType); PAD for a kind unknown here
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
