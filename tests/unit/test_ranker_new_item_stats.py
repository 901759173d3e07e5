"""NewItemStats (services/ranker/new_item_stats.py): the popularity of the items the served
models have no id for, read from features between their catalog changes."""
from __future__ import annotations

import threading

import numpy as np
import torch

from services.contracts.model_pointer import ModelPointer
from services.ranker.catalog import Catalog, ItemUpdate
from services.ranker.index_structures import IndexOptions
from services.ranker.model_bundle import ModelBundle
from services.ranker.new_item_stats import CALL_ITEMS, NewItemStats
from services.ranker.routing import ServingState
from services.ranker.user_cache import FeaturesUnavailable
from tests import fakes
from tests.support import wait_until

torch.set_num_threads(1)
ITEMS = [f"i{n}" for n in range(30)]


class Popularity:
    """features.GetItemFeatures as NewItemStats uses it: popularity by item id."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.calls: list[list[str]] = []
        self.down = False
        self.called = threading.Event()

    def item_popularity(self, item_ids, timeout_s=None):
        self.calls.append(list(item_ids))
        self.called.set()
        if self.down:
            raise FeaturesUnavailable("GetItemFeatures: UNAVAILABLE")
        assert len(item_ids) <= CALL_ITEMS
        return {item_id: self.values[item_id] for item_id in item_ids if item_id in self.values}


def _world():
    catalog = Catalog(IndexOptions(kind="flat"))
    text = fakes.text_vectors(ITEMS)
    catalog.apply([ItemUpdate(item, 10 + n, title=item, vector=text[n]) for n, item in enumerate(ITEMS)], watermark=100)
    artifact = fakes.make_artifact(1, ITEMS[:20], text[:20])          # i20..i29: no learned id
    bundle = ModelBundle(artifact, ModelPointer(1, "file:///m", "a" * 64), artifact.build_model(), catalog)
    bundle.build_index()
    state = ServingState()
    state.install(bundle, None, 0.0)
    return catalog, state


def test_a_round_reads_only_the_id_less_items_and_sets_their_popularity():
    catalog, state = _world()
    features = Popularity()
    features.values = {"i21": 7.5, "i25": 2.0, "i3": 99.0}
    stats = NewItemStats(features, catalog, state, interval_s=0)
    assert stats.refresh() == 2
    assert sorted(features.calls[0]) == sorted(f"i{n}" for n in range(20, 30))   # never an item with an id
    popularity = catalog.popularity_of(np.array([catalog.iid(i) for i in ("i21", "i25", "i22", "i3")]))
    assert popularity.tolist() == [7.5, 2.0, 0.0, 0.0]


def test_the_thread_retries_after_features_failed_and_stops():
    catalog, state = _world()
    features = Popularity()
    features.down = True
    stats = NewItemStats(features, catalog, state, interval_s=0.05).start()
    try:
        assert features.called.wait(5)
        wait_until(lambda: stats.status()["failing"], "the failure shown", 10)
        features.values = {"i24": 3.0}
        features.down = False
        wait_until(lambda: catalog.popularity_of(np.array([catalog.iid("i24")]))[0] == 3.0, "popularity read", 10)
        wait_until(lambda: not stats.status()["failing"] and stats.status()["last_read"] == 1, "shown working", 10)
    finally:
        stats.stop()
    calls = len(features.calls)
    assert not stats._thread.is_alive() and len(features.calls) == calls


def test_off_starts_no_thread():
    catalog, state = _world()
    assert NewItemStats(Popularity(), catalog, state, interval_s=0).start()._thread is None
