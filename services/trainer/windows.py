"""Next-item training examples, and their packing into windows of one user's history (one
causal-encoder pass serves several examples)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from services.trainer.interaction_data import UserHistory


@dataclass(frozen=True)
class TrainingExample:
    """Predict ``history.items[target_position]`` from everything before it."""

    user: int
    target_position: int


@dataclass(frozen=True)
class TrainingWindow:
    """A contiguous slice of one user's history fed through the causal encoder.

    Inputs are positions ``[start, end)``; the output at input position ``p``
    predicts position ``p + 1``. Only positions listed in ``target_positions``
    (all within ``(start, end]``) contribute to the loss, so one window serves
    several prefix examples at the cost of a single encoder pass.
    """

    user: int
    start: int
    end: int
    target_positions: tuple[int, ...]


def all_next_item_examples(histories: dict[int, UserHistory]) -> list[TrainingExample]:
    """Every prefix of every sequence: targets at positions 1..len-1."""
    return [
        TrainingExample(user, position)
        for user in sorted(histories)
        for position in range(1, len(histories[user]))
    ]


def group_into_windows(
    examples: Iterable[TrainingExample], max_len: int
) -> list[TrainingWindow]:
    """Pack examples into as few windows as possible, each with <= max_len inputs.

    Working backwards from a user's latest target, a window ending right before
    it covers every other target within the previous ``max_len`` positions with
    at most ``max_len`` items of context, exactly the context a per-example
    truncation would give for the latest one and at least
    ``min(position, max_len - distance)`` for the others.
    """
    positions_by_user: dict[int, list[int]] = {}
    for example in examples:
        if example.target_position < 1:
            continue  # nothing to condition on
        positions_by_user.setdefault(example.user, []).append(example.target_position)
    windows: list[TrainingWindow] = []
    for user in sorted(positions_by_user):
        remaining = sorted(set(positions_by_user[user]))
        while remaining:
            last_target = remaining[-1]
            start = max(0, last_target - max_len)
            covered = tuple(p for p in remaining if p > start)
            remaining = [p for p in remaining if p <= start]
            windows.append(TrainingWindow(user, start, last_target, covered))
    return windows
