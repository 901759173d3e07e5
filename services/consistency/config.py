"""Consistency service settings (environment variables, CONSISTENCY_*)."""
from __future__ import annotations

import dataclasses

from services.common.config import GRPC_TARGET, CommonConfig, ConfigError, env


@dataclasses.dataclass(frozen=True)
class ConsistencyConfig(CommonConfig):
    instance_id: str = env("CONSISTENCY_INSTANCE_ID", "", pattern=r"[A-Za-z0-9._\-]{0,128}",
                           help="name of this instance (default: host name and pid)")
    features_address: str = env("FEATURES_ADDRESS", "", pattern=f"({GRPC_TARGET})?",
                                help="gRPC target of the features service (re-embedding and user rebuilds)")
    collector_address: str = env("COLLECTOR_ADDRESS", "", pattern=f"({GRPC_TARGET})?",
                                 help="gRPC target of the collector (dropping a named slot); "
                                      "empty: dropped directly in Postgres")
    features_consumer: str = env("CONSISTENCY_FEATURES_CONSUMER", "features", pattern=r"[a-z][a-z0-9_]{0,40}",
                                 help="consumer group of the features service")
    trainer_consumer: str = env("CONSISTENCY_TRAINER_CONSUMER", "trainer", pattern=r"[a-z][a-z0-9_]{0,40}",
                                help="consumer group of the trainer (its interaction log)")
    check_interval_s: float = env("CONSISTENCY_CHECK_INTERVAL_S", 60.0, minimum=0.0, maximum=86400.0,
                                  help="period of the background check; 0 = only on request")
    version_grace_s: float = env("CONSISTENCY_VERSION_GRACE_S", 30.0, minimum=0.0, maximum=86400.0,
                                 help="how long a replica may serve another version than model/current "
                                      "(a swap in progress) before it is an error")
    settle_s: float = env("CONSISTENCY_SETTLE_S", 15.0, minimum=0.0, maximum=600.0,
                          help="how long a check waits for a consumer to pass the WAL position of a "
                               "difference before calling it lag instead of drift")
    slot_abandoned_s: float = env("CONSISTENCY_SLOT_ABANDONED_S", 300.0, minimum=0.0, maximum=30 * 86400.0,
                                  help="a replication slot with no consumer for this long is abandoned")
    lag_warning_bytes: int = env("CONSISTENCY_LAG_WARNING_BYTES", 256 * 1024 * 1024, minimum=0,
                                 help="consumer lag (bytes of WAL) above which a lasting lag is a warning")
    lag_warning_s: float = env("CONSISTENCY_LAG_WARNING_S", 120.0, minimum=0.0,
                               help="how long a consumer may stay behind before it is a warning")
    retained_wal_error_bytes: int = env("CONSISTENCY_RETAINED_WAL_ERROR_BYTES", 8 * 1024 ** 3, minimum=0,
                                        help="WAL retained by one slot above which it is an error")
    history_length: int = env("CONSISTENCY_HISTORY_LENGTH", 50, minimum=1, maximum=10_000,
                              help="the features service's FEATURES_HISTORY_LENGTH (expected history size)")
    replica_timeout_s: float = env("CONSISTENCY_REPLICA_TIMEOUT_S", 5.0, minimum=0.1, maximum=120.0,
                                   help="deadline of a call to a ranker replica")
    repair_timeout_s: float = env("CONSISTENCY_REPAIR_TIMEOUT_S", 120.0, minimum=1.0, maximum=3600.0,
                                  help="deadline of one repair call (resync, rebuild, reload)")
    max_repair_keys: int = env("CONSISTENCY_MAX_REPAIR_KEYS", 10_000, minimum=1, maximum=10_000,
                               help="most items or users one repair call re-embeds or rebuilds")
    leader_ttl_s: int = env("CONSISTENCY_LEADER_TTL_S", 10, minimum=2, maximum=3600,
                            help="TTL of the repairer lease (consistency/repairer)")
    history_keep: int = env("CONSISTENCY_HISTORY_KEEP", 10_000, minimum=10,
                            help="history rows kept (older ones are pruned)")
    # ---- the feedback loop (issue 14): the delta-stream join, the online metrics, the decider loop
    feedback_enabled: bool = env("FEEDBACK_ENABLED", True,
                                 help="consume impressions and events into the online metrics "
                                      "(needs COLLECTOR_ADDRESS; OnlineMetrics says so without it)")
    feedback_consumer: str = env("CONSISTENCY_FEEDBACK_CONSUMER", "feedback", pattern=r"[a-z][a-z0-9_]{0,40}",
                                 help="consumer group of the feedback join (one stream at a time: a "
                                      "second consistency instance stands by)")
    feedback_window_s: float = env("FEEDBACK_WINDOW_S", 3600.0, minimum=60.0, maximum=7 * 86400.0,
                                   help="the sliding window of the online metrics")
    feedback_bucket_s: float = env("FEEDBACK_BUCKET_S", 60.0, minimum=1.0, maximum=3600.0,
                                   help="time bucket of the window (its resolution)")
    feedback_attribution_s: float = env("FEEDBACK_ATTRIBUTION_S", 1800.0, minimum=1.0, maximum=7 * 86400.0,
                                        help="how long after an answer an event is attributed to it")
    feedback_hold_s: float = env("FEEDBACK_HOLD_S", 30.0, minimum=0.0, maximum=3600.0,
                                 help="how long an event waits for its impression (flushed ~1 s after the "
                                      "answer) before it counts as unattributable")
    feedback_max_held: int = env("FEEDBACK_MAX_HELD", 100_000, minimum=1, maximum=10_000_000,
                                 help="most events waiting for their impression (the oldest hold ends early)")
    feedback_max_open_impressions: int = env("FEEDBACK_MAX_OPEN_IMPRESSIONS", 500_000, minimum=1,
                                             maximum=50_000_000,
                                             help="most impressions kept attributable in memory")
    feedback_stall_s: float = env("FEEDBACK_STALL_S", 30.0, minimum=1.0, maximum=3600.0,
                                  help="how long the feedback stream may fail before health says NOT_SERVING")
    feedback_export_interval_s: float = env("FEEDBACK_EXPORT_INTERVAL_S", 5.0, minimum=0.1, maximum=600.0,
                                            help="period of the online-metrics Prometheus gauges' refresh")
    canary_decide_interval_s: float = env("CANARY_DECIDE_INTERVAL_S", 30.0, minimum=0.0, maximum=86400.0,
                                          help="period of the canary decider loop; 0 = off")
    canary_decider_ttl_s: int = env("CANARY_DECIDER_TTL_S", 10, minimum=2, maximum=3600,
                                    help="TTL of the decider lease (canary/decider)")


def check_consistency_config(config: ConsistencyConfig) -> None:
    """Settings that only make sense together."""
    if config.feedback_bucket_s > config.feedback_window_s:
        raise ConfigError("FEEDBACK_BUCKET_S: larger than FEEDBACK_WINDOW_S")
