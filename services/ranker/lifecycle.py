"""A replica's start-up and shutdown: the order its background parts start and stop in.

Start-up (the ready check: health stays NOT_SERVING until it returns): follow the features item
feed until the catalog has caught up (else the replica exits: it cannot serve without items),
then read `model/current` / `model/canary` from etcd and load them, then register under
`rankers/<replica>`. With no model published yet the replica serves popular/fresh items and text
search (model_version 0); with etcd unreachable it starts without a model and picks one up when
etcd returns. Shutdown stops the parts in the reverse order and closes their connections.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from services.common.server import GrpcService
from services.ranker.artifact_reader import ArtifactReader
from services.ranker.catalog import Catalog
from services.ranker.features_client import FeaturesClient
from services.ranker.hot_swap import ModelManager
from services.ranker.item_feed import ItemFeed
from services.ranker.model_watch import EtcdModelWatcher
from services.ranker.registration import Registration
from services.ranker.routing import ServingState
from services.ranker.new_item_stats import NewItemStats
from services.ranker.user_feed import UserFeed

log = logging.getLogger(__name__)

# Longest wait for the first read of etcd at start before serving without a model.
ETCD_AT_START_S = 10.0


@dataclass
class ReplicaLifecycle:
    replica_id: str
    catalog: Catalog
    state: ServingState
    features: FeaturesClient
    feed: ItemFeed
    reader: ArtifactReader
    manager: ModelManager
    watcher: EtcdModelWatcher
    registration: Registration
    startup_timeout_s: float
    user_feed: UserFeed | None = None     # features.WatchUsers into the user cache
    new_item_stats: NewItemStats | None = None   # new items' popularity (their reserved places)

    def start(self, service: GrpcService) -> None:
        """Runs as the service's ready check; stops `service` and exits with status 1 when the
        catalog does not catch up within the start-up timeout."""
        self.catch_up(lambda: service.stop(0))
        self.register()

    def catch_up(self, on_failure: Callable[[], None] = lambda: None) -> None:
        """Everything of start() before registering: the feeds until the catalog caught up, then
        the first model. A worker (RANKER_WORKERS > 1) runs this before its server listens at all:
        on a shared SO_REUSEPORT port a listening worker gets connections, ready or not."""
        deadline = time.monotonic() + self.startup_timeout_s
        self.feed.start()
        if self.user_feed is not None:
            self.user_feed.start()
        if not self.catalog.ready.wait(self.startup_timeout_s):
            log.error("catalog not caught up in time; is the features service at FEATURES_ADDRESS up?",
                      extra={"features_address": self.features.address})
            on_failure()
            raise SystemExit(1)
        self.manager.start()
        self.watcher.start()
        if self.new_item_stats is not None:
            self.new_item_stats.start()
        if self.watcher.synced.wait(min(ETCD_AT_START_S, max(deadline - time.monotonic(), 0.1))):
            self.manager.idle.wait(max(deadline - time.monotonic(), 0.1))
        else:
            log.warning("etcd unreachable at start: serving without a model until it returns")

    def register(self) -> None:
        routing = self.state.routing
        log.info("serving", extra={"replica_id": self.replica_id, "items": self.catalog.active_count,
                                   "model_version": routing.current.version if routing.current else 0,
                                   "data_lsn": self.catalog.watermark})
        self.registration.start()

    def stop(self) -> None:
        self.registration.stop()
        self.watcher.stop()
        self.manager.stop()
        self.feed.stop()
        if self.user_feed is not None:
            self.user_feed.stop()
        if self.new_item_stats is not None:
            self.new_item_stats.stop()
        self.features.close()
        self.reader.close()
