"""Full-ranking metrics on hand-made rankings and the popularity baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.contracts.event_types import EventType
from services.trainer.interaction_data import UserHistory
from services.trainer.leave_one_out import EvalCase
from services.trainer.evaluation import (
    evaluate_popularity,
    metrics_from_ranks,
    popularity_counts,
    target_ranks,
)


def _case(target: int, seen: list[int]) -> EvalCase:
    history = UserHistory(
        np.array(seen, np.int64),
        np.full(len(seen), int(EventType.PURCHASE), np.int64),
        np.arange(len(seen), dtype=np.float64),
    )
    return EvalCase(user=1, history=history, target_item=target, target_time=float(len(seen)))


def test_target_ranks_counts_higher_scores_and_breaks_ties_by_index() -> None:
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.7, 0.5], [0.0, 0.1, 0.1, 0.1, 0.2]])
    ranks = target_ranks(scores, torch.tensor([2, 3]))
    # row 0: 0.9, 0.7 are higher; the tie at index 4 comes after index 2 -> rank 2
    # row 1: 0.2 higher, ties at indexes 1 and 2 come first -> rank 3
    assert ranks.tolist() == [2, 3]


def test_metrics_on_hand_made_ranks() -> None:
    ranks = np.array([0, 3, 4, 7, 12])
    figures = metrics_from_ranks(ranks)
    assert figures["recall_at_5"] == pytest.approx(3 / 5)
    assert figures["recall_at_10"] == pytest.approx(4 / 5)
    ndcg_at_5 = (1.0 + 1.0 / math.log2(5) + 1.0 / math.log2(6)) / 5
    assert figures["ndcg_at_5"] == pytest.approx(ndcg_at_5)
    assert figures["ndcg_at_10"] == pytest.approx(ndcg_at_5 + 1.0 / math.log2(9) / 5)


def test_popularity_baseline_with_and_without_history_mask() -> None:
    # items 1..12; popularity order 1 > 2 > 3 > ... (counts 12, 11, ...)
    counts = np.zeros(13)
    counts[1:] = np.arange(12, 0, -1)
    cases = [_case(target=3, seen=[1]), _case(target=12, seen=[])]
    figures = evaluate_popularity(cases, counts)
    # case 0: rank 2 (items 1, 2 ahead); case 1: rank 11 -> outside top 10
    assert figures["recall_at_5"] == pytest.approx(0.5)
    assert figures["ndcg_at_5"] == pytest.approx(0.5 / math.log2(4))
    masked = evaluate_popularity(cases, counts, mask_history=True)
    assert masked["ndcg_at_5"] == pytest.approx(0.5 / math.log2(3))  # item 1 seen -> rank 1


def test_popularity_counts_ignore_padding() -> None:
    counts = popularity_counts([_case(1, [2, 2, 3]).history, _case(1, [0, 3]).history], table_size=4)
    assert counts.tolist() == [0.0, 0.0, 2.0, 2.0]
