"""python -m services.ranker — one ranker replica: its parts built from the settings
(config.py) and wired together; the order they start and stop in is lifecycle.py.
"""
from __future__ import annotations

import os
import sys

# Requests run in parallel threads: one intra-op thread each, for every BLAS in the process.
# (Must be set before numpy / torch / faiss are imported.)
_THREADS = os.environ.get("RANKER_TORCH_THREADS", "1")
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, _THREADS)

import faiss  # noqa: E402
import torch  # noqa: E402

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc  # noqa: E402

from services.common.boot import Boot  # noqa: E402
from services.feedback.attribution import Attribution  # noqa: E402
from services.feedback.impressions import ImpressionBuffer, postgres_writer  # noqa: E402
from services.ranker.admission import AdmissionControl  # noqa: E402
from services.ranker.artifact_reader import ArtifactReader  # noqa: E402
from services.ranker.catalog import Catalog  # noqa: E402
from services.ranker.filters import default_exclusions  # noqa: E402
from services.ranker.config import RankerConfig, check_settings  # noqa: E402
from services.ranker.features_client import FeaturesClient  # noqa: E402
from services.ranker.hot_swap import ModelManager  # noqa: E402
from services.ranker.index_digest import IndexDigester  # noqa: E402
from services.ranker.item_feed import ItemFeed  # noqa: E402
from services.ranker.lifecycle import ReplicaLifecycle  # noqa: E402
from services.ranker.model_watch import EtcdModelWatcher  # noqa: E402
from services.ranker.query_encoder import CachedEncoder, LocalEncoder  # noqa: E402
from services.ranker.recommend import Recommender  # noqa: E402
from services.ranker.registration import Registration, advertised_address  # noqa: E402
from services.ranker.repair import ReplicaRepair  # noqa: E402
from services.ranker.replica import RankerReplica  # noqa: E402
from services.ranker.request_path import RequestPath  # noqa: E402
from services.ranker.routing import ServingState  # noqa: E402
from services.ranker.search import Searcher  # noqa: E402
from services.ranker.server import RankerServicer  # noqa: E402
from services.ranker.user_cache import UserCache  # noqa: E402
from services.ranker.user_feed import UserFeed  # noqa: E402


def main(drop_feed_updates=None) -> int:
    """`drop_feed_updates`: a failure drill's hook (tests/ranker_drills.py); the service runs without."""
    boot = Boot.load("ranker", RankerConfig, check=check_settings)
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
    recommender = Recommender(catalog, state, path, default_filters=default_exclusions(config.default_exclude))
    searcher = Searcher(catalog, state, path, encoder)
    replica = RankerReplica(replica_id, catalog, state, recommender, searcher)

    attribution = None
    if config.attribution:
        impressions = ImpressionBuffer(postgres_writer(boot.database(pool_size=1)),
                                       capacity=config.impression_queue).start()
        attribution = Attribution(impressions)
    service = boot.grpc_service(ranker_pb2, "RankerService")
    ranker_pb2_grpc.add_RankerServiceServicer_to_server(
        RankerServicer(replica, IndexDigester(catalog), ReplicaRepair(catalog, feed, manager, watcher),
                       attribution), service.server)
    if attribution is not None:
        service.on_shutdown(impressions.close)
    replica.address = advertised_address(config.bind_host, service.port, config.advertise_host)
    registration = Registration(etcd, replica_id, replica.status, ttl_s=config.lease_ttl_s,
                                interval_s=config.register_interval_s)
    manager.on_change = registration.poke
    lifecycle = ReplicaLifecycle(replica_id, catalog, state, features, feed, reader, manager, watcher,
                                 registration, config.startup_timeout_s, user_feed=UserFeed(features, users))
    service.on_shutdown(lifecycle.stop)
    return boot.run(lambda: lifecycle.start(service))


if __name__ == "__main__":
    sys.exit(main())
