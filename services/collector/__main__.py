"""python -m services.collector — the collector server (ingest + the delta stream)."""
from __future__ import annotations

import sys

from deltarec.v1 import collector_pb2, collector_pb2_grpc

from services.collector.cdc.service import build_delta_stream
from services.collector.config import CollectorConfig
from services.collector.ingest import Ingestor
from services.collector.server import CollectorServicer
from services.collector.store import CollectorStore
from services.common.boot import Boot
from services.common.readiness import Readiness, store_reachable


def main() -> int:
    boot = Boot.load("collector", CollectorConfig)
    config = boot.config
    engine = boot.database(pool_size=config.grpc_workers)
    ingestor = Ingestor(CollectorStore(engine), config.max_batch, config.max_clock_skew_s)
    service = boot.grpc_service(collector_pb2, "CollectorService")
    delta_stream = None
    if config.cdc_enabled:
        delta_stream = build_delta_stream(config, engine, boot.instance_id(config.replica_id), boot.etcd())
        # Delta streams never finish by themselves: end them as soon as shutdown begins (their
        # consumers get UNAVAILABLE and reconnect elsewhere, and the slot leases are released at
        # once) instead of holding the shutdown for the whole grace period.
        service.on_stopping(delta_stream.close)
    collector_pb2_grpc.add_CollectorServiceServicer_to_server(CollectorServicer(ingestor, delta_stream),
                                                              service.server)
    # NOT_SERVING while Postgres is unreachable (every write would be UNAVAILABLE), back by itself.
    return boot.run(ready_check=Readiness(service).add("postgres", store_reachable(engine)).start)


if __name__ == "__main__":
    sys.exit(main())
