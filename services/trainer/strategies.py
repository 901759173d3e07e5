"""Incremental-update strategies: which new interactions an update learns from.

Pure functions, no I/O. The strategies combine in one fixed order (as documented on
`deltarec.v1.UpdateStrategy`):

1. threshold — count every interaction that arrived since the parent version (commit LSN above
   the parent's `lsn_to`); below `threshold_events`, no update is made at all (skipped);
2. time window — keep those that happened within `window_seconds` before `as_of`. `as_of` is the
   *data* time (the newest interaction's timestamp), not the wall clock, so that a replay of
   historical traffic behaves like live traffic and a resumed run selects exactly the same rows;
3. priority — rank what is left by a priority function, best first, and keep the top
   `top_share` of it (at least one interaction):
   * `recency`: newer first;
   * `item_novelty`: interactions with items the model has seen least before (items new since the
     parent, then rarely seen ones) first — they carry what the model cannot know yet;
   * `user_activity`: interactions of the users with the most new interactions first — the
     users whose taste moved the most since the parent;
   ties are broken by recency, then by the caller's `seq`, so selection is deterministic;
4. replay — `replay_ratio` older interactions per selected new one are mixed in (sampled by the
   training code), against forgetting.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Hashable, Mapping, Sequence

PRIORITIES = ("recency", "item_novelty", "user_activity")


@dataclass(frozen=True)
class Strategy:
    window_seconds: int = 0
    threshold_events: int = 0
    priority: str = ""
    top_share: float = 1.0
    replay_ratio: float = 1.0

    def validate(self) -> "Strategy":
        """Raises ValueError naming the field when a parameter is out of range."""
        if self.window_seconds < 0:
            raise ValueError("window_seconds: must be >= 0")
        if self.threshold_events < 0:
            raise ValueError("threshold_events: must be >= 0")
        if self.priority and self.priority not in PRIORITIES:
            raise ValueError(f"priority: must be empty or one of {', '.join(PRIORITIES)}, not {self.priority[:40]!r}")
        if not (0.0 < self.top_share <= 1.0) or math.isnan(self.top_share):
            raise ValueError("top_share: must be in (0, 1]")
        if not (0.0 <= self.replay_ratio <= 100.0) or math.isnan(self.replay_ratio):
            raise ValueError("replay_ratio: must be in [0, 100]")
        return self

    @property
    def name(self) -> str:
        """e.g. "window+threshold+priority"; "all-new" when no part is active."""
        parts = []
        if self.window_seconds:
            parts.append("window")
        if self.threshold_events:
            parts.append("threshold")
        if self.priority:
            parts.append("priority")
        return "+".join(parts) or "all-new"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> "Strategy":
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)


@dataclass(frozen=True)
class NewInteraction:
    """One interaction that arrived since the parent version."""
    key: Hashable            # the caller's handle, returned in the selection
    user: Hashable
    item: Hashable
    occurred_at: float       # seconds since the epoch
    seq: int = 0             # tie-breaker (e.g. the events row id)


@dataclass
class Selection:
    skipped: bool
    reason: str
    selected: list[NewInteraction] = field(default_factory=list)
    new_count: int = 0       # all interactions since the parent
    in_window: int = 0       # of those, within the time window

    def summary(self) -> dict:
        return {"new_interactions": self.new_count, "in_window": self.in_window,
                "selected_interactions": len(self.selected)}


def priority_scores(candidates: Sequence[NewInteraction], priority: str,
                    old_item_counts: Mapping[Hashable, int]) -> list[float]:
    """Higher is more important. `old_item_counts`: interactions per item before the parent's
    LSN (items absent from it are new)."""
    if priority == "recency":
        return [c.occurred_at for c in candidates]
    if priority == "item_novelty":
        return [1.0 / (1.0 + old_item_counts.get(c.item, 0)) for c in candidates]
    if priority == "user_activity":
        per_user: dict[Hashable, int] = {}
        for candidate in candidates:
            per_user[candidate.user] = per_user.get(candidate.user, 0) + 1
        return [float(per_user[c.user]) for c in candidates]
    if not priority:
        return [0.0] * len(candidates)
    raise ValueError(f"priority: unknown {priority!r}")


def top_count(n: int, share: float) -> int:
    """How many of `n` ranked interactions `share` keeps: ceil, at least 1 when n > 0."""
    if n <= 0:
        return 0
    return max(1, min(n, math.ceil(n * share - 1e-9)))


def select(new: Sequence[NewInteraction], strategy: Strategy, as_of: float,
           old_item_counts: Mapping[Hashable, int] | None = None) -> Selection:
    """Applies threshold, window and priority (see the module docstring)."""
    strategy.validate()
    new_count = len(new)
    if new_count == 0:
        return Selection(True, "no new interactions since the current version", new_count=0)
    if new_count < strategy.threshold_events:
        return Selection(True, f"{new_count} new interactions, below the threshold of "
                               f"{strategy.threshold_events}", new_count=new_count)
    candidates = list(new)
    if strategy.window_seconds:
        start = as_of - strategy.window_seconds
        candidates = [c for c in candidates if c.occurred_at >= start]
    in_window = len(candidates)
    if not candidates:
        return Selection(True, f"none of the {new_count} new interactions is within the last "
                               f"{strategy.window_seconds}s", new_count=new_count, in_window=0)
    scores = priority_scores(candidates, strategy.priority, old_item_counts or {})
    order = sorted(range(len(candidates)),
                   key=lambda i: (-scores[i], -candidates[i].occurred_at, -candidates[i].seq))
    if strategy.priority or strategy.top_share < 1.0:
        order = order[:top_count(len(order), strategy.top_share)]
    return Selection(False, "", [candidates[i] for i in order], new_count=new_count, in_window=in_window)


def replay_count(selected: int, ratio: float, available: int) -> int:
    """Older examples to replay next to `selected` new ones."""
    return max(0, min(available, int(round(ratio * selected))))
