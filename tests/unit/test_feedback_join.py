"""The feedback join without servers: events meet their impressions in stream order (held when
the impression comes later, counted when it never comes), redeliveries and the rebuild's overlap
are counted once, a restart in the middle of a stream ends with the same window as no restart;
the canary evaluation; OnlineMetrics' request checks."""
from __future__ import annotations

import math
import random
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.consistency.online import OnlineMetricsCore
from services.feedback.evaluation import COLLECTING, NO_CANARY, CanaryEvaluator
from services.feedback.join import (DUPLICATE, MALFORMED, FeedbackJoin, event_of_row, impression_of_row,
                                    seconds_of)
from services.feedback.online_metrics import (ATTRIBUTED, ITEM_NOT_SHOWN, NO_IMPRESSION, OTHER_TYPE, Counters,
                                              OnlineMetrics, position_gain)
from services.feedback.policy import ABORT, PROMOTE, CanaryPolicyConfig
from services.feedback.recommendation_id import EVENT_ATTRIBUTE

T0 = 1_800_000_000.0


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def impression_row(rid: str, version: int = 3, variant: str = "canary", items=("a", "b", "c"), at: float = T0):
    return {"recommendation_id": rid, "model_version": version, "variant": variant, "user_id": "u",
            "item_ids": list(items), "shown_at": _rfc3339(at), "kind": "recommend"}


def event_row(event_id: str, rid: str | None, kind: str = "click", item: str = "b", at: float = T0 + 5):
    attributes = {EVENT_ATTRIBUTE: rid} if rid else {}
    return {"event_id": event_id, "event_type": kind, "item_id": item, "occurred_at": _rfc3339(at),
            "attributes": attributes}


def new_join(hold_s: float = 10.0, **kwargs) -> FeedbackJoin:
    return FeedbackJoin(OnlineMetrics(window_s=3600, bucket_s=60, attribution_s=1800), hold_s=hold_s, **kwargs)


def totals(join: FeedbackJoin, now: float = T0 + 60) -> dict:
    """The window's figures (the gain rounded: sums taken in another order differ in the last bit)."""
    return {key: dict(counters.to_dict(), ndcg=round(counters.to_dict()["ndcg"], 12))
            for key, counters in join.metrics.window(now).items()}


def test_rows_from_the_stream_and_from_sql_read_alike():
    moment = datetime.fromtimestamp(T0 + 0.25, timezone.utc)
    assert seconds_of(moment) == seconds_of(_rfc3339(T0 + 0.25)) == pytest.approx(T0 + 0.25)
    sql_row = dict(impression_row("r1"), shown_at=moment)
    assert impression_of_row(sql_row).shown_at == pytest.approx(T0 + 0.25)
    assert impression_of_row(impression_row("r1")).item_ids == ("a", "b", "c")
    assert event_of_row(event_row("e1", None)) is None                 # no answer named: not ours
    assert event_of_row(event_row("e1", "r1")).recommendation_id == "r1"


def test_an_event_before_its_impression_is_held_then_attributed():
    join = new_join()
    join.apply(100, [("events", event_row("e1", "r1", "click", "b"))], T0 + 5)
    assert join.held == 1 and not totals(join)
    join.apply(200, [("impressions", impression_row("r1"))], T0 + 6)       # the flush, a second later
    assert join.held == 0 and join.counts[ATTRIBUTED] == 1
    canary = totals(join)[(3, "canary")]
    assert canary["impressions"] == 1 and canary["ctr"] == 1.0
    assert canary["ndcg"] == pytest.approx(position_gain(1)) and canary["clicks_at"] == {"1": 1}


def test_an_event_and_its_impression_in_one_batch_meet():
    join = new_join()
    join.apply(100, [("events", event_row("e1", "r1", "purchase", "c")), ("impressions", impression_row("r1"))],
               T0 + 5)
    assert join.held == 0 and totals(join)[(3, "canary")]["purchase_rate"] == 1.0


def test_an_impression_that_never_comes_is_counted_after_the_hold_and_only_as_the_stream_moves():
    join = new_join(hold_s=10)
    join.apply(100, [("events", event_row("e1", "r-lost"))], T0 + 5)
    join.progressed(T0 + 14)
    assert join.held == 1 and join.counts[NO_IMPRESSION] == 0          # still within its hold
    # No batch and no caught-up heartbeat: the hold does not end by the clock alone.
    assert join.held == 1
    join.progressed(T0 + 16)
    assert join.held == 0 and join.counts[NO_IMPRESSION] == 1
    join.apply(200, [("impressions", impression_row("r-lost"))], T0 + 17)   # too late: not attributed
    assert join.counts[ATTRIBUTED] == 0 and totals(join)[(3, "canary")]["clicked"] == 0


def test_holds_are_bounded_and_what_overflows_is_counted():
    join = new_join(max_held=2)
    join.apply(100, [("events", event_row(f"e{n}", f"r{n}")) for n in range(3)], T0 + 5)
    assert join.held == 2 and join.counts[NO_IMPRESSION] == 1


def test_unattributable_events_are_counted_by_reason():
    join = new_join()
    join.apply(100, [("impressions", impression_row("r1"))], T0 + 1)
    join.apply(200, [("events", event_row("e1", "r1", "click", "zzz")),
                     ("events", event_row("e2", "r1", "search", "b")),
                     ("events", event_row("e3", None)),
                     ("events", {"event_id": "e4", "attributes": {EVENT_ATTRIBUTE: "r1"}, "event_type": "click"}),
                     ("impressions", {"recommendation_id": "r9", "variant": "nope"})], T0 + 5)
    assert join.counts[ITEM_NOT_SHOWN] == 1 and join.counts[OTHER_TYPE] == 1 and join.counts[MALFORMED] == 2
    assert join.counts[ATTRIBUTED] == 0 and join.held == 0


def test_a_redelivered_batch_is_skipped():
    join = new_join()
    batch = [("impressions", impression_row("r1")), ("events", event_row("e1", "r1"))]
    assert join.apply(100, batch, T0 + 5)
    assert not join.apply(100, batch, T0 + 6)
    assert totals(join)[(3, "canary")]["impressions"] == 1 and join.counts[ATTRIBUTED] == 1


def test_the_rebuild_overlap_is_counted_once():
    join = new_join()
    join.seed([impression_row("r1")], [event_row("e1", "r1")], fence_lsn=500, now=T0 + 10)
    assert join.fenced and join.counts[ATTRIBUTED] == 1
    # The stream resumes from the group's confirmed position (below the fence): redelivered rows
    # the rebuild read are dropped, a row it did not see (committed just before the fence, not yet
    # visible to its snapshot) is counted.
    join.apply(400, [("impressions", impression_row("r1")), ("events", event_row("e1", "r1"))], T0 + 11)
    join.apply(450, [("events", event_row("e2", "r1", "add_to_cart"))], T0 + 11)
    assert join.counts[DUPLICATE] == 2 and join.counts[ATTRIBUTED] == 2
    join.apply(600, [("impressions", impression_row("r2"))], T0 + 12)        # past the fence
    assert not join.fenced
    canary = totals(join)[(3, "canary")]
    assert canary["impressions"] == 2 and canary["clicked"] == 1 and canary["carts"] == 1


def test_a_restarted_snapshot_is_counted_once():
    join = new_join()
    join.seed([], [], fence_lsn=50, now=T0 + 10)
    rows = [("impressions", impression_row("r1")), ("events", event_row("e1", "r1"))]
    join.apply(10, rows[:1], T0 + 10, snapshot=True, snapshot_begin=True)
    # The snapshot was not acked to its end: the collector starts it over on a new slot.
    join.apply(10, rows[:1], T0 + 10, snapshot=True, snapshot_begin=True)
    join.apply(20, rows[1:], T0 + 10, snapshot=True, snapshot_end=True)
    assert join.fenced                                   # the stream has not passed the snapshot yet
    join.apply(900, [("impressions", impression_row("r2"))], T0 + 11)
    assert not join.fenced
    canary = totals(join)[(3, "canary")]
    assert canary["impressions"] == 2 and canary["clicked"] == 1 and join.counts[ATTRIBUTED] == 1


def test_window_excludes_rows_older_than_it():
    join = new_join()
    join.apply(100, [("impressions", impression_row("old", at=T0 - 7200)),
                     ("events", event_row("e-old", "old", at=T0 - 7190))], T0)
    assert not totals(join, T0) and join.held == 0


def _random_stream(seed: int, batches: int = 60):
    """Batches (commit_lsn, rows) of a shop: answers shown, some clicked/bought, often before
    the impression's flush; some impressions lost."""
    rng = random.Random(seed)
    stream, pending, lsn = [], [], 0
    for n in range(batches):
        lsn += rng.randint(1, 50)
        rows = []
        for k in range(rng.randint(0, 4)):
            rid, variant = f"r{n}-{k}", rng.choice(["current", "canary"])
            version = 4 if variant == "current" else 5
            items = tuple(rng.sample("abcdefgh", 4))
            at = T0 + n
            if rng.random() < 0.6:
                rows.append(("events", event_row(f"e{n}-{k}", rid, rng.choice(["click", "view", "purchase"]),
                                                 rng.choice(items), at + 0.5)))
            if rng.random() < 0.95:                                   # 5% of impressions lost
                pending.append((n + rng.randint(0, 2), ("impressions", impression_row(rid, version, variant,
                                                                                      items, at))))
        rows += [row for due, row in pending if due == n]
        pending = [(due, row) for due, row in pending if due != n]
        stream.append((lsn, rows, T0 + n + 1))
    return stream


@pytest.mark.parametrize("seed", range(8))
def test_a_restart_in_the_middle_ends_with_the_window_of_no_restart(seed):
    stream = _random_stream(seed)
    reference = new_join(hold_s=5)
    for lsn, rows, now in stream:
        reference.apply(lsn, rows, now)
    rng = random.Random(1000 + seed)
    acked = rng.randint(0, len(stream) - 2)          # the last batch the slot confirmed before the crash
    visible = rng.randint(acked, len(stream) - 1)    # what the rebuild's snapshot sees (>= acked)
    restarted = new_join(hold_s=5)
    fence = stream[visible][0] + rng.randint(0, 1)
    # The tables as of the rebuild: every row of the batches the snapshot sees ...
    impressions = [row for _, rows, _ in stream[:visible + 1] for table, row in rows if table == "impressions"]
    events = [row for _, rows, _ in stream[:visible + 1] for table, row in rows if table == "events"]
    # ... except one transaction just below the fence that committed too late for the snapshot.
    if visible > acked + 1:
        invisible = {id(row) for _, row in stream[visible][1]}
        impressions = [row for row in impressions if id(row) not in invisible]
        events = [row for row in events if id(row) not in invisible]
    restarted.seed(impressions, events, fence, stream[visible][2])
    for lsn, rows, now in stream[acked + 1:]:        # redelivered from the confirmed position
        restarted.apply(lsn, rows, now)
    final = stream[-1][2] + 100
    reference.progressed(final)
    restarted.progressed(final)
    assert totals(restarted, final) == totals(reference, final)
    assert restarted.counts[ATTRIBUTED] == reference.counts[ATTRIBUTED]
    assert restarted.counts[NO_IMPRESSION] == reference.counts[NO_IMPRESSION]
    assert not restarted.fenced


# ---------------------------------------------------------------------------- the canary's look

def _window(current: tuple[int, int], canary: tuple[int, int]) -> dict:
    return {(4, "current"): Counters(impressions=current[0], clicked=current[1]),
            (5, "canary"): Counters(impressions=canary[0], clicked=canary[1])}


def test_the_evaluation_promotes_a_clearly_better_canary_and_aborts_a_clearly_worse_one():
    evaluator = CanaryEvaluator(CanaryPolicyConfig(min_impressions=500))
    better = evaluator.evaluate(_window((5000, 250), (5000, 500)), 4, 5, T0)
    assert better.state == PROMOTE and better.tested and better.p_value < 0.05 and better.effect > 0
    worse = CanaryEvaluator(CanaryPolicyConfig()).evaluate(_window((5000, 500), (5000, 250)), 4, 5, T0)
    assert worse.state == ABORT and worse.effect < 0
    few = evaluator.evaluate(_window((5000, 250), (100, 50)), 4, 6, T0)
    assert few.state == COLLECTING and not few.tested and "collecting" in few.reason
    assert evaluator.evaluate({}, 4, 0, T0).state == NO_CANARY


def test_the_always_valid_p_value_is_the_running_minimum():
    evaluator = CanaryEvaluator(CanaryPolicyConfig(min_impressions=100, alpha=0.001))
    first = evaluator.evaluate(_window((2000, 100), (2000, 130)), 4, 5, T0)
    second = evaluator.evaluate(_window((2000, 100), (2000, 100)), 4, 5, T0 + 30)
    assert first.state == second.state == COLLECTING
    assert second.p_value == first.p_value < 1.0


# ---------------------------------------------------------------------------- the request

class _FakeFeedback:
    settings = SimpleNamespace(window_s=3600.0, attribution_s=1800.0)

    def __init__(self):
        self.join = new_join()
        self.join.apply(100, [("impressions", impression_row("r1", 4, "current")),
                              ("impressions", impression_row("r2", 5, "canary"))], T0)

    def window(self, span):
        return self.join.metrics.window(T0 + 10, span)

    def status(self):
        return True, ""

    def clock(self):
        return T0 + 10


def test_online_metrics_requests_are_checked_naming_the_field():
    core = OnlineMetricsCore(_FakeFeedback(), None, SimpleNamespace(last_canary_decision=lambda: None))
    for window_s in (-1.0, math.nan, math.inf, 3601.0):
        with pytest.raises(InvalidArgument, match="window_s"):
            core.report(window_s, 0, "")
    with pytest.raises(InvalidArgument, match="variant"):
        core.report(0, 0, "blue")
    report = core.report(0, 0, "")
    assert [(v, name, c.impressions) for v, name, c in report.variants] == [(4, "current", 1), (5, "canary", 1)]
    assert [v for v, _, _ in core.report(600, 5, "").variants] == [5]
    assert [name for _, name, _ in core.report(0, 0, "current").variants] == ["current"]
    off = OnlineMetricsCore(None, None, None, off_reason="COLLECTOR_ADDRESS is unset")
    with pytest.raises(FailedPrecondition, match="COLLECTOR_ADDRESS"):
        off.report(0, 0, "")
