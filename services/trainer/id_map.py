"""Ids of users and items as contiguous indexes (index 0 reserved: padding / "no learned id")."""

from __future__ import annotations

import json
from typing import Iterable


class IdMap:
    """Bijection between external string ids and contiguous indexes 1..n.

    Index 0 is never handed out (it means padding / unknown). Indexes are only
    ever appended, so an index, once given, keeps its meaning forever: this is
    what lets an incrementally updated model keep its embedding rows.
    """

    def __init__(self, external_ids: Iterable[str] = ()) -> None:
        self._index_of: dict[str, int] = {}
        self._external_of: list[str | None] = [None]  # slot 0 reserved
        for external_id in external_ids:
            self.add(external_id)

    def add(self, external_id: str) -> int:
        """Return the index of ``external_id``, assigning the next free one if new."""
        key = str(external_id)
        index = self._index_of.get(key)
        if index is None:
            index = len(self._external_of)
            self._index_of[key] = index
            self._external_of.append(key)
        return index

    def get(self, external_id: str, default: int = 0) -> int:
        """Index of ``external_id`` or ``default`` (0 = unknown) without growing."""
        return self._index_of.get(str(external_id), default)

    def external(self, index: int) -> str:
        if index <= 0 or index >= len(self._external_of):
            raise KeyError(index)
        return self._external_of[index]  # type: ignore[return-value]

    def __contains__(self, external_id: object) -> bool:
        return str(external_id) in self._index_of

    def __len__(self) -> int:
        """Number of real ids (excluding the reserved 0)."""
        return len(self._external_of) - 1

    @property
    def table_size(self) -> int:
        """Rows an embedding table needs to hold every index (n + 1)."""
        return len(self._external_of)

    def external_ids(self) -> list[str]:
        """External ids in index order (index 1 first)."""
        return list(self._external_of[1:])  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.external_ids())

    @classmethod
    def from_json(cls, text: str) -> "IdMap":
        return cls(json.loads(text))
