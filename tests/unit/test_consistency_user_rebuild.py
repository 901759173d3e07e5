"""Rebuilding a user's state from the events table (services/features/user_rebuild.py) and the
applier's rule that makes it exact under the delta stream: events of transactions visible in
the rebuild's snapshot are not folded into that user again."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from services.contracts.event_row import EventRow
from services.features import user_state
from services.features.applier import ApplierSettings, fold_changes
from services.features.user_rebuild import Snapshot, fold_from_scratch, visible_in
from services.features.user_state import UserState

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def event(n: int, user: str = "u1", kind: str = "view") -> EventRow:
    search = kind == "search"
    return EventRow(event_id=f"e{n}", event_type=kind, user_id=user, item_id=None if search else f"i{n}",
                    query="q" if search else None, occurred_at=T0 + timedelta(minutes=n), row_id=n)


def test_snapshot_visibility():
    snap = Snapshot.parse("100:105:101,103")
    assert snap.visible(99) and snap.visible(102) and snap.visible(104)
    assert not snap.visible(101) and not snap.visible(103) and not snap.visible(105) and not snap.visible(200)
    assert not visible_in(None, 99) and not visible_in("100:105:", 0)


def test_snapshot_of_a_later_epoch_maps_32_bit_xids_back():
    epoch = 3 << 32
    snap = Snapshot.parse(f"{epoch + 10}:{epoch + 20}:")
    assert snap.visible(5) and snap.visible(15) and not snap.visible(25)
    assert snap.full_xid(0xFFFFFFF0) == epoch - 16           # the previous epoch's last xids


def test_fold_from_scratch_equals_the_streams_fold_in_any_arrival_order():
    events = [event(n, kind=["view", "click", "purchase", "search"][n % 4]) for n in range(12)]
    streamed = UserState("u1")
    for e in reversed(events):                                # arrival order does not matter
        user_state.apply_event(streamed, e, 50, history_length=5, recent_queries=3)
    settings = ApplierSettings(model_name="m", history_length=5, recent_queries=3)
    rebuilt = fold_from_scratch("u1", events, 50, settings)
    assert rebuilt.counters == streamed.counters and rebuilt.history == streamed.history
    assert [q.query for q in rebuilt.recent_queries] == [q.query for q in streamed.recent_queries]


def test_replayed_events_reach_item_statistics_but_not_the_rebuilt_user():
    settings = ApplierSettings(model_name="m", history_length=10, recent_queries=5,
                               popularity_half_life_s=3600)
    already, new = event(1), event(2)
    users = {"u1": fold_from_scratch("u1", [already], 40, settings)}
    records = {}
    fold_changes([already, new], 60, records, users, {}, settings, replayed={id(already)})
    assert users["u1"].counters == {"view": 2}                # once each, not three times
    assert records["i1"].stats.views == 1 and records["i2"].stats.views == 1
