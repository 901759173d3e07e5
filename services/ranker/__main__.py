"""python -m services.ranker — one ranker replica.

Start-up: follow the features item feed until the catalog has caught up, then read
`model/current` / `model/canary` from etcd and load them, then report ready (health SERVING and
the DELTAREC_READY line) and register under `rankers/<replica>`. With no model published yet the
replica serves popular/fresh items and text search (model_version 0); with etcd unreachable it
starts without a model and picks one up when etcd returns.
"""
from __future__ import annotations

import os
import sys

# Requests run in parallel threads: one intra-op thread each, for every BLAS in the process.
# (Must be set before numpy / torch / faiss are imported.)
_THREADS = os.environ.get("RANKER_TORCH_THREADS", "1")
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, _THREADS)

import logging  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import torch  # noqa: E402

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc  # noqa: E402

from services.common import logs  # noqa: E402
from services.common.config import ConfigError, load  # noqa: E402
from services.common.etcd import Etcd  # noqa: E402
from services.common.server import GrpcService, run_service  # noqa: E402
from services.ranker.admission import AdmissionControl  # noqa: E402
from services.ranker.artifact_reader import ArtifactReader  # noqa: E402
from services.ranker.catalog import Catalog  # noqa: E402
from services.ranker.config import RankerConfig  # noqa: E402
from services.ranker.features_client import FeaturesClient  # noqa: E402
from services.ranker.hot_swap import ModelManager  # noqa: E402
from services.ranker.item_feed import ItemFeed  # noqa: E402
from services.ranker.model_watch import EtcdModelWatcher  # noqa: E402
from services.ranker.query_encoder import CachedEncoder, LocalEncoder  # noqa: E402
from services.ranker.recommend import Recommender  # noqa: E402
from services.ranker.registration import Registration  # noqa: E402
from services.ranker.replica import RankerReplica  # noqa: E402
from services.ranker.request_path import RequestPath  # noqa: E402
from services.ranker.routing import ServingState  # noqa: E402
from services.ranker.search import Searcher  # noqa: E402
from services.ranker.server import RankerServicer  # noqa: E402
from services.ranker.user_cache import UserCache  # noqa: E402

log = logging.getLogger("deltarec.ranker")


def main() -> int:
    try:
        config = load(RankerConfig)
        if not config.features_address:
            raise ConfigError("FEATURES_ADDRESS is required (host:port of the features service)")
    except ConfigError as error:
        print(f"ranker: configuration error: {error}", file=sys.stderr)
        return 2
    logs.setup("ranker", config.log_level)
    torch.set_num_threads(config.torch_threads)
    faiss.omp_set_num_threads(config.torch_threads)
    replica_id = config.replica_id or f"{socket.gethostname()}-{os.getpid()}"

    catalog = Catalog(config.index_options(text=True))
    features = FeaturesClient(config.features_address, config.features_timeout_s)
    feed = ItemFeed(features, catalog)
    state = ServingState()
    reader = ArtifactReader(config.database_url)
    manager = ModelManager(catalog, state, reader, config.index_options(), retry_s=config.artifact_retry_s)
    etcd = Etcd(config.etcd_endpoint, config.etcd_prefix)
    watcher = EtcdModelWatcher(etcd, manager)
    users = UserCache(features, config.user_cache_ttl_s, config.user_cache_size)
    encoder = CachedEncoder(LocalEncoder() if config.query_encoder == "local" else features)
    admission = AdmissionControl(config.max_running, config.max_waiting)
    path = RequestPath(catalog, users, admission, history_length=config.history_length,
                       max_wait_s=config.max_wait_s)
    recommender = Recommender(catalog, state, path)
    searcher = Searcher(catalog, state, path, encoder)
    replica = RankerReplica(replica_id, catalog, state, recommender, searcher)

    service = GrpcService.from_config(
        "ranker", [ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name], config)
    ranker_pb2_grpc.add_RankerServiceServicer_to_server(RankerServicer(replica), service.server)
    host = socket.gethostname() if config.bind_host in ("0.0.0.0", "::", "[::]") else config.bind_host
    replica.address = f"{host}:{service.port}"
    registration = Registration(etcd, replica_id, replica.status, ttl_s=config.lease_ttl_s,
                                interval_s=config.register_interval_s)
    manager.on_change = registration.poke

    def ready_check() -> None:
        deadline = time.monotonic() + config.startup_timeout_s
        feed.start()
        if not catalog.ready.wait(config.startup_timeout_s):
            log.error("catalog not caught up in time; is the features service at FEATURES_ADDRESS up?",
                      extra={"features_address": config.features_address})
            service.stop(0)
            raise SystemExit(1)
        manager.start()
        watcher.start()
        if watcher.synced.wait(min(10.0, max(deadline - time.monotonic(), 0.1))):
            manager.idle.wait(max(deadline - time.monotonic(), 0.1))
        else:
            log.warning("etcd unreachable at start: serving without a model until it returns")
        routing = state.routing
        log.info("serving", extra={"replica_id": replica_id, "items": catalog.active_count,
                                   "model_version": routing.current.version if routing.current else 0,
                                   "data_lsn": catalog.watermark})
        registration.start()

    def shutdown() -> None:
        registration.stop()
        watcher.stop()
        manager.stop()
        feed.stop()
        features.close()
        reader.close()
        etcd.close()

    service.on_shutdown(shutdown)
    run_service(service, ready_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
