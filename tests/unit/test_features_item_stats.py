"""Item statistics: counts and time-decayed popularity (pure)."""
import itertools
import math
from datetime import datetime, timedelta, timezone

import pytest

from services.features.item_stats import EVENT_WEIGHTS, ItemStats, apply_event, decay_factor, popularity_at

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAY = 86400.0


def test_decay_halves_per_half_life():
    assert decay_factor(0, DAY) == 1.0
    assert decay_factor(DAY, DAY) == pytest.approx(0.5)
    assert decay_factor(3 * DAY, DAY) == pytest.approx(0.125)


def test_counts_by_type_and_last_interaction():
    stats = ItemStats()
    for i, kind in enumerate(["view", "view", "click", "add_to_cart", "purchase"]):
        apply_event(stats, kind, T0 + timedelta(hours=i), lsn=10 + i, half_life_s=DAY)
    assert (stats.views, stats.clicks, stats.add_to_carts, stats.purchases) == (2, 1, 1, 1)
    assert stats.last_interaction == T0 + timedelta(hours=4)
    assert stats.updated_lsn == 14


def test_search_events_do_not_count():
    stats = ItemStats()
    apply_event(stats, "search", T0, lsn=1, half_life_s=DAY)
    assert stats == ItemStats()


def test_popularity_decays_between_events():
    stats = ItemStats()
    apply_event(stats, "purchase", T0, 1, DAY)
    apply_event(stats, "view", T0 + timedelta(days=1), 2, DAY)
    assert stats.popularity == pytest.approx(EVENT_WEIGHTS["purchase"] / 2 + EVENT_WEIGHTS["view"])
    assert stats.popularity_at == T0 + timedelta(days=1)
    assert popularity_at(stats, T0 + timedelta(days=2), DAY) == pytest.approx(stats.popularity / 2)
    # Reading at a time before the reference never grows the value.
    assert popularity_at(stats, T0, DAY) == stats.popularity


def test_popularity_does_not_depend_on_arrival_order():
    events = [("view", T0), ("purchase", T0 + timedelta(hours=30)), ("click", T0 + timedelta(hours=5)),
              ("add_to_cart", T0 + timedelta(days=3))]
    end = T0 + timedelta(days=3)
    expected = sum(EVENT_WEIGHTS[k] * 2 ** (-(end - t).total_seconds() / DAY) for k, t in events)
    for order in itertools.permutations(events):
        stats = ItemStats()
        for lsn, (kind, at) in enumerate(order):
            apply_event(stats, kind, at, lsn, DAY)
        assert popularity_at(stats, T0 + timedelta(days=3), DAY) == pytest.approx(expected)
        assert stats.last_interaction == T0 + timedelta(days=3)


def test_half_life_is_configurable():
    fast, slow = ItemStats(), ItemStats()
    for stats, half_life in ((fast, 3600.0), (slow, 30 * DAY)):
        apply_event(stats, "view", T0, 1, half_life)
    later = T0 + timedelta(days=1)
    assert popularity_at(fast, later, 3600.0) == pytest.approx(2 ** -24)
    assert math.isclose(popularity_at(slow, later, 30 * DAY), 2 ** (-1 / 30))
