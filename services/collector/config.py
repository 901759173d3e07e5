"""Collector settings (environment variables)."""
from __future__ import annotations

import dataclasses

from services.common.config import CommonConfig, env


@dataclasses.dataclass(frozen=True)
class CollectorConfig(CommonConfig):
    max_batch: int = env("COLLECTOR_MAX_BATCH", 1000, minimum=1, maximum=100_000,
                         help="most events or items in one request")
    max_clock_skew_s: float = env("COLLECTOR_MAX_CLOCK_SKEW_S", 300.0, minimum=0.0,
                                  help="how far in the future an event timestamp may be")
    replica_id: str = env("COLLECTOR_ID", "", help="id of this collector (default: host-pid)")
    # ---- change data capture (services/collector/cdc)
    cdc_enabled: bool = env("COLLECTOR_CDC_ENABLED", True,
                            help="serve the delta stream (Subscribe) and consumer-group admin")
    cdc_publication: str = env("COLLECTOR_PUBLICATION", "deltarec_cdc", pattern=r"[a-z_][a-z0-9_]{0,62}",
                               help="Postgres publication the slots decode (created if missing)")
    cdc_tables: str = env("COLLECTOR_CDC_TABLES", "items,events,impressions",
                          pattern=r"[a-z_][a-z0-9_.]*(,[a-z_][a-z0-9_.]*)*",
                          help="comma-separated tables in the publication")
    slot_prefix: str = env("COLLECTOR_SLOT_PREFIX", "", pattern=r"([a-z_][a-z0-9_]{0,30})?",
                           help="replication slot name prefix (slot = prefix + group); "
                                "default deltarec_<database>_ since slot names are cluster-wide")
    heartbeat_s: float = env("COLLECTOR_HEARTBEAT_S", 2.0, minimum=0.05, maximum=60.0,
                             help="idle streams get a heartbeat this often")
    buffer_deltas: int = env("COLLECTOR_BUFFER_DELTAS", 10_000, minimum=1, maximum=10_000_000,
                             help="per stream: most decoded deltas waiting for the consumer "
                                  "(one transaction larger than this is still admitted alone)")
    # Measured (bench/e2e_freshness.py, 100 events/s, one per IngestEvents): with 256 batches in
    # flight a consumer slower than the commit rate (features: ~17 ms per batch on a loaded
    # machine) gets 256 one-transaction batches queued ahead of a new event, ~4.5 s of lag that
    # never coalesces (event to changed recommendation p95 4.8 s); with 4 the collector keeps the
    # rest and packs it into full batches: p95 251 ms, features visible p95 237 ms.
    max_unacked_batches: int = env("COLLECTOR_MAX_UNACKED_BATCHES", 4, minimum=0, maximum=1_000_000,
                                   help="per stream: stop sending while this many batches are "
                                        "unacked (0 = no limit)")
    slot_lease_ttl_s: int = env("COLLECTOR_SLOT_LEASE_TTL_S", 5, minimum=2, maximum=300,
                                help="etcd lease TTL of a held slot: how fast a standby takes over")
    slot_busy_fence_s: float = env("COLLECTOR_SLOT_FENCE_S", 10.0, minimum=0.0, maximum=600.0,
                                   help="after taking a slot's lease, how long to wait for a "
                                        "walsender still attached to it before terminating it")
