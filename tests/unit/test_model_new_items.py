"""The new-item slots rule (services/model/new_items.py), shared by the ranker and the benchmark."""
import pytest

import numpy as np

from services.model.new_items import new_item_candidates, reserve_new_item_slots

RANKED = ["a", "b", "c", "d", "e", "f"]


def test_the_best_new_items_take_the_last_places():
    assert reserve_new_item_slots(RANKED, ["x", "y", "z"], 5, 2) == ["a", "b", "c", "x", "y"]
    assert reserve_new_item_slots(RANKED, ["x"], 5, 1) == ["a", "b", "c", "d", "x"]


def test_a_new_item_already_ranked_high_stays_and_the_next_one_gets_the_place():
    # "b" is new and in the head anyway; "x" takes the place.
    assert reserve_new_item_slots(RANKED, ["b", "x"], 5, 1) == ["a", "b", "c", "d", "x"]


def test_a_new_item_ranked_just_below_the_head_moves_to_its_slot():
    assert reserve_new_item_slots(RANKED, ["e"], 5, 1) == ["a", "b", "c", "d", "e"]
    assert reserve_new_item_slots(RANKED, ["f", "e"], 5, 2) == ["a", "b", "c", "f", "e"]


def test_fewer_candidates_than_slots_leave_the_places_to_the_ranking():
    assert reserve_new_item_slots(RANKED, ["x"], 5, 3) == ["a", "b", "c", "d", "x"]
    assert reserve_new_item_slots(RANKED, ["b"], 5, 3) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("k, slots", [(1, 1), (3, 3), (5, 0), (5, -1)])
def test_no_slot_when_the_answer_is_too_short_or_slots_are_off(k, slots):
    assert reserve_new_item_slots(RANKED, ["x"], k, slots) == RANKED[:k]


def test_no_candidates_is_the_plain_ranking_and_nothing_repeats():
    assert reserve_new_item_slots(RANKED, [], 4, 1) == RANKED[:4]
    served = reserve_new_item_slots(RANKED[:3], ["x", "x", "a"], 5, 2)
    assert served == ["a", "b", "c", "x"] and len(set(served)) == len(served)


def test_candidates_are_the_most_popular_items_with_traction():
    ids = np.array([5, 6, 7, 8, 9])
    popularity = np.array([0.0, 3.0, 9.0, 3.0, 1.0])
    assert new_item_candidates(ids, popularity).tolist() == [7, 6, 8, 9]      # 0 = no traction; ties by id
    assert new_item_candidates(ids, popularity, limit=2).tolist() == [7, 6]
    assert new_item_candidates(np.zeros(0, np.int64), np.zeros(0)).size == 0
