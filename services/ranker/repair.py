"""Repairs the consistency service asks of a replica (`Reload`): load model/current again (a
replica that failed to swap, or refused an artifact that has been fixed since) and resync the
item index from a full WatchItems read (a replica that lost or kept items)."""
from __future__ import annotations

import logging
import time

from services.common.handler_pool import blocking
from services.ranker.catalog import Catalog
from services.ranker.hot_swap import ModelManager
from services.ranker.item_feed import ItemFeed
from services.ranker.model_watch import EtcdModelWatcher

log = logging.getLogger(__name__)


class ReplicaRepair:
    def __init__(self, catalog: Catalog, feed: ItemFeed, manager: ModelManager,
                 watcher: EtcdModelWatcher) -> None:
        self.catalog, self.feed, self.manager, self.watcher = catalog, feed, manager, watcher

    def reload_model(self, timeout_s: float) -> bool:
        """Forgets refusals, reads etcd again and waits (within `timeout_s`) for the loads."""
        log.warning("reload of the model asked for")
        self.manager.forget_refusals()
        self.watcher.refresh()
        with blocking():
            return self.manager.idle.wait(max(timeout_s, 0.0))

    def resync_index(self, timeout_s: float) -> bool:
        """Reads every item again from the feature store, drops what it no longer lists, and
        waits (within `timeout_s`) until that is done."""
        log.warning("full resync of the item index asked for", extra={"data_lsn": self.catalog.watermark})
        done = self.feed.request_resync()
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with blocking():
            return done.wait(max(deadline - time.monotonic(), 0.0))
