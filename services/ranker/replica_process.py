"""One ranker replica in this process: its parts built from the settings (config.py) and wired
together; the order they start and stop in is lifecycle.py. `python -m services.ranker` runs
this directly, or (RANKER_WORKERS > 1) as each worker process of a supervisor (supervisor.py).
The environment's thread settings are set by __main__ before numpy, torch or faiss are imported.
"""
from __future__ import annotations

import faiss
import torch

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc

from services.common.boot import Boot
from services.feedback.attribution import Attribution
from services.feedback.impressions import ImpressionBuffer, postgres_writer
from services.ranker.admission import AdmissionControl
from services.ranker.artifact_reader import ArtifactReader
from services.ranker.catalog import Catalog
from services.ranker.filters import default_exclusions
from services.ranker.config import RankerConfig
from services.ranker.features_client import FeaturesClient
from services.ranker.hot_swap import ModelManager
from services.ranker.index_digest import IndexDigester
from services.ranker.item_feed import ItemFeed
from services.ranker.lifecycle import ReplicaLifecycle
from services.ranker.model_watch import EtcdModelWatcher
from services.ranker.new_item_stats import NewItemStats
from services.ranker.query_encoder import CachedEncoder, LocalEncoder
from services.ranker.recommend import Recommender
from services.ranker.registration import Registration, advertised_address
from services.ranker.repair import ReplicaRepair
from services.ranker.replica import RankerReplica
from services.ranker.request_path import RequestPath
from services.ranker.routing import ServingState
from services.ranker.search import Searcher
from services.ranker.server import RankerServicer
from services.ranker.user_cache import UserCache
from services.ranker.user_feed import UserFeed
from services.ranker.supervisor import watch_supervisor


def serve(boot: Boot[RankerConfig], drop_feed_updates=None) -> int:
    """`drop_feed_updates`: a failure drill's hook (tests/ranker_drills.py); the service runs without."""
    config = boot.config
    torch.set_num_threads(config.torch_threads)
    faiss.omp_set_num_threads(config.torch_threads)
    replica_id = boot.instance_id(config.replica_id)

    catalog = Catalog(config.index_options(text=True))
    features = FeaturesClient(config.features_address, config.features_timeout_s)
    feed = ItemFeed(features, catalog, drop_updates=drop_feed_updates)
    state = ServingState()
    reader = ArtifactReader(config.database_url)
    manager = ModelManager(catalog, state, reader, config.index_options(), retry_s=config.artifact_retry_s)
    etcd = boot.etcd()
    watcher = EtcdModelWatcher(etcd, manager)
    users = UserCache(features, config.user_cache_ttl_s, config.user_cache_size, stale_s=config.user_stale_s)
    encoder = CachedEncoder(LocalEncoder() if config.query_encoder == "local" else features)
    admission = AdmissionControl(config.max_running, config.max_waiting)
    path = RequestPath(catalog, users, admission, history_length=config.history_length,
                       max_wait_s=config.max_wait_s)
    recommender = Recommender(catalog, state, path, default_filters=default_exclusions(config.default_exclude),
                              new_item_slots=config.new_item_slots)
    searcher = Searcher(catalog, state, path, encoder)
    new_item_stats = NewItemStats(features, catalog, state, config.new_item_stats_interval_s)
    replica = RankerReplica(replica_id, catalog, state, recommender, searcher, new_item_stats=new_item_stats)

    attribution = None
    if config.attribution:
        impressions = ImpressionBuffer(postgres_writer(boot.database(pool_size=1)),
                                       capacity=config.impression_queue).start()
        attribution = Attribution(impressions)
    registration = Registration(etcd, replica_id, replica.status, ttl_s=config.lease_ttl_s,
                                interval_s=config.register_interval_s)
    manager.on_change = registration.poke
    lifecycle = ReplicaLifecycle(replica_id, catalog, state, features, feed, reader, manager, watcher,
                                 registration, config.startup_timeout_s, user_feed=UserFeed(features, users),
                                 new_item_stats=new_item_stats)
    worker = config.worker_index >= 0
    if worker:
        # Not listening before it can answer: the shared port's other workers serve meanwhile.
        watch_supervisor()
        lifecycle.catch_up()
    service = boot.grpc_service(ranker_pb2, "RankerService")
    ranker_pb2_grpc.add_RankerServiceServicer_to_server(
        RankerServicer(replica, IndexDigester(catalog), ReplicaRepair(catalog, feed, manager, watcher),
                       attribution), service.server)
    if attribution is not None:
        service.on_shutdown(impressions.close)
    # A worker registers its own port: calls to the shared one reach whichever worker the kernel picks.
    replica.address = advertised_address(config.bind_host, service.own_port if worker else service.port,
                                         config.advertise_host)
    service.on_shutdown(lifecycle.stop)
    return boot.run(lifecycle.register if worker else lambda: lifecycle.start(service))

