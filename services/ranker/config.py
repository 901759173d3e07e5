"""Ranker settings (environment variables)."""
from __future__ import annotations

import dataclasses

from services.common.config import GRPC_TARGET, CommonConfig, ConfigError, env
from services.model.new_items import DEFAULT_NEW_ITEM_SLOTS
from services.ranker.filters import EXCLUDE_POLICIES
from services.ranker.index_structures import FLAT_CODES, TEXT_BUILD_PRIORITY, IndexOptions
from services.ranker.workers import check_worker_settings


@dataclasses.dataclass(frozen=True)
class RankerConfig(CommonConfig):
    # Up to 16 handler threads, of which only GRPC_RUNNING_HANDLERS run at once; the others are
    # calls waiting (read-your-writes, a features read on a cache miss, admission). The server
    # takes up to 4x GRPC_WORKERS calls at once (queued for a thread); more are refused with
    # RESOURCE_EXHAUSTED. Measured (bench/ranker.py, Beauty, users cached): 16 threads serve 1.4x
    # the requests/s of 64 at concurrency 8, and 1 running of 16 1.24-1.33x again, at 25-30% less
    # CPU per request (README "Serving"): on two cores runnable threads only contend for the GIL.
    grpc_workers: int = env("GRPC_WORKERS", 16, minimum=1, maximum=1024)
    grpc_running_handlers: int = env("GRPC_RUNNING_HANDLERS", 1, minimum=0, maximum=1024,
                                     help="handler threads that run at once, apart from those waiting "
                                          "(services/common/handler_pool.py); 0 or >= GRPC_WORKERS = all")
    replica_id: str = env("RANKER_REPLICA_ID", "", pattern=r"[A-Za-z0-9._\-]{0,128}",
                          help="name of this replica under rankers/ in etcd (default: host-pid)")
    # Required; a default only because dataclass fields with defaults precede it (see check_settings()).
    features_address: str = env("FEATURES_ADDRESS", "", pattern=f"({GRPC_TARGET})?",
                                help="gRPC target (host:port, dns:///name:port) of the features service "
                                     "(user histories, item feed, EmbedText); required")
    features_timeout_s: float = env("RANKER_FEATURES_TIMEOUT_S", 0.5, minimum=0.01, maximum=60.0,
                                    help="deadline of a GetUserFeatures call (capped by the request's)")
    query_encoder: str = env("RANKER_QUERY_ENCODER", "features", choices=("features", "local"),
                             help="embed search queries through features.EmbedText or with MiniLM in-process")
    index_kind: str = env("RANKER_INDEX", "auto", choices=("auto", "flat", "hnsw"),
                          help="faiss index: flat (exact), hnsw, or auto (flat below RANKER_HNSW_MIN_ITEMS)")
    # At dim 64 HNSW search is faster from ~22k items, but every model swap rebuilds it and its
    # recall is below 1 (the figures: IndexOptions.hnsw_min_items). At dim 384 flat is already
    # 1.7 ms at 25k against 0.37 ms, and the text index is built once, not per swap.
    hnsw_min_items: int = env("RANKER_HNSW_MIN_ITEMS", IndexOptions.hnsw_min_items, minimum=1,
                              help="items from which auto uses HNSW for the model-space indexes")
    text_hnsw_min_items: int = env("RANKER_TEXT_HNSW_MIN_ITEMS", 20_000, minimum=1,
                                   help="the same for the 384-d text index Search uses "
                                        "(built once, not per swap)")
    hnsw_m: int = env("RANKER_HNSW_M", 32, minimum=4, maximum=256)
    # float16 halves the bytes every flat scan reads (the answers stay exact: re-ranked with the
    # float32 vectors, checked against the codes' error bound; index_structures.py).
    flat_codes: str = env("RANKER_FLAT_CODES", IndexOptions.flat_codes, choices=FLAT_CODES,
                          help="codes a flat index scans: float16 (exact after re-ranking) or float32")
    hnsw_ef_search: int = env("RANKER_HNSW_EF_SEARCH", 128, minimum=8, maximum=4096)
    hnsw_ef_construction: int = env("RANKER_HNSW_EF_CONSTRUCTION", 80, minimum=8, maximum=4096)
    reuse_index_graph: bool = env("RANKER_REUSE_INDEX_GRAPH", IndexOptions.reuse_graph,
                                  help="a swap's HNSW index takes the served version's graph with the new "
                                       "vectors when its sampled recall holds (an incremental update), "
                                       "instead of building one")
    rebuild_dead_fraction: float = env("RANKER_REBUILD_DEAD_FRACTION", 0.25, minimum=0.01, maximum=10.0,
                                       help="HNSW is rebuilt in the background when dead rows exceed "
                                            "this share")
    max_running: int = env("RANKER_MAX_RUNNING", 8, minimum=1, maximum=1024,
                           help="requests handled at once (each waits on GetUserFeatures for part of its "
                                "time: ~4x the cores measured best)")
    max_waiting: int = env("RANKER_MAX_WAITING", 48, minimum=0, maximum=100_000,
                           help="requests allowed to wait for a slot; more are refused with "
                                "RESOURCE_EXHAUSTED")
    # Measured (bench/scale.py, tracemalloc): 16 KB per cached user with a 50-entry history and a
    # 200-item seen set (a Beauty-like user with ~9 items: ~2 KB); 50k users ~ 0.8 GB at worst.
    # WatchUsers keeps entries exact, so the size only decides the hit rate.
    user_cache_size: int = env("RANKER_USER_CACHE_SIZE", 50_000, minimum=0, maximum=100_000_000,
                               help="users whose state this replica keeps (LRU; kept exact by the "
                                    "features.WatchUsers stream); 0 = read every request")
    user_cache_ttl_s: float = env("RANKER_USER_CACHE_TTL_S", 1.0, minimum=0.0, maximum=3600.0,
                                  help="only while the WatchUsers stream is down: how long a user's state "
                                       "read from features is reused (0 = always read); min_data_lsn "
                                       "always reads through")
    user_stale_s: float = env("RANKER_USER_STALE_S", 3600.0, minimum=0.0, maximum=86_400.0,
                              help="how old a cached user state may be to serve a degraded answer while "
                                   "features cannot answer (0 = never)")
    default_exclude: str = env("RANKER_DEFAULT_EXCLUDE", "seen", choices=EXCLUDE_POLICIES,
                               help="what Recommend leaves out when the request's filters do not say: "
                                    "seen (every item the user interacted with; suits a storefront's "
                                    "recommendation slots), purchased, or none")
    new_item_slots: int = env("RANKER_NEW_ITEM_SLOTS", DEFAULT_NEW_ITEM_SLOTS, minimum=0, maximum=100,
                              help="places at the end of a personal Recommend answer reserved for new items "
                                   "(no learned id yet) that have interactions, best first by text and "
                                   "popularity (services/model/new_items.py); 0 = the plain ranking")
    new_item_stats_interval_s: float = env("RANKER_NEW_ITEM_STATS_INTERVAL_S", 5.0, minimum=0.0, maximum=3600.0,
                                           help="how often the popularity of items without a learned id is "
                                                "read from features (GetItemFeatures); 0 = never (their "
                                                "popularity then moves only with their catalog changes)")
    history_length: int = env("RANKER_HISTORY_LENGTH", 50, minimum=1, maximum=1000,
                              help="history items asked of features (the model uses at most its max_len)")
    # features' WatchItems and WatchUsers follow every commit, so the wait is about as long as
    # features takes to apply the write (tens of ms), not a heartbeat interval.
    max_wait_s: float = env("RANKER_MAX_LSN_WAIT_S", 10.0, minimum=0.0, maximum=600.0,
                            help="longest wait for min_data_lsn (also capped by the call's deadline)")
    lease_ttl_s: int = env("RANKER_LEASE_TTL_S", 10, minimum=2, maximum=3600,
                           help="TTL of the rankers/<replica> registration lease")
    register_interval_s: float = env("RANKER_REGISTER_INTERVAL_S", 2.0, minimum=0.1, maximum=3600.0)
    startup_timeout_s: float = env("RANKER_STARTUP_TIMEOUT_S", 300.0, minimum=1.0,
                                   help="longest wait for the catalog and the first model before exiting")
    torch_threads: int = env("RANKER_TORCH_THREADS", 1, minimum=1, maximum=256,
                             help="intra-op threads of torch and faiss (requests run in parallel instead)")
    artifact_retry_s: float = env("RANKER_ARTIFACT_RETRY_S", 10.0, minimum=0.1, maximum=3600.0,
                                  help="retry interval of an artifact that could not be read "
                                       "(missing, store down)")
    attribution: bool = env("RANKER_ATTRIBUTION", True,
                            help="stamp answers with a recommendation_id and record their impressions")
    impression_queue: int = env("RANKER_IMPRESSION_QUEUE", 100_000, minimum=1, maximum=10_000_000,
                                help="impressions buffered in memory before new ones are dropped (counted)")

    # Worker processes (services/ranker/workers.py, supervisor.py; README "Serving", "Workers").
    workers: int = env("RANKER_WORKERS", 1, minimum=1, maximum=64,
                       help="ranker processes of this replica, each a complete replica with its own "
                            "catalog, indexes and user cache (N times the memory), serving GRPC_PORT "
                            "together through SO_REUSEPORT under a supervisor; 1 = one process, no "
                            "supervisor")
    worker_index: int = env("RANKER_WORKER_INDEX", -1, minimum=-1, maximum=63,
                            help="set by the supervisor for its workers (do not set): -1 = not a worker")
    worker_grpc_port: int = env("RANKER_WORKER_GRPC_PORT", 0, minimum=0, maximum=65535,
                                help="with RANKER_WORKERS > 1: worker i also listens alone on this + i "
                                     "(0 = a free port each) and registers that address, so the "
                                     "consistency service reaches each worker itself")

    @property
    def reuse_port(self) -> bool:
        """A worker shares GRPC_PORT (and HEALTH_PORT) with its siblings."""
        return self.worker_index >= 0

    @property
    def own_port(self) -> int | None:
        """A worker's own port (GrpcService `own_port`), None outside worker mode."""
        return self.worker_grpc_port if self.worker_index >= 0 else None

    def index_options(self, text: bool = False) -> IndexOptions:
        """Options of the model-space item indexes, or (text=True) of the text index."""
        return IndexOptions(kind=self.index_kind,
                            hnsw_min_items=self.text_hnsw_min_items if text else self.hnsw_min_items,
                            hnsw_m=self.hnsw_m, hnsw_ef_search=self.hnsw_ef_search,
                            hnsw_ef_construction=self.hnsw_ef_construction,
                            rebuild_dead_fraction=self.rebuild_dead_fraction,
                            reuse_graph=self.reuse_index_graph, flat_codes=self.flat_codes,
                            build_priority=TEXT_BUILD_PRIORITY if text else IndexOptions.build_priority)


def check_settings(config: RankerConfig) -> None:
    """What `env()` cannot express; a failure stops the start like a bad variable (exit 2)."""
    if not config.features_address:
        raise ConfigError("FEATURES_ADDRESS is required (host:port of the features service)")
    if config.workers > 1 and config.worker_index >= 0:
        raise ConfigError("RANKER_WORKER_INDEX is set by the supervisor for its workers, each with "
                          "RANKER_WORKERS=1: do not set it with RANKER_WORKERS > 1")
    check_worker_settings(config.workers, replica_id=config.replica_id, metrics_port=config.metrics_port,
                          worker_grpc_port=config.worker_grpc_port, grpc_port=config.grpc_port,
                          health_port=config.health_port)
