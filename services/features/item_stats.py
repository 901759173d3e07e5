"""Per-item interaction statistics: counts by type, time-decayed popularity, last interaction.

Popularity is a sum of event weights, each decayed with a half-life from the time it happened:
    popularity(T) = sum_i weight_i * 2 ** (-(T - t_i) / half_life)
It is stored as its value at a reference time (`popularity_at`, the latest event time folded in)
so that one event costs O(1), and read at any later time by decaying the stored value. Folding
an event older than the reference time decays that event's weight back to the reference time,
which makes the result independent of arrival order.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# How much one event says about an item's popularity. A purchase is a stronger signal than a view.
EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0}


@dataclass
class ItemStats:
    views: int = 0
    clicks: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    popularity: float = 0.0
    popularity_at: datetime | None = None
    last_interaction: datetime | None = None
    updated_lsn: int = 0


_COUNTER_OF = {"view": "views", "click": "clicks", "add_to_cart": "add_to_carts", "purchase": "purchases"}


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    return 2.0 ** (-elapsed_s / half_life_s)


def popularity_at(stats: ItemStats, when: datetime, half_life_s: float) -> float:
    """The stored popularity decayed to `when` (never grown: a `when` before the reference time
    returns the stored value)."""
    if stats.popularity_at is None or stats.popularity == 0.0:
        return stats.popularity
    elapsed = (when - stats.popularity_at).total_seconds()
    return stats.popularity * decay_factor(elapsed, half_life_s) if elapsed > 0 else stats.popularity


def apply_event(stats: ItemStats, event_type: str, occurred_at: datetime, lsn: int,
                half_life_s: float) -> None:
    counter = _COUNTER_OF.get(event_type)
    if counter is None:
        return
    setattr(stats, counter, getattr(stats, counter) + 1)
    weight = EVENT_WEIGHTS[event_type]
    if stats.popularity_at is None:
        stats.popularity, stats.popularity_at = weight, occurred_at
    elif occurred_at >= stats.popularity_at:
        elapsed = (occurred_at - stats.popularity_at).total_seconds()
        stats.popularity = stats.popularity * decay_factor(elapsed, half_life_s) + weight
        stats.popularity_at = occurred_at
    else:
        elapsed = (stats.popularity_at - occurred_at).total_seconds()
        stats.popularity += weight * decay_factor(elapsed, half_life_s)
    if stats.last_interaction is None or occurred_at > stats.last_interaction:
        stats.last_interaction = occurred_at
    stats.updated_lsn = max(stats.updated_lsn, lsn)
