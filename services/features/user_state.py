"""Per-user state kept current per event: recent history, counters, recent queries, and the
bounded set of every item of the whole history (for the ranker's seen / purchased filters).

Pure data and functions; the store loads a `UserState` from `user_features`, the applier folds
events into it and the store writes it back. History entries are kept in event-time order (most
recent last) because clients send timestamps that may arrive out of order; ties keep arrival
order. `event_row_id` (events.id) rides along so an entry can be traced to its source row.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice

from services.contracts.event_row import EventRow


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    event_type: str
    occurred_at: datetime
    event_row_id: int

    def to_json(self) -> dict:
        return {"item_id": self.item_id, "type": self.event_type,
                "ts": self.occurred_at.isoformat(), "event": self.event_row_id}

    @classmethod
    def from_json(cls, value: dict) -> "HistoryEntry":
        return cls(value["item_id"], value["type"], datetime.fromisoformat(value["ts"]),
                   int(value.get("event", 0)))


@dataclass(frozen=True)
class QueryEntry:
    query: str
    occurred_at: datetime

    def to_json(self) -> dict:
        return {"query": self.query, "ts": self.occurred_at.isoformat()}

    @classmethod
    def from_json(cls, value: dict) -> "QueryEntry":
        return cls(value["query"], datetime.fromisoformat(value["ts"]))


@dataclass
class UserState:
    user_id: str
    history: list[HistoryEntry] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    recent_queries: list[QueryEntry] = field(default_factory=list)
    updated_lsn: int = 0
    # Every distinct item of the whole history, least recently touched first -> purchased ever.
    # Bounded (FEATURES_SEEN_ITEMS): past the bound the least recently touched drop out.
    seen: dict[str, bool] = field(default_factory=dict)
    seen_truncated: bool = False

    def seen_to_json(self) -> list:
        return [[item_id, 1 if purchased else 0] for item_id, purchased in self.seen.items()]

    @staticmethod
    def seen_from_json(value) -> dict[str, bool]:
        return {str(entry[0]): bool(entry[1]) for entry in value or ()}


# Distinct items remembered per user for "exclude seen / purchased" (FEATURES_SEEN_ITEMS).
DEFAULT_SEEN_ITEMS = 1000


def remember_item(state: UserState, item_id: str, purchased: bool, limit: int) -> None:
    """Marks `item_id` as the user's most recently touched item (purchased once, purchased for
    good); keeps the `limit` most recently touched (0 = no limit)."""
    was_purchased = state.seen.pop(item_id, False)
    state.seen[item_id] = was_purchased or purchased
    if limit > 0 and len(state.seen) > limit:
        for forgotten in list(islice(state.seen, len(state.seen) - limit)):
            del state.seen[forgotten]
        state.seen_truncated = True


def insert_by_time(entries: list, entry, limit: int) -> None:
    """Inserts `entry` after every entry not later than it, then keeps the `limit` most recent.
    An event older than everything kept in a full list falls off at once."""
    times = [existing.occurred_at for existing in entries]
    entries.insert(bisect.bisect_right(times, entry.occurred_at), entry)
    if len(entries) > limit:
        del entries[: len(entries) - limit]


def apply_event(state: UserState, event: EventRow, lsn: int, *, history_length: int,
                recent_queries: int, seen_items: int = DEFAULT_SEEN_ITEMS) -> None:
    """Folds one event into the user's state. Not idempotent by itself: the applier guarantees
    each event is folded once (LSN high-water mark)."""
    state.counters[event.event_type] = state.counters.get(event.event_type, 0) + 1
    if event.event_type == "search":
        if event.query and recent_queries > 0:
            # A repeated query moves to its latest time instead of filling the list.
            previous = next((q for q in state.recent_queries if q.query == event.query), None)
            if previous is None or previous.occurred_at < event.occurred_at:
                state.recent_queries = [q for q in state.recent_queries if q.query != event.query]
                insert_by_time(state.recent_queries, QueryEntry(event.query, event.occurred_at),
                               recent_queries)
    elif event.item_id:
        insert_by_time(state.history, HistoryEntry(event.item_id, event.event_type, event.occurred_at,
                                                   event.row_id), history_length)
        remember_item(state, event.item_id, event.event_type == "purchase", seen_items)
    state.updated_lsn = max(state.updated_lsn, lsn)


def trim_history(history: list[HistoryEntry], max_entries: int) -> list[HistoryEntry]:
    """The `max_entries` most recent entries (0 = all)."""
    if max_entries <= 0 or max_entries >= len(history):
        return list(history)
    return history[-max_entries:]
