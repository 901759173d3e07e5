"""Incremental-update strategies: threshold, time window, priority + top share, replay (pure)."""
from __future__ import annotations

import pytest

from services.trainer.strategies import (NewInteraction, Strategy, priority_scores, replay_count, select,
                                         top_count)


def interaction(n: int, user: str = "u1", item: str = "i1", at: float | None = None) -> NewInteraction:
    return NewInteraction(key=n, user=user, item=item, occurred_at=1000.0 + n if at is None else at, seq=n)


def keys(selection) -> list:
    return [i.key for i in selection.selected]


def test_no_new_interactions_skips():
    selection = select([], Strategy(), as_of=0.0)
    assert selection.skipped and "no new interactions" in selection.reason


def test_threshold_skips_below_and_runs_at_the_threshold():
    new = [interaction(n) for n in range(5)]
    below = select(new, Strategy(threshold_events=6), as_of=2000.0)
    assert below.skipped and "below the threshold of 6" in below.reason and below.new_count == 5
    at = select(new, Strategy(threshold_events=5), as_of=2000.0)
    assert not at.skipped and sorted(keys(at)) == [0, 1, 2, 3, 4]


def test_without_priority_everything_new_is_selected():
    new = [interaction(n) for n in range(10)]
    selection = select(new, Strategy(), as_of=2000.0)
    assert len(selection.selected) == 10 and selection.summary()["selected_interactions"] == 10


def test_window_keeps_the_last_w_seconds_of_data_time():
    new = [interaction(n, at=t) for n, t in enumerate([100.0, 500.0, 899.0, 900.0, 1000.0])]
    selection = select(new, Strategy(window_seconds=100), as_of=1000.0)
    assert sorted(keys(selection)) == [3, 4]
    assert selection.in_window == 2 and selection.new_count == 5


def test_window_with_nothing_inside_skips():
    new = [interaction(n, at=10.0) for n in range(3)]
    selection = select(new, Strategy(window_seconds=5), as_of=1000.0)
    assert selection.skipped and "within the last 5s" in selection.reason


def test_threshold_counts_all_new_interactions_not_only_the_window():
    new = [interaction(n, at=t) for n, t in enumerate([10.0, 20.0, 995.0])]
    selection = select(new, Strategy(window_seconds=10, threshold_events=3), as_of=1000.0)
    assert not selection.skipped and keys(selection) == [2]


def test_recency_priority_takes_the_newest_share():
    new = [interaction(n) for n in range(10)]
    selection = select(new, Strategy(priority="recency", top_share=0.3), as_of=2000.0)
    assert keys(selection) == [9, 8, 7]


def test_item_novelty_prefers_new_then_rare_items():
    new = [interaction(0, item="popular"), interaction(1, item="rare"), interaction(2, item="brand-new")]
    selection = select(new, Strategy(priority="item_novelty", top_share=2 / 3), as_of=2000.0,
                       old_item_counts={"popular": 50, "rare": 1})
    assert keys(selection) == [2, 1]


def test_user_activity_prefers_the_most_active_users():
    new = ([interaction(n, user="busy") for n in range(4)] + [interaction(10, user="quiet")]
           + [interaction(n, user="medium") for n in range(20, 22)])
    selection = select(new, Strategy(priority="user_activity", top_share=4 / 7), as_of=2000.0)
    assert {i.user for i in selection.selected} == {"busy"}
    scores = priority_scores(new, "user_activity", {})
    assert scores[0] == 4.0 and scores[4] == 1.0 and scores[5] == 2.0


def test_strategies_combine_in_order_threshold_window_priority():
    new = [interaction(n, item=f"i{n % 3}", at=900.0 + n * 10) for n in range(10)]
    strategy = Strategy(window_seconds=50, threshold_events=10, priority="item_novelty", top_share=0.5)
    selection = select(new, strategy, as_of=1000.0, old_item_counts={"i0": 9, "i1": 0, "i2": 3})
    # window keeps at >= 950: n = 5..9 (items i2, i0, i1, i2, i0); novelty: i1 > i2 > i0; top 3 of 5
    assert keys(selection) == [7, 8, 5]
    assert strategy.name == "window+threshold+priority"


def test_ties_are_broken_by_recency_then_seq_deterministically():
    new = [NewInteraction(key=k, user="u", item="x", occurred_at=5.0, seq=k) for k in (3, 1, 2)]
    assert keys(select(new, Strategy(priority="item_novelty"), as_of=5.0)) == [3, 2, 1]


def test_top_share_keeps_at_least_one_and_rounds_up():
    assert top_count(0, 0.5) == 0
    assert top_count(3, 0.01) == 1
    assert top_count(10, 0.25) == 3
    assert top_count(10, 1.0) == 10
    assert top_count(10, 0.3) == 3


def test_replay_count_is_ratio_times_selected_capped_by_what_exists():
    assert replay_count(10, 1.0, 1000) == 10
    assert replay_count(10, 2.5, 1000) == 25
    assert replay_count(10, 2.0, 7) == 7
    assert replay_count(10, 0.0, 1000) == 0


@pytest.mark.parametrize("strategy, field", [
    (Strategy(window_seconds=-1), "window_seconds"),
    (Strategy(threshold_events=-1), "threshold_events"),
    (Strategy(priority="loudest"), "priority"),
    (Strategy(top_share=0.0), "top_share"),
    (Strategy(top_share=1.5), "top_share"),
    (Strategy(top_share=float("nan")), "top_share"),
    (Strategy(replay_ratio=-0.5), "replay_ratio"),
])
def test_invalid_parameters_name_the_field(strategy, field):
    with pytest.raises(ValueError, match=field):
        strategy.validate()


def test_strategy_names_and_round_trip():
    assert Strategy().name == "all-new"
    assert Strategy(window_seconds=60).name == "window"
    assert Strategy(threshold_events=5, priority="recency").name == "threshold+priority"
    strategy = Strategy(window_seconds=60, threshold_events=5, priority="recency", top_share=0.5, replay_ratio=2.0)
    assert Strategy.from_dict({**strategy.to_dict(), "seed": 3}) == strategy
