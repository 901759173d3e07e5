"""Features service settings (environment variables)."""
from __future__ import annotations

import dataclasses

from services.common.config import GRPC_TARGET, CommonConfig, env


@dataclasses.dataclass(frozen=True)
class FeaturesConfig(CommonConfig):
    # Required; the empty default only exists because dataclass fields with defaults (the
    # common ones) cannot be followed by one without. An empty value fails the pattern check.
    collector_address: str = env("COLLECTOR_ADDRESS", "", pattern=GRPC_TARGET,
                                 help="gRPC target of the collector whose delta stream we consume: host:port or "
                                      "dns:///name:port (required)")
    consumer_group: str = env("FEATURES_CONSUMER_GROUP", "features", pattern=r"[a-z][a-z0-9_]{0,40}",
                              help="consumer group (replication slot) of the delta stream")
    delta_batch_size: int = env("FEATURES_DELTA_BATCH_SIZE", 500, minimum=1, maximum=100_000,
                                help="most deltas per batch asked of the collector")
    history_length: int = env("FEATURES_HISTORY_LENGTH", 50, minimum=1, maximum=10_000,
                              help="interactions kept per user (most recent)")
    seen_items: int = env("FEATURES_SEEN_ITEMS", 1000, minimum=0, maximum=100_000,
                          help="distinct items of a user's whole history kept for the ranker's "
                               "exclude-seen/purchased filters (least recently touched drop out "
                               "first; 0 = no limit)")
    recent_queries: int = env("FEATURES_RECENT_QUERIES", 20, minimum=0, maximum=1_000,
                              help="distinct search queries kept per user (most recent)")
    popularity_half_life_s: float = env("FEATURES_POPULARITY_HALF_LIFE_S", 7 * 86400.0, minimum=1.0,
                                        help="half-life of the time-decayed item popularity")
    embed_batch_size: int = env("FEATURES_EMBED_BATCH_SIZE", 64, minimum=1, maximum=4096,
                                help="most texts in one model call")
    embed_max_wait_ms: float = env("FEATURES_EMBED_MAX_WAIT_MS", 5.0, minimum=0.0, maximum=1000.0,
                                   help="how long a query waits for others to share a model call")
    embed_cache_size: int = env("FEATURES_EMBED_CACHE_SIZE", 10_000, minimum=0, maximum=10_000_000,
                                help="query embeddings kept in memory (LRU)")
    torch_threads: int = env("FEATURES_TORCH_THREADS", 2, minimum=1, maximum=256,
                             help="CPU threads of the embedding model")
    text_model_retry_s: float = env("FEATURES_TEXT_MODEL_RETRY_S", 5.0, minimum=0.1, maximum=600.0,
                                    help="first wait before loading the text model again after a failed "
                                         "load (doubles, at most 120 s); events are applied meanwhile")
    watermark_interval_s: float = env("FEATURES_WATERMARK_INTERVAL_S", 0.2, minimum=0.0, maximum=60.0,
                                      help="least time between two publications of data/watermark")
    watch_poll_s: float = env("FEATURES_WATCH_POLL_S", 1.0, minimum=0.05, maximum=60.0,
                              help="WatchItems re-reads the store at least this often (changes made by "
                                   "another process, e.g. a second replica's Resync)")
