"""Degraded reads (issue 11, defect 9): while features cannot answer, Recommend and Search serve
the user from this replica's cache of user state, and say so (`degraded`)."""
from __future__ import annotations

import time

import pytest

from services.ranker.filters import FilterSpec

from services.ranker.query_encoder import CachedEncoder
from services.ranker.recommend import Recommender
from services.ranker.request_path import RequestPath
from services.ranker.search import Searcher
from services.ranker.user_cache import UserCache
from tests.unit.test_ranker_requests import PURCHASE, VIEW, world  # noqa: F401 - the fixture


@pytest.fixture
def degraded_world(world):  # noqa: F811
    # No user-change stream here: an entry is reused for 50 ms, then every request reads features;
    # the stale copy stays usable for an hour.
    users = UserCache(world["histories"], ttl_s=0.05, stale_s=3600.0)
    path = RequestPath(world["catalog"], users, None, max_wait_s=5.0)
    world["recommender"] = Recommender(world["catalog"], world["state"], path)
    world["searcher"] = Searcher(world["catalog"], world["state"], path, CachedEncoder(world["encoder"]))
    return world


def test_recommend_serves_the_cached_history_while_features_is_down_and_says_so(degraded_world):
    world = degraded_world
    world["histories"].add("u1", ["i1", "i2", "i3"], [VIEW, PURCHASE, VIEW], lsn=1000)
    healthy = world["recommender"].recommend("u1", 10, FilterSpec(exclude_purchased=True))
    assert not healthy.cold_start and not healthy.degraded

    world["histories"].down = True
    time.sleep(0.06)                                      # the fresh entry expired: features is asked
    calls = world["histories"].calls
    answer = world["recommender"].recommend("u1", 10, FilterSpec(exclude_purchased=True))
    assert world["histories"].calls == calls + 1          # it was asked, and failed
    assert answer.degraded and not answer.cold_start      # personal, from the cache
    assert [i.item_id for i in answer.items] == [i.item_id for i in healthy.items]
    assert "i2" not in {i.item_id for i in answer.items}  # the cached purchase still excluded
    assert answer.data_lsn == 1000                        # what the cached state reflects

    unknown = world["recommender"].recommend("u-never-seen", 5)
    assert unknown.degraded and unknown.cold_start and unknown.items

    world["histories"].down = False
    assert not world["recommender"].recommend("u1", 10).degraded


def test_search_personalisation_falls_back_to_the_cache_too(degraded_world):
    world = degraded_world
    world["histories"].add("u1", ["i1", "i2"], [VIEW, VIEW])
    assert not world["searcher"].search("rose", "u1", k=5).degraded
    world["histories"].down = True
    time.sleep(0.06)
    assert world["searcher"].search("rose", "u1", k=5).degraded
    assert not world["searcher"].search("rose", k=5).degraded    # no user: nothing was degraded


def test_read_your_writes_is_never_served_from_an_older_cached_state(degraded_world):
    world = degraded_world
    world["histories"].add("u1", ["i1"], [VIEW], lsn=1000)
    world["recommender"].recommend("u1", 5)
    world["catalog"].apply([], watermark=2000)            # the replica's items are past 1001
    world["histories"].down = True
    time.sleep(0.06)
    with pytest.raises(Exception, match="unavailable"):
        world["recommender"].recommend("u1", 5, min_data_lsn=1001, timeout_s=1)
