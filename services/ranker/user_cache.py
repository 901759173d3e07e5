"""Users' state as read from features, and the bounded cache requests read it through.

The cache is kept exact by features' user-change stream (`WatchUsers`, applied by
`user_feed.py`): "user U changed at LSN L" drops U's entry unless it already shows L. While the
stream is live, an entry read from features at LSN D is therefore the user's state as of the
stream's position S (>= D): no change of U lies in (D, S], or the entry would be gone. A cached
user costs no call, and an answer says data_lsn = S.

Why an entry may be inserted at all: a read (at D) races with the stream. A change of U in
(D, S] may have been applied to the cache while the read was in flight, before the entry
existed. `_recent` remembers the LSN of the latest change of the last `change_memory` users that
changed; an entry is only stored when no remembered change of U is newer than D and D is not
older than what `_recent` still covers (`_covered_from`). Changes above S arrive later and are
checked against D.

Misses are fetched, several at once: while one read of features is in flight, the misses of other
requests queue and go in the next read as one batch (`MissBatcher`; no added wait when there is no
contention).

When the stream is not live (features down, stream broken, a features service without
`WatchUsers`), the cache cannot know what changed: entries then serve only for `fallback_ttl_s`
after they were read (the old short-lived cache), and a request with min_data_lsn above an entry's
LSN always reads through. When that read fails (features unreachable), an entry read within
`stale_s` is served marked `degraded`: the answer says so, and says the LSN it reflects.
When the feature store was rebuilt from a new snapshot (the stream says
so), everything is forgotten.

Memory: at most `capacity` entries (LRU), each a user's recent history (FEATURES_HISTORY_LENGTH,
50) and seen/purchased sets (bounded by features' FEATURES_SEEN_ITEMS), plus `change_memory`
(user id, LSN) pairs — a replica never holds every user.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from services.common.handler_pool import blocking
from services.ranker import metrics


# The labelled counters, looked up once (a labels() call per request costs a lock and a dict).
_HIT, _HIT_FALLBACK, _MISS, _STALE = (metrics.USER_CACHE.labels(result)
                                      for result in ("hit", "hit_fallback", "miss", "stale"))


@dataclass(frozen=True)
class UserHistory:
    """A user's recent interactions (oldest first) as read from features, with the items of the
    whole history the filters need (features' bounded per-user set, most recent last)."""
    item_ids: tuple[str, ...] = ()
    event_types: tuple[int, ...] = ()     # model indexes (EventType); PAD for a kind unknown here
    timestamps: tuple[float, ...] = ()     # seconds since the epoch
    data_lsn: int = 0                      # the state is exact as of this LSN
    updated_lsn: int = 0
    seen_item_ids: tuple[str, ...] = ()        # every item interacted with (bounded, see features)
    purchased_item_ids: tuple[str, ...] = ()   # of those, the purchased ones


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
    # memo of the filters' exclusion sets (seen_filter.py), same lifetime
    exclusions: dict = field(default_factory=dict)
    # features could not answer: this is the replica's last known state (or none at all)
    degraded: bool = False

    def as_of(self, lsn: int) -> "CachedUser":
        """The same entry (sharing its memos) stating that it is exact as of `lsn`."""
        if lsn <= self.history.data_lsn:
            return self
        return CachedUser(dataclasses.replace(self.history, data_lsn=lsn), self.fetched_at, self.vectors,
                          self.exclusions)


class _Slot:
    __slots__ = ("user_id", "history", "error")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.history: UserHistory | None = None
        self.error: Exception | None = None


class MissBatcher:
    """Reads of missing users, batched: at most `max_in_flight` reads of features at a time; a
    miss that finds one free reads every queued user (up to `max_batch`) in one call, the others
    queue for the next free one. Without contention a miss is read at once, alone."""

    def __init__(self, source, max_batch: int = 64, max_in_flight: int = 2) -> None:
        self.source, self.max_batch, self.max_in_flight = source, max_batch, max_in_flight
        many = getattr(source, "user_histories", None)
        self._many: Callable[[list[str], int, float | None], dict[str, UserHistory]] = many or self._one_by_one
        self._cond = threading.Condition()
        self._pending: list[_Slot] = []
        self._in_flight = 0
        self.calls = 0
        self.batched_users = 0

    def _one_by_one(self, user_ids: list[str], max_history: int, timeout_s: float | None) -> dict:
        return {user_id: self.source.user_history(user_id, max_history, timeout_s) for user_id in user_ids}

    def fetch(self, user_id: str, max_history: int, timeout_s: float | None) -> UserHistory:
        with blocking():     # queued behind other reads, then a call to features
            return self._fetch(user_id, max_history, timeout_s)

    def _fetch(self, user_id: str, max_history: int, timeout_s: float | None) -> UserHistory:
        slot = _Slot(user_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._pending.append(slot)
        while True:
            with self._cond:
                while (slot.history is None and slot.error is None
                       and (self._in_flight >= self.max_in_flight or slot not in self._pending)):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        if slot in self._pending:
                            self._pending.remove(slot)
                        raise FeaturesUnavailable("user features: deadline passed while queued")
                    self._cond.wait(remaining)
                if slot.error is not None:
                    raise slot.error
                if slot.history is not None:
                    return slot.history
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                self._in_flight += 1
            try:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
                ids = list(dict.fromkeys(s.user_id for s in batch))
                self.calls += 1
                self.batched_users += len(ids)
                found = self._many(ids, max_history, remaining)
                for queued in batch:
                    queued.history = found.get(queued.user_id) or UserHistory()
            except FeaturesUnavailable as error:
                for queued in batch:
                    queued.error = error
            except Exception as error:  # noqa: BLE001 - every queued request gets the failure
                for queued in batch:
                    queued.error = FeaturesUnavailable(f"user features: {error}")
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()


class UserCache:
    """A bounded LRU of users' state (and the user vectors computed from it), exact while the
    user-change stream is live; see the module docstring."""

    def __init__(self, source: UserSource, ttl_s: float = 1.0, capacity: int = 50_000, *,
                 change_memory: int = 100_000, max_batch: int = 64, max_in_flight: int = 2,
                 stale_s: float = 0.0) -> None:
        self.source, self.fallback_ttl_s, self.capacity = source, ttl_s, capacity
        # Degraded reads: when features cannot answer, an entry read at most stale_s ago is
        # served anyway, marked degraded (what the replica knew beats popular items).
        self.stale_s = stale_s
        self.change_memory = change_memory
        self._entries: OrderedDict[str, CachedUser] = OrderedDict()
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._covered_from = 0       # _recent holds every change above this LSN (up to stream_lsn)
        self._lock = threading.Lock()
        self._misses = MissBatcher(source, max_batch, max_in_flight)
        self.stream_lsn = 0          # every user change up to here has been applied
        self.live = False            # the stream is connected: entries are exact as of stream_lsn
        self.invalidations = 0

    # ------------------------------------------------------------------ requests
    def get(self, user_id: str, max_history: int, min_lsn: int, timeout_s: float | None) -> CachedUser:
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is not None:
                self._entries.move_to_end(user_id)
            live, stream_lsn = self.live, self.stream_lsn
        if entry is not None:
            as_of = max(stream_lsn, entry.history.data_lsn)
            if live and as_of >= min_lsn:
                _HIT.inc()
                return entry.as_of(as_of)
            if (not live and time.monotonic() - entry.fetched_at < self.fallback_ttl_s
                    and entry.history.data_lsn >= min_lsn):
                _HIT_FALLBACK.inc()
                return entry
        _MISS.inc()
        try:
            history = self._misses.fetch(user_id, max_history, timeout_s)
        except FeaturesUnavailable:
            if (entry is not None and time.monotonic() - entry.fetched_at < self.stale_s
                    and entry.history.data_lsn >= min_lsn):
                _STALE.inc()
                return dataclasses.replace(entry, degraded=True)
            raise
        fresh = CachedUser(history, time.monotonic())
        if self.capacity > 0:
            self._store(user_id, fresh)
        return fresh

    def _store(self, user_id: str, fresh: CachedUser) -> None:
        lsn = fresh.history.data_lsn
        with self._lock:
            if lsn < self._covered_from or self._recent.get(user_id, 0) > lsn:
                return          # a change of this user may have passed while it was read
            current = self._entries.get(user_id)
            if current is not None and current.history.data_lsn > lsn:
                return
            self._entries[user_id] = fresh
            self._entries.move_to_end(user_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    # ------------------------------------------------------------------ the stream (user_feed.py)
    def stream_started(self, watermark: int) -> None:
        """A stream started with nothing to replay (after_lsn 0) at `watermark`: changes at or
        below it were never seen, so entries must have been read at or after it."""
        with self._lock:
            self._entries.clear()
            self._recent.clear()
            self._covered_from = watermark
            self.stream_lsn = max(self.stream_lsn, watermark)
            self.live = True

    def apply_changes(self, changes: Iterable[tuple[str, int]], watermark: int) -> int:
        """Users that changed (user id, LSN of the change), then the stream's new position."""
        dropped = 0
        with self._lock:
            for user_id, lsn in changes:
                entry = self._entries.get(user_id)
                if entry is not None and entry.history.data_lsn < lsn:
                    del self._entries[user_id]
                    dropped += 1
                if self._recent.get(user_id, 0) < lsn:
                    self._recent[user_id] = lsn
                    self._recent.move_to_end(user_id)
            while len(self._recent) > self.change_memory:
                _, forgotten = self._recent.popitem(last=False)
                self._covered_from = max(self._covered_from, forgotten)
            if watermark > self.stream_lsn:
                self.stream_lsn = watermark
            self.invalidations += dropped
        return dropped

    def set_live(self, live: bool) -> None:
        with self._lock:
            self.live = live

    def reset(self) -> None:
        """The feature store was rebuilt: nothing known holds any more."""
        with self._lock:
            self._entries.clear()
            self._recent.clear()
            self._covered_from = 0
            self.stream_lsn = 0
            self.live = False

    # ------------------------------------------------------------------ reporting
    def __len__(self) -> int:
        return len(self._entries)

    def status(self) -> dict:
        return {"user_cache_entries": len(self._entries), "user_stream_live": self.live,
                "user_stream_lsn": self.stream_lsn, "user_cache_invalidations": self.invalidations,
                "user_fetch_calls": self._misses.calls, "user_fetch_users": self._misses.batched_users}
