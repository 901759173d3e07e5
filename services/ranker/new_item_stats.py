"""The popularity of new items, kept current for their reserved places (services/model/new_items.py).

The item feed (WatchItems) carries an item's statistics only with its catalog changes, so an
item created after the model's training would stay at the popularity it had when it was created
(0) while users interact with it. Every `interval_s` this reads, from features' GetItemFeatures
(statistics only, no vector), the popularity of the items the served models have no id for — those
created since the model was trained, a small set between two trainings — and sets it in the
catalog. Items with an id need no refresh: their learned row carries their popularity.

Bounded: at most MAX_ITEMS items per round (the newest, by catalog order), in calls of
CALL_ITEMS. A failed round is logged once and counted, and the next round tries again; answers
meanwhile use the popularity last read (the slots' order degrades, nothing else).
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from services.ranker import metrics
from services.ranker.catalog import Catalog
from services.ranker.features_client import FeaturesClient
from services.ranker.routing import ServingState
from services.ranker.user_cache import FeaturesUnavailable

log = logging.getLogger(__name__)

MAX_ITEMS = 4096
CALL_ITEMS = 1000          # GetItemFeatures takes at most 1000 ids (services/common/validation.py)
CALL_TIMEOUT_S = 5.0


class NewItemStats:
    def __init__(self, features: FeaturesClient, catalog: Catalog, state: ServingState, interval_s: float) -> None:
        self.features, self.catalog, self.state = features, catalog, state
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.last_read = 0            # items whose popularity the last good round read

    def status(self) -> dict:
        """For the replica's Status / registration: whether the reads work."""
        return {"interval_s": self.interval_s, "failing": self._failing, "last_read": self.last_read}

    def id_less_iids(self) -> np.ndarray:
        """The items the served versions (current and canary) have no id for, newest first
        (iids grow as items arrive), at most MAX_ITEMS."""
        routing = self.state.routing
        iids: set[int] = set()
        for bundle in (routing.current, routing.canary):
            if bundle is not None:
                iids.update(list(bundle.id_less_iids))   # list(set): one step against the feed thread
        return np.asarray(sorted(iids, reverse=True)[:MAX_ITEMS], np.int64)

    def refresh(self) -> int:
        """One round; the number of items whose popularity was read. FeaturesUnavailable when
        features could not answer."""
        iids = self.id_less_iids()
        names = [self.catalog.name_of(int(iid)) for iid in iids]
        read = 0
        for start in range(0, len(names), CALL_ITEMS):
            chunk_iids, chunk_names = iids[start:start + CALL_ITEMS], names[start:start + CALL_ITEMS]
            known = [n for n, name in enumerate(chunk_names) if name]
            if not known:
                continue
            popularity = self.features.item_popularity([chunk_names[n] for n in known], CALL_TIMEOUT_S)
            found = [n for n in known if chunk_names[n] in popularity]
            self.catalog.set_popularity(chunk_iids[found], np.array([popularity[chunk_names[n]] for n in found]))
            read += len(found)
        metrics.NEW_ITEM_STATS_READ.inc(read)
        self.last_read = read
        return read

    # ------------------------------------------------------------------ thread
    def start(self) -> "NewItemStats":
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ranker-new-item-stats", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except FeaturesUnavailable as error:
                metrics.NEW_ITEM_STATS_FAILURES.inc()
                if not self._failing:
                    log.warning("could not read new items' popularity from features; retrying",
                                extra={"error": str(error)[:200], "interval_s": self.interval_s})
                self._failing = True
                continue
            if self._failing:
                log.info("new items' popularity read again")
            self._failing = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CALL_TIMEOUT_S + 1)
