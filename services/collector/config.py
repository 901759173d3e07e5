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
