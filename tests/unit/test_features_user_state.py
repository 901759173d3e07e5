"""Per-user state: history trimming and ordering, counters, recent queries (pure)."""
from datetime import datetime, timedelta, timezone

from services.contracts.event_row import EventRow
from services.features.user_state import HistoryEntry, QueryEntry, UserState, apply_event, trim_history

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def event(row_id, kind="view", item="i1", query=None, at=None, user="u1"):
    return EventRow(f"e{row_id}", kind, user, None if kind == "search" else item, query,
                    at or T0 + timedelta(seconds=row_id), row_id=row_id)


def fold(state, events, history_length=50, recent_queries=20):
    for e in events:
        apply_event(state, e, lsn=100 + e.row_id, history_length=history_length,
                    recent_queries=recent_queries)
    return state


def test_history_keeps_the_last_n_most_recent_last():
    state = fold(UserState("u1"), [event(i, item=f"i{i}") for i in range(1, 8)], history_length=5)
    assert [h.item_id for h in state.history] == ["i3", "i4", "i5", "i6", "i7"]
    assert state.counters == {"view": 7}
    assert state.updated_lsn == 107


def test_late_event_is_placed_by_its_time():
    state = fold(UserState("u1"), [event(1, item="a"), event(3, item="c"),
                                   event(2, item="b", at=T0 + timedelta(seconds=2))])
    assert [h.item_id for h in state.history] == ["a", "b", "c"]


def test_event_older_than_a_full_history_only_counts():
    state = fold(UserState("u1"), [event(i, item=f"i{i}") for i in range(10, 13)], history_length=3)
    fold(state, [event(1, item="old", at=T0)], history_length=3)
    assert [h.item_id for h in state.history] == ["i10", "i11", "i12"]
    assert state.counters["view"] == 4


def test_equal_times_keep_arrival_order():
    state = fold(UserState("u1"), [event(1, item="a", at=T0), event(2, item="b", at=T0)])
    assert [h.item_id for h in state.history] == ["a", "b"]


def test_counters_by_type_and_searches_stay_out_of_history():
    state = fold(UserState("u1"), [event(1, "view"), event(2, "purchase"), event(3, "purchase"),
                                   event(4, "search", query="red lipstick")])
    assert state.counters == {"view": 1, "purchase": 2, "search": 1}
    assert [h.event_type for h in state.history] == ["view", "purchase", "purchase"]
    assert [q.query for q in state.recent_queries] == ["red lipstick"]


def test_recent_queries_are_distinct_bounded_and_most_recent_last():
    searches = [event(i, "search", query=q) for i, q in enumerate(["a", "b", "c", "a", "d"], start=1)]
    state = fold(UserState("u1"), searches, recent_queries=3)
    assert [q.query for q in state.recent_queries] == ["c", "a", "d"]


def test_a_late_repeat_of_a_query_does_not_move_it_back():
    state = fold(UserState("u1"), [event(5, "search", query="x"), event(6, "search", query="y")])
    fold(state, [event(1, "search", query="x", at=T0)])
    assert [q.query for q in state.recent_queries] == ["x", "y"]
    assert state.recent_queries[0].occurred_at == T0 + timedelta(seconds=5)


def test_zero_recent_queries_keeps_none():
    state = fold(UserState("u1"), [event(1, "search", query="x")], recent_queries=0)
    assert state.recent_queries == [] and state.counters == {"search": 1}


def test_trim_history():
    history = [HistoryEntry(f"i{i}", "view", T0, i) for i in range(5)]
    assert [h.item_id for h in trim_history(history, 2)] == ["i3", "i4"]
    assert trim_history(history, 0) == history
    assert trim_history(history, 10) == history


def test_json_round_trip():
    entry = HistoryEntry("i1", "purchase", T0, 7)
    assert HistoryEntry.from_json(entry.to_json()) == entry
    query = QueryEntry("rose", T0)
    assert QueryEntry.from_json(query.to_json()) == query
