"""The item feed: `features.WatchItems` applied to the replica's catalog.

`ItemFeed` consumes `WatchItems` (from after_lsn = 0: every active item, then live changes) and
applies each message to the catalog, whose watermark then becomes the message's watermark. After
a broken stream it reconnects with after_lsn = the watermark it applied, so nothing is missed or
applied twice. The catalog is `ready` once the watermark reaches the features service's applied
LSN read at the first connection (or the stream goes quiet: nothing more to send).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import grpc
import numpy as np

from deltarec.v1 import features_pb2

from services.ranker import metrics
from services.ranker.catalog import Catalog, ItemBatch
from services.ranker.features_client import FeaturesClient
from services.ranker.user_cache import FeaturesUnavailable

log = logging.getLogger(__name__)

UPSERT = features_pb2.ITEM_CHANGE_KIND_UPSERT
REMOVE = features_pb2.ITEM_CHANGE_KIND_REMOVE


def money_value(money) -> float | None:
    if not money.currency_code and not money.units and not money.nanos:
        return None
    return money.units + money.nanos / 1e9


def decode_page(response, dim: int) -> ItemBatch:
    """One WatchItems page as columns: the fields read change by change, the text vectors of
    the whole page joined and decoded in one `frombuffer` into an [n, dim] float32 matrix (not
    a numpy array and an update object per item). An upsert whose vector is absent or does not
    match its `dim` keeps the vector the catalog has; changes without an item id, and kinds
    this replica does not know, are skipped."""
    item_ids, lsns, remove, titles, brands, categories = [], [], [], [], [], []
    prices, active, popularity, has_vector = [], [], [], []
    chunks: list[bytes] = []
    width = 4 * dim
    for change in response.changes:
        item = change.item
        item_id = item.item_id
        if not item_id:
            continue
        kind = change.kind
        if kind == REMOVE:
            item_ids.append(item_id)
            lsns.append(change.lsn or item.updated_lsn)
            remove.append(True)
            titles.append("")
            brands.append("")
            categories.append("")
            prices.append(None)
            active.append(False)
            popularity.append(0.0)
            has_vector.append(False)
            chunks.append(bytes(width))
            continue
        if kind != UPSERT:
            continue
        item_ids.append(item_id)
        lsns.append(change.lsn or item.updated_lsn)
        remove.append(False)
        titles.append(item.title)
        brands.append(item.brand)
        categories.append(item.category)
        prices.append(money_value(item.price) if item.HasField("price") else None)
        active.append(item.active)
        popularity.append(item.stats.popularity)
        embedding = item.embedding
        values = embedding.values
        if embedding.dim and len(values) == 4 * embedding.dim:
            if embedding.dim == dim:
                has_vector.append(True)
                chunks.append(values)
                continue
            log.warning("item vector of wrong dimension ignored",
                        extra={"item_id": item_id, "dim": int(embedding.dim)})
        has_vector.append(False)
        chunks.append(bytes(width))
    vectors = np.frombuffer(b"".join(chunks), dtype="<f4").astype(np.float32, copy=False).reshape(-1, dim)
    return ItemBatch(item_ids, lsns, remove, titles, brands, categories, prices, active, popularity,
                     vectors, np.asarray(has_vector, bool))


class ItemFeed:
    def __init__(self, client: FeaturesClient, catalog: Catalog, *, batch_size: int = 512,
                 quiet_ready_s: float = 3.0,
                 drop_updates: Callable[[list, bool], list] | None = None) -> None:
        self.client, self.catalog = client, catalog
        # A failure drill's hook (tests/ranker_drills.py), given the updates of one message and
        # whether the catalog is ready; the service itself runs without one.
        self.drop_updates = drop_updates
        self._resync_asked = threading.Event()
        self._resynced = threading.Event()
        self.batch_size = batch_size
        self.quiet_ready_s = quiet_ready_s
        self._stop = threading.Event()
        self._call = None
        self._target: int | None = None
        self.connected = threading.Event()
        self.messages = 0
        self._applying = False
        self._thread = threading.Thread(target=self._run, name="item-feed", daemon=True)

    def start(self) -> "ItemFeed":
        self._thread.start()
        threading.Thread(target=self._quiet_watch, name="item-feed-ready", daemon=True).start()
        return self

    def request_resync(self) -> threading.Event:
        """A full re-read of the catalog from the feature store (a repair); the event is set
        once it is done."""
        self._resynced = threading.Event()
        self._resync_asked.set()
        call = self._call
        if call is not None:
            call.cancel()
        return self._resynced

    def _drop_by_drill(self, updates: list) -> list:
        if self.drop_updates is None:
            return updates
        return self.drop_updates(updates, self.catalog.ready.is_set())

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def _mark_ready_if_caught_up(self) -> None:
        if (not self.catalog.ready.is_set() and self._target is not None
                and self.catalog.watermark >= self._target):
            self.catalog.mark_ready()
            log.info("catalog caught up", extra={"items": self.catalog.active_count,
                                                 "data_lsn": self.catalog.watermark})

    def _quiet_watch(self) -> None:
        """Ready also when the stream is open and has had nothing to say for a while."""
        while not self._stop.is_set() and not self.catalog.ready.is_set():
            last = (self.messages, self.catalog.watermark)
            self._stop.wait(self.quiet_ready_s)
            # Quiet means waiting for a message, not applying a long one (a page that grows a
            # 1M-item store can take seconds on loaded cores: that marked a half-loaded catalog
            # ready and built its indexes from half of it).
            if self.connected.is_set() and (self.messages, self.catalog.watermark) == last \
                    and not self._applying and not self.catalog.ready.is_set():
                self.catalog.mark_ready()
                log.info("catalog ready (feed quiet)", extra={"items": self.catalog.active_count,
                                                              "data_lsn": self.catalog.watermark})

    def _run(self) -> None:
        backoff = 0.2
        resync = False
        while not self._stop.is_set():
            try:
                if self._resync_asked.is_set():
                    self._resync_asked.clear()
                    resync = True
                if self._target is None or resync:
                    self._target = self.client.applied_lsn()
                    self._mark_ready_if_caught_up()
                if resync:
                    # The feature store was rebuilt from a new snapshot: read everything again,
                    # then drop what it no longer has.
                    log.warning("features store rebuilt: full resync of the catalog")
                    self.catalog.reset_watermark(0)
                after = self.catalog.watermark
                seen: set[str] | None = set() if resync else None
                self._call = self.client.stub.WatchItems(
                    features_pb2.WatchItemsRequest(after_lsn=after, max_batch_size=self.batch_size))
                self.connected.set()
                log.info("watching item changes", extra={"after_lsn": after, "features": self.client.address})
                for response in self._call:
                    self._applying = True
                    batch = decode_page(response, self.catalog.text_dim)
                    if self.drop_updates is not None:
                        batch = ItemBatch.of(self._drop_by_drill(batch.updates()), self.catalog.text_dim)
                    if seen is not None:
                        seen.update(item_id for item_id, removal in zip(batch.item_ids, batch.remove)
                                    if not removal)
                    self.catalog.apply_batch(batch, response.watermark)
                    if seen is not None and response.watermark >= self._target:
                        removed = self.catalog.retain_only(seen, response.watermark)
                        log.info("full resync done",
                                 extra={"removed": removed, "data_lsn": response.watermark})
                        seen, resync = None, False
                        self._resynced.set()
                    self.messages += 1
                    self._applying = False
                    backoff = 0.2
                    metrics.ITEM_CHANGES.inc(len(batch))
                    metrics.DATA_LSN.set(self.catalog.watermark)
                    self._mark_ready_if_caught_up()
                    if self._stop.is_set():
                        return
                raise FeaturesUnavailable("WatchItems stream ended")
            except (grpc.RpcError, FeaturesUnavailable) as error:
                self._applying = False
                self.connected.clear()
                if self._stop.is_set():
                    return
                if self._resync_asked.is_set():
                    continue          # cancelled by request_resync: start over at once
                if isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    resync = True
                metrics.FEED_RECONNECTS.inc()
                detail = error.code().name if isinstance(error, grpc.RpcError) else str(error)
                log.warning("item feed interrupted; resuming", extra={"error": detail,
                                                                      "after_lsn": self.catalog.watermark})
            except Exception:  # noqa: BLE001 - keep the feed alive whatever a message holds
                self._applying = False
                self.connected.clear()
                log.exception("item feed failed; resuming")
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
