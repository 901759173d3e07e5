"""What Recommend, Search and SimilarItems answer, before the edge turns it into a message."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Scored:
    item_id: str
    score: float
    reason: str = ""
    title: str = ""


@dataclass
class Answer:
    items: list[Scored]
    model_version: int
    data_lsn: int
    variant: str = "current"
    cold_start: bool = False
    degraded: bool = False      # features could not answer: cached user state, or none
