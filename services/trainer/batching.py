"""Model input batches: training windows and inference histories as left-padded arrays, and
shuffled minibatches of windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from services.trainer.interaction_data import UserHistory
from services.trainer.windows import TrainingWindow


@dataclass
class SequenceBatch:
    """Left-padded model inputs; column -1 is the most recent input event.

    ``ages`` are seconds between each input event and the batch row's
    reference time; ``query_ages`` give, per position, the age of the moment the
    prediction at that position is made for (the next event's age in training,
    0 = "now" at inference). ``targets`` holds the item to predict at each
    position, 0 where that position is not a training target.
    """

    items: np.ndarray  # [b, t] int64
    events: np.ndarray  # [b, t] int64
    ages: np.ndarray  # [b, t] float32
    query_ages: np.ndarray  # [b, t] float32
    targets: np.ndarray  # [b, t] int64

    @classmethod
    def zeros(cls, rows: int, width: int) -> "SequenceBatch":
        """All padding: every row empty."""
        shape = (rows, width)
        return cls(items=np.zeros(shape, np.int64), events=np.zeros(shape, np.int64),
                   ages=np.zeros(shape, np.float32), query_ages=np.zeros(shape, np.float32),
                   targets=np.zeros(shape, np.int64))

    @property
    def padding_mask(self) -> np.ndarray:
        return self.items == 0


def collate_windows(
    windows: Sequence[TrainingWindow], histories: dict[int, UserHistory]
) -> SequenceBatch:
    """Build a batch padded to the longest window in it (not to max_len)."""
    width = max(window.end - window.start for window in windows)
    batch = SequenceBatch.zeros(len(windows), width)
    for row, window in enumerate(windows):
        history = histories[window.user]
        length = window.end - window.start
        columns = slice(width - length, width)
        # Reference = time of the last target, so ages stay small and >= 0.
        reference_time = history.timestamps[window.end]
        batch.items[row, columns] = history.items[window.start : window.end]
        batch.events[row, columns] = history.events[window.start : window.end]
        batch.ages[row, columns] = reference_time - history.timestamps[window.start : window.end]
        batch.query_ages[row, columns] = (
            reference_time - history.timestamps[window.start + 1 : window.end + 1]
        )
        for position in window.target_positions:
            batch.targets[row, width - 1 - (window.end - position)] = history.items[position]
    return batch


def collate_histories(
    histories: Sequence[UserHistory], now: Sequence[float], max_len: int
) -> SequenceBatch:
    """Inference batch: the last ``max_len`` events of each history, aged vs ``now``.

    Empty histories give an all-padding row; the model then falls back to its
    "no history" vector.
    """
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    batch = SequenceBatch.zeros(len(histories), width)
    for row, (history, now_time) in enumerate(zip(histories, now)):
        recent = history.items[-max_len:]
        length = len(recent)
        if length == 0:
            continue
        columns = slice(width - length, width)
        ages = (now_time - history.timestamps[-length:]).astype(np.float32)
        batch.items[row, columns] = recent
        batch.events[row, columns] = history.events[-length:]
        batch.ages[row, columns] = ages
        # Position p predicts what followed it: its query moment is the next
        # event's time; the last position predicts "now".
        batch.query_ages[row, columns] = np.append(ages[1:], 0.0)
    return batch


def iterate_minibatches(
    windows: Sequence[TrainingWindow], batch_size: int, rng: np.random.Generator
) -> Iterator[list[TrainingWindow]]:
    """Shuffled minibatches of windows, grouped loosely by length.

    Sorting inside large shuffled chunks keeps padding low (Beauty sequences are
    mostly short) while every epoch still sees a different order.
    """
    order = rng.permutation(len(windows))
    chunk = batch_size * 50
    batches: list[list[TrainingWindow]] = []
    for chunk_start in range(0, len(order), chunk):
        chunk_windows = [windows[i] for i in order[chunk_start : chunk_start + chunk]]
        chunk_windows.sort(key=lambda w: w.end - w.start)
        batches.extend(
            chunk_windows[i : i + batch_size] for i in range(0, len(chunk_windows), batch_size)
        )
    for index in rng.permutation(len(batches)):
        yield batches[index]
