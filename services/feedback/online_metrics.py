"""Online metrics per (model version, variant), kept incrementally over a sliding time window.

An impression is one answer shown (the items, in order). An event carrying that answer's
recommendation_id is attributed to it when it names an item of the answer and happens within the
attribution window after it was shown: a click (or view) at position p counts the impression as
clicked and adds the position's gain 1/log2(p + 2) (NDCG-style: 1 for the top slot; an impression
gains at most once per item); an add-to-cart and a purchase count for the impression's
add-to-cart and purchase rates. Counters live in time buckets (`bucket_s`); the window is the
last `window_s` of buckets, so a reading costs the number of buckets, never a rescan of events.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

from services.feedback.sequential import Arm

CLICK_TYPES = {"click", "view"}
RATE_TYPES = {"add_to_cart": "carts", "purchase": "purchases"}

# Why an event was not attributed (OnlineMetrics.attribute; FeedbackJoin adds NO_IMPRESSION for
# one whose impression never came).
ATTRIBUTED = "attributed"
NO_IMPRESSION = "no_impression"
ITEM_NOT_SHOWN = "item_not_shown"
OUTSIDE_WINDOW = "outside_attribution_window"
OTHER_TYPE = "other_event_type"
UNATTRIBUTED_REASONS = (NO_IMPRESSION, ITEM_NOT_SHOWN, OUTSIDE_WINDOW, OTHER_TYPE)


def position_gain(position: int) -> float:
    return 1.0 / math.log2(position + 2)


@dataclass(frozen=True)
class Impression:
    recommendation_id: str
    model_version: int
    variant: str
    user_id: str
    item_ids: tuple[str, ...]
    shown_at: float             # seconds since the epoch
    kind: str = "recommend"     # recommend | search | similar


@dataclass
class Counters:
    impressions: int = 0
    clicked: int = 0            # impressions with at least one attributed click
    carts: int = 0              # impressions with an attributed add-to-cart
    purchases: int = 0
    gain: float = 0.0
    clicks: int = 0             # attributed clicks on distinct shown items
    clicks_at: dict = field(default_factory=lambda: defaultdict(int))   # position -> clicks

    def add(self, other: "Counters") -> None:
        self.impressions += other.impressions
        self.clicked += other.clicked
        self.carts += other.carts
        self.purchases += other.purchases
        self.gain += other.gain
        self.clicks += other.clicks
        for position, n in other.clicks_at.items():
            self.clicks_at[position] += n

    def to_dict(self) -> dict:
        n = self.impressions
        return {"impressions": n, "clicked": self.clicked, "carts": self.carts, "purchases": self.purchases,
                "ctr": self.clicked / n if n else 0.0, "add_to_cart_rate": self.carts / n if n else 0.0,
                "purchase_rate": self.purchases / n if n else 0.0, "ndcg": self.gain / n if n else 0.0, "clicks": self.clicks,
                "clicks_at": {str(p): c for p, c in sorted(self.clicks_at.items())}}

    def arm(self, metric: str) -> Arm:
        successes = {"ctr": self.clicked, "add_to_cart": self.carts, "purchase": self.purchases}[metric]
        return Arm(self.impressions, successes)


@dataclass
class _Shown:
    impression: Impression
    bucket: int
    clicked_items: set = field(default_factory=set)
    counted: set = field(default_factory=set)   # "clicked", "carts", "purchases" already counted


class OnlineMetrics:
    def __init__(self, *, window_s: float = 3600.0, bucket_s: float = 60.0, attribution_s: float = 1800.0,
                 max_open_impressions: int = 200_000) -> None:
        self.window_s, self.bucket_s, self.attribution_s = window_s, bucket_s, attribution_s
        self.max_open = max_open_impressions
        self._buckets: dict[tuple[int, str], dict[int, Counters]] = defaultdict(dict)
        self._open: OrderedDict[str, _Shown] = OrderedDict()   # impressions still attributable
        self.unattributed = 0     # events whose impression is unknown, expired or lacks the item
        self._lock = threading.Lock()

    def _bucket(self, at: float) -> int:
        return int(at // self.bucket_s)

    def _counters(self, shown: _Shown) -> Counters:
        key = (shown.impression.model_version, shown.impression.variant)
        return self._buckets[key].setdefault(shown.bucket, Counters())

    def add_impression(self, impression: Impression) -> None:
        with self._lock:
            if impression.recommendation_id in self._open:
                return                                   # at-least-once delivery: counted once
            shown = _Shown(impression, self._bucket(impression.shown_at))
            self._open[impression.recommendation_id] = shown
            self._counters(shown).impressions += 1
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)

    def knows(self, recommendation_id: str) -> bool:
        """Whether the impression is here (still attributable)."""
        return recommendation_id in self._open

    def add_event(self, recommendation_id: str, event_type: str, item_id: str | None, at: float) -> bool:
        """Attributes one event; False when it cannot be (unknown impression, item not shown,
        outside the attribution window)."""
        return self.attribute(recommendation_id, event_type, item_id, at) == ATTRIBUTED

    def attribute(self, recommendation_id: str, event_type: str, item_id: str | None, at: float) -> str:
        """Attributes one event: ATTRIBUTED, or the reason it cannot be (NO_IMPRESSION,
        ITEM_NOT_SHOWN, OUTSIDE_WINDOW, OTHER_TYPE). An event of a type the metrics do not use is
        OTHER_TYPE before anything else (a search event names no shown item)."""
        with self._lock:
            if event_type not in CLICK_TYPES and event_type not in RATE_TYPES:
                return OTHER_TYPE
            shown = self._open.get(recommendation_id)
            impression = shown.impression if shown else None
            reason = (NO_IMPRESSION if impression is None else ITEM_NOT_SHOWN if item_id not in impression.item_ids
                      else OUTSIDE_WINDOW if not 0 <= at - impression.shown_at <= self.attribution_s else None)
            if reason is not None:
                self.unattributed += 1
                return reason
            counters = self._counters(shown)
            if event_type in CLICK_TYPES:
                if item_id not in shown.clicked_items:
                    shown.clicked_items.add(item_id)
                    position = impression.item_ids.index(item_id)
                    counters.clicks_at[position] += 1
                    counters.clicks += 1
                    counters.gain += position_gain(position)
                    if "clicked" not in shown.counted:
                        shown.counted.add("clicked")
                        counters.clicked += 1
            elif event_type in RATE_TYPES:
                name = RATE_TYPES[event_type]
                if name not in shown.counted:
                    shown.counted.add(name)
                    setattr(counters, name, getattr(counters, name) + 1)
            return ATTRIBUTED

    def expire(self, now: float) -> None:
        """Drops buckets older than the window and impressions past their attribution window."""
        with self._lock:
            oldest = self._bucket(now - self.window_s)
            for buckets in self._buckets.values():
                for bucket in [b for b in buckets if b < oldest]:
                    del buckets[bucket]
            while self._open:
                first = next(iter(self._open.values()))
                if now - first.impression.shown_at <= self.attribution_s:
                    break
                self._open.popitem(last=False)

    def window(self, now: float, window_s: float | None = None) -> dict[tuple[int, str], Counters]:
        """The window's totals per (model version, variant): the last `window_s` (at most the
        window kept; default all of it), in whole buckets."""
        span = self.window_s if window_s is None else min(window_s, self.window_s)
        oldest = self._bucket(now - span)
        with self._lock:
            totals = {}
            for key, buckets in self._buckets.items():
                total = Counters()
                for bucket, counters in buckets.items():
                    if bucket >= oldest:
                        total.add(counters)
                if total.impressions:
                    totals[key] = total
            return totals
