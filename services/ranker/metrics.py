"""Prometheus metrics of the ranker (served on METRICS_PORT by the common server bootstrap)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MODEL_VERSION = Gauge("deltarec_ranker_model_version", "model version served", ["variant"])
CANARY_SHARE = Gauge("deltarec_ranker_canary_share", "share of users routed to the canary version (0 = none)")
SWAPS = Counter("deltarec_ranker_swaps_total", "model swaps completed")
SWAP_SECONDS = Histogram("deltarec_ranker_swap_seconds", "artifact read to swap, seconds",
                         buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
REFUSED = Counter("deltarec_ranker_refused_artifacts_total", "artifacts refused", ["reason"])
EXACT_RESCANS = Counter("deltarec_ranker_index_exact_rescans_total",
                        "searches whose float16 candidates could not prove the top k exact, answered by a full "
                        "exact scan instead")
INDEX_SIZE = Gauge("deltarec_ranker_index_size", "items in the live index", ["index"])
DATA_LSN = Gauge("deltarec_ranker_data_lsn", "data watermark applied by this replica")
ITEM_CHANGES = Counter("deltarec_ranker_item_changes_total", "item changes applied from WatchItems")
FEED_RECONNECTS = Counter("deltarec_ranker_feed_reconnects_total", "WatchItems stream reconnects")
REJECTED = Counter("deltarec_ranker_rejected_total", "requests refused by admission control", ["method"])
USER_CACHE = Counter("deltarec_ranker_user_cache_total", "user feature cache lookups", ["result"])
DEGRADED = Counter("deltarec_ranker_degraded_total", "answers without user features (features unreachable)")
MIN_LSN_WAIT = Histogram("deltarec_ranker_min_lsn_wait_seconds", "time spent waiting for min_data_lsn",
                         buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
USER_CHANGES = Counter("deltarec_ranker_user_changes_total", "user changes received from WatchUsers")
USER_FEED_RECONNECTS = Counter("deltarec_ranker_user_feed_reconnects_total", "WatchUsers stream reconnects")
USER_STREAM_LSN = Gauge("deltarec_ranker_user_stream_lsn", "position of the user-change stream applied")
USER_CACHE_ENTRIES = Gauge("deltarec_ranker_user_cache_entries", "users held by the user cache")
CONSISTENCY_WAIT = Histogram("deltarec_ranker_consistency_wait_seconds",
                             "time an answer waited for the items to reach the user's latest change",
                             buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
INCONSISTENT_ANSWERS = Counter("deltarec_ranker_inconsistent_answers_total",
                               "answers whose items never reached the user's latest change in time (degraded)")
NEW_ITEM_STATS_READ = Counter("deltarec_ranker_new_item_stats_read_total",
                              "popularity values of items without a learned id read from features")
NEW_ITEM_STATS_FAILURES = Counter("deltarec_ranker_new_item_stats_failures_total",
                                  "rounds of reading new items' popularity that features did not answer")
