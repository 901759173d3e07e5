"""Id maps, histories, the leave-one-out split and next-item batching."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.contracts.event_types import EventType
from services.trainer.batching import collate_histories, collate_windows
from services.trainer.id_map import IdMap
from services.trainer.interaction_data import InteractionData, UserHistory
from services.trainer.leave_one_out import leave_one_out_split
from services.trainer.windows import TrainingExample, all_next_item_examples, group_into_windows


def _history(items: list[int], step: float = 10.0) -> UserHistory:
    return UserHistory(
        items=np.array(items, np.int64),
        events=np.full(len(items), int(EventType.PURCHASE), np.int64),
        timestamps=np.arange(len(items), dtype=np.float64) * step,
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=4), max_size=60))
def test_id_map_growth_never_collides(external_ids: list[str]) -> None:
    id_map = IdMap()
    assigned = {external: id_map.add(external) for external in external_ids}
    distinct = list(dict.fromkeys(external_ids))
    # contiguous 1..n in first-seen order, 0 never handed out, stable on re-add
    assert [assigned[e] for e in distinct] == list(range(1, len(distinct) + 1))
    assert all(id_map.add(e) == assigned[e] for e in external_ids)
    assert len(id_map) == len(distinct) and id_map.table_size == len(distinct) + 1
    restored = IdMap.from_json(id_map.to_json())
    assert all(restored.get(e) == assigned[e] for e in distinct)
    # growing the restored copy continues after the last index instead of reusing one
    assert restored.add("\x00never-seen-before") == len(distinct) + 1


def test_id_map_unknown_ids() -> None:
    id_map = IdMap(["a", "b"])
    assert id_map.get("zzz") == 0 and "zzz" not in id_map and id_map.external(2) == "b"


def test_history_append_keeps_time_order() -> None:
    data = InteractionData()
    data.add_interaction("u", "late", "purchase", 30.0)
    data.add_interaction("u", "early", EventType.VIEW, 10.0)
    data.add_interaction("u", "middle", 2, 20.0)
    history = data.histories[data.user_ids.get("u")]
    assert [data.item_ids.external(i) for i in history.items] == ["early", "middle", "late"]
    assert list(history.events) == [EventType.VIEW, EventType.CLICK, EventType.PURCHASE]
    data.ensure_item_text_rows()
    assert data.item_text.shape == (4, 384)


def test_leave_one_out_split() -> None:
    histories = {1: _history([5, 6, 7, 8]), 2: _history([9, 10])}
    split = leave_one_out_split(histories)
    assert list(split.train[1].items) == [5, 6]
    assert list(split.train[2].items) == [9, 10]  # too short to evaluate
    assert [(c.user, c.target_item, list(c.history.items)) for c in split.validation] == [(1, 7, [5, 6])]
    assert [(c.user, c.target_item, list(c.history.items)) for c in split.test] == [(1, 8, [5, 6, 7])]


def test_windows_cover_every_prefix_once_within_max_len() -> None:
    histories = {1: _history(list(range(1, 13))), 2: _history([3, 4])}
    examples = all_next_item_examples(histories)
    windows = group_into_windows(examples, max_len=4)
    covered = sorted((w.user, p) for w in windows for p in w.target_positions)
    assert covered == sorted((e.user, e.target_position) for e in examples)
    for window in windows:
        assert window.end - window.start <= 4
        assert all(window.start < p <= window.end for p in window.target_positions)
    # the latest target always gets the full max_len context
    last = max((w for w in windows if w.user == 1), key=lambda w: w.end)
    assert (last.start, last.end) == (7, 11)


def test_collate_windows_aligns_targets_with_their_prefix() -> None:
    histories = {1: _history([11, 12, 13, 14]), 2: _history([21, 22])}
    windows = group_into_windows(
        [TrainingExample(1, 2), TrainingExample(1, 3), TrainingExample(2, 1)], max_len=10
    )
    batch = collate_windows(windows, histories)
    by_user = {w.user: row for row, w in enumerate(windows)}
    row = by_user[1]
    assert list(batch.items[row]) == [11, 12, 13]
    assert list(batch.targets[row]) == [0, 13, 14]  # position 0 (predicting item 12) not selected
    row = by_user[2]
    assert list(batch.items[row]) == [0, 0, 21] and list(batch.targets[row]) == [0, 0, 22]
    # ages relative to the last target's time; each query age is the next event's age
    assert list(batch.ages[by_user[1]]) == [30.0, 20.0, 10.0]
    assert list(batch.query_ages[by_user[1]]) == [20.0, 10.0, 0.0]


def test_collate_histories_for_inference() -> None:
    batch = collate_histories([_history([1, 2, 3]), UserHistory.empty()], now=[100.0, 5.0], max_len=2)
    assert batch.items.tolist() == [[2, 3], [0, 0]]
    assert batch.ages[0].tolist() == [90.0, 80.0]
    assert batch.query_ages[0].tolist() == [80.0, 0.0]


def test_validation_and_test_inputs_are_built_alike() -> None:
    """The validation-vs-test gap on Beauty is not in how the inputs are built: both cases of a
    user see the last max_len events strictly before their target, aged against the target's
    own (synthetic) time, so the recency buckets follow the same pattern (one step for the most
    recent event), the last position predicts "now", nothing is masked, and a training window
    ending at the same target sees exactly what evaluation sees."""
    from scripts.datasets import BEAUTY_SYNTHETIC_STEP_SECONDS as step

    history = _history(list(range(1, 13)), step=step)
    split = leave_one_out_split({1: history})
    (validation,), (test,) = split.validation, split.test
    max_len = 5
    batches = [collate_histories([case.history], [case.target_time], max_len) for case in (validation, test)]
    for case, batch in zip((validation, test), batches):
        assert case.history.timestamps.max() < case.target_time
        assert batch.items[0].tolist() == case.history.items[-max_len:].tolist()
        assert batch.ages[0].tolist() == [step * k for k in range(max_len, 0, -1)]
        assert batch.query_ages[0].tolist() == [step * k for k in range(max_len - 1, -1, -1)]
    # a training window whose last target is the validation target sees the same inputs
    window = group_into_windows([TrainingExample(1, len(history) - 2)], max_len)[0]
    trained = collate_windows([window], {1: history})
    assert trained.items.tolist() == batches[0].items.tolist()
    assert trained.ages.tolist() == batches[0].ages.tolist()
    assert trained.query_ages.tolist() == batches[0].query_ages.tolist()
