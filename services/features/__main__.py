"""python -m services.features — the features service.

Start-up: configuration, logs, schema migration, the embedding model's load started in the
background (text_model.py; once there it is owned by one thread: embedder.MicroBatcher), the
stored progress, then the delta stream consumer (group `features`) and the gRPC server.

Readiness: the service reports SERVING (and prints its ready line) as soon as the feature store
is migrated and reachable and the delta consumer is started — not when it has caught up, and not
when the text model has loaded: events and reads need no model (until it is there EmbedText is
UNAVAILABLE, a batch with item text to embed waits for it, Status.text_model_state says so).
A feature store that lags is still the best answer there is, and every
response says how fresh it is (`data_lsn`, Status.lag_*, the etcd key `data/watermark`), so
callers that need a given write can wait for its LSN; holding the whole service back during a
catalog bulk load or a long initial snapshot would only turn freshness into an outage.

Watermark: after every committed batch the applied LSN goes to etcd `data/watermark` as
{"lsn": N, "lsn_text": "X/Y", "consumer": ..., "commit_time": ..., "published_at": ...},
coalesced to at most one write per FEATURES_WATERMARK_INTERVAL_S, off the apply path (watermark.py).
"""
from __future__ import annotations

import logging
import sys

from deltarec.v1 import features_pb2, features_pb2_grpc

from services.common.boot import Boot
from services.common.readiness import Readiness, store_reachable
from services.common.delta_consumer import DeltaConsumer, row_of
from services.contracts.item_text import is_usable
from services.features.applier import ApplierSettings, FeatureApplier
from services.features.config import FeaturesConfig
from services.features.embedder import LruCache, MicroBatcher, QueryEmbedder
from services.features.item_feed import ItemChangeFeed, LsnNotifier
from services.features.user_feed import UserChangeFeed
from services.features.server import FeaturesServicer
from services.features.store import FeatureStore
from services.features.user_rebuild import UserRebuilder
from services.features.stream_handler import CommitFanout, StreamHandler
from services.features.stream_monitor import StreamMonitor
from services.features.text_model import TextModel, load_minilm
from services.features.watermark import WatermarkPublisher

log = logging.getLogger("deltarec.features")


def main() -> int:
    boot = Boot.load("features", FeaturesConfig)
    config = boot.config

    engine = boot.database(pool_size=min(config.grpc_workers, 16) + 2)
    # The model loads on a thread of its own (torch is imported there too): events
    # and reads need none of it, so a restarted service resumes before it is there (text_model.py).
    encoder = TextModel(lambda: load_minilm(config.torch_threads), retry_s=config.text_model_retry_s).start()
    batcher = MicroBatcher(encoder.encode, max_batch_size=config.embed_batch_size,
                           max_wait_s=config.embed_max_wait_ms / 1000.0, dim=encoder.dim)
    queries = QueryEmbedder(batcher, LruCache(config.embed_cache_size), usable=is_usable,
                            fallback=lambda text: encoder.fallback_vector(f"query:{text}"),
                            model_ready=encoder.require_ready)

    store = FeatureStore(engine, config.consumer_group)
    notifier = LsnNotifier()
    publisher = WatermarkPublisher(boot.etcd(), config.consumer_group, config.watermark_interval_s)
    on_commit = CommitFanout(notifier, publisher)
    applier = FeatureApplier(
        store, lambda texts: batcher.embed(texts, kind="bulk"), encoder.fallback_vector,
        ApplierSettings(model_name=encoder.model_name, history_length=config.history_length,
                        recent_queries=config.recent_queries, seen_items=config.seen_items,
                        popularity_half_life_s=config.popularity_half_life_s),
        row_of=row_of, on_commit=on_commit)
    progress = applier.load()
    on_commit(progress.applied_lsn)
    log.info("feature store loaded", extra={"applied_lsn": progress.applied_lsn,
                                            "snapshot_done": progress.snapshot_done})

    monitor = StreamMonitor()
    handler = StreamHandler(applier, monitor)
    # resume_lsn: the stored mark, read at each (re)connect. Every transaction committed at or
    # below it is applied (it is a batch's commit_lsn, a caught-up position or a Resync stamp
    # just above one), so the collector may skip them and pack the rest into full batches.
    consumer = DeltaConsumer(config.collector_address, config.consumer_group, handler.apply_batch,
                             tables=("items", "events"), max_batch_size=config.delta_batch_size,
                             on_heartbeat=handler.on_heartbeat, resume_lsn=store.applied_lsn)

    service = boot.grpc_service(features_pb2, "FeaturesService")
    # Every commit goes to the watchers at once (heartbeat 0): a ranker's watermark follows each
    # applied commit, so min_data_lsn for a write that touched no item is met without a wait.
    feed = ItemChangeFeed(store, notifier, poll_s=config.watch_poll_s, heartbeat_s=0.0)
    users_feed = UserChangeFeed(store, notifier, poll_s=config.watch_poll_s)
    features_pb2_grpc.add_FeaturesServiceServicer_to_server(
        FeaturesServicer(store, applier, queries, feed, model_name=encoder.model_name, dim=encoder.dim,
                         monitor=monitor, connected=consumer.connected.is_set, users_feed=users_feed,
                         text_model=encoder,
                         rebuilder=UserRebuilder(applier)),
        service.server)

    # After in-flight calls: the consumer finishes (and acks) the batch it is applying, then
    # the rest closes in dependency order (etcd and the database last, by boot.run).
    service.on_shutdown(consumer.stop)
    service.on_shutdown(notifier.close)
    service.on_shutdown(encoder.close)          # a batch waiting for the model stops waiting
    service.on_shutdown(batcher.close)
    service.on_shutdown(publisher.close)
    consumer.start()
    # Health follows progress: NOT_SERVING while the delta stream cannot be applied (Postgres
    # down, collector gone) for STALL_AFTER_S or the store is unreachable; SERVING again by itself.
    readiness = (Readiness(service).add("delta stream", lambda: consumer.progress_problem(config.stall_after_s))
                 .add("feature store", store_reachable(engine)))
    return boot.run(ready_check=readiness.start)


if __name__ == "__main__":
    sys.exit(main())
