"""What the model learns from, in memory: each user's history and the id maps and text vectors.

Conventions shared with :mod:`services.model.network`:

* Item and user indexes are contiguous ints starting at 1; index 0 is reserved
  (padding in sequences, "no learned id" in the item-id embedding table).
* Event types are small ints (:class:`EventType`), 0 = padding.
* Timestamps are seconds (float). Ages are "seconds before the prediction time".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.contracts.event_types import EventType
from services.trainer.id_map import IdMap


@dataclass
class UserHistory:
    """One user's interactions in time order, as parallel numpy arrays."""

    items: np.ndarray  # int64 item indexes
    events: np.ndarray  # int64 EventType values
    timestamps: np.ndarray  # float64 seconds

    @classmethod
    def empty(cls) -> "UserHistory":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def head(self, length: int) -> "UserHistory":
        """The first ``length`` interactions (negative = drop from the end)."""
        return UserHistory(self.items[:length], self.events[:length], self.timestamps[:length])

    def append(self, item: int, event: int, timestamp: float) -> None:
        """Insert keeping time order; equal timestamps keep arrival order."""
        position = int(np.searchsorted(self.timestamps, timestamp, side="right"))
        self.items = np.insert(self.items, position, item)
        self.events = np.insert(self.events, position, event)
        self.timestamps = np.insert(self.timestamps, position, timestamp)


@dataclass
class InteractionData:
    """All interactions plus the id maps and per-item text vectors.

    ``item_text`` has one row per item index (row 0 unused, zeros); services
    fill it from :class:`services.common.text_encoder.TextEncoder`.
    """

    item_ids: IdMap = field(default_factory=IdMap)
    user_ids: IdMap = field(default_factory=IdMap)
    histories: dict[int, UserHistory] = field(default_factory=dict)
    item_text: np.ndarray = field(default_factory=lambda: np.zeros((1, 384), np.float32))

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def add_interaction(
        self, user_id: str, item_id: str, event: EventType | str | int, timestamp: float
    ) -> tuple[int, int]:
        """Record one event (growing the id maps); return (user index, item index)."""
        user_index = self.user_ids.add(user_id)
        item_index = self.item_ids.add(item_id)
        history = self.histories.setdefault(user_index, UserHistory.empty())
        history.append(item_index, int(EventType.parse(event)), float(timestamp))
        return user_index, item_index

    def set_item_text(self, item_index: int, vector: np.ndarray) -> None:
        """Store an item's text vector, growing the matrix to the id map size."""
        self.ensure_item_text_rows()
        self.item_text[item_index] = vector

    def ensure_item_text_rows(self) -> None:
        missing_rows = self.item_ids.table_size - self.item_text.shape[0]
        if missing_rows > 0:
            padding = np.zeros((missing_rows, self.item_text.shape[1]), np.float32)
            self.item_text = np.concatenate([self.item_text, padding])

    def interaction_count(self) -> int:
        return sum(len(history) for history in self.histories.values())
