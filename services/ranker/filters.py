"""Request filters (category prefixes, price range, exclusions) and the per-item test built from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from services.common.errors import InvalidArgument
from services.ranker.catalog import Catalog


@dataclass(frozen=True)
class FilterSpec:
    exclude_purchased: bool = True
    exclude_seen: bool = False
    categories: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None
    exclude_item_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise InvalidArgument("filters.min_price: greater than max_price")
        if len(self.exclude_item_ids) > 10_000:
            raise InvalidArgument("filters.exclude_item_ids: at most 10000")

    @property
    def restricts_items(self) -> bool:
        return bool(self.categories) or self.min_price is not None or self.max_price is not None


NO_FILTERS = FilterSpec(exclude_purchased=False)

# RANKER_DEFAULT_EXCLUDE: what Recommend leaves out when a request does not say.
EXCLUDE_POLICIES = ("seen", "purchased", "none")


def default_exclusions(policy: str) -> FilterSpec:
    """The Recommend filters of a deployment policy: "seen" (every item the user interacted
    with, purchased ones included), "purchased", or "none"."""
    if policy not in EXCLUDE_POLICIES:
        raise ValueError(f"exclusion policy must be one of {EXCLUDE_POLICIES}, got {policy!r}")
    return FilterSpec(exclude_purchased=policy in ("seen", "purchased"), exclude_seen=policy == "seen")


def make_acceptor(catalog: Catalog, filters: FilterSpec, excluded: set[int]) -> Callable[[int], bool]:
    categories, low, high = filters.categories, filters.min_price, filters.max_price

    def accept(iid: int) -> bool:
        if iid < 0 or iid in excluded or not catalog.is_active(iid):
            return False
        if not (categories or low is not None or high is not None):
            return True
        if categories:
            category = catalog.category_of(iid)
            if not any(category.startswith(prefix) for prefix in categories):
                return False
        if low is not None or high is not None:
            price = catalog.price_of(iid)
            if price is None:
                return False
            if (low is not None and price < low) or (high is not None and price > high):
                return False
        return True
    return accept
