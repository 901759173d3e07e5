"""python -m services.collector — the collector server."""
from __future__ import annotations

import logging
import os
import socket
import sys

from deltarec.v1 import collector_pb2, collector_pb2_grpc

from services.collector.config import CollectorConfig
from services.collector.ingest import Ingestor
from services.collector.server import CollectorServicer
from services.collector.store import CollectorStore
from services.common import db, logs
from services.common.config import ConfigError, load
from services.common.server import GrpcService, run_service

log = logging.getLogger("deltarec.collector")


def main() -> int:
    try:
        config = load(CollectorConfig)
    except ConfigError as error:
        print(f"collector: configuration error: {error}", file=sys.stderr)
        return 2
    logs.setup("collector", config.log_level)
    db.migrate(config.database_url)
    engine = db.make_engine(config.database_url, pool_size=config.grpc_workers,
                            application_name="deltarec-collector")
    ingestor = Ingestor(CollectorStore(engine), config.max_batch, config.max_clock_skew_s)
    service = GrpcService.from_config(
        "collector", [collector_pb2.DESCRIPTOR.services_by_name["CollectorService"].full_name], config)
    collector_id = config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
    delta_stream = None
    try:
        from services.collector.cdc.service import build_delta_stream  # added by the CDC work
    except ImportError:
        build_delta_stream = None
    if build_delta_stream is not None:
        delta_stream = build_delta_stream(config, engine, collector_id)
    if delta_stream is not None:
        service.on_shutdown(delta_stream.close)
        # Delta streams never finish by themselves: end them as soon as shutdown begins (their
        # consumers get UNAVAILABLE and reconnect elsewhere, and the slot leases are released at
        # once) instead of holding the shutdown for the whole grace period.
        _close_streams_on_stop(service, delta_stream)
    collector_pb2_grpc.add_CollectorServiceServicer_to_server(CollectorServicer(ingestor, delta_stream),
                                                              service.server)
    service.on_shutdown(engine.dispose)
    run_service(service)
    return 0


def _close_streams_on_stop(service: GrpcService, delta_stream) -> None:
    import threading

    def wait_and_close() -> None:
        service._stopped.wait()
        delta_stream.close()
    threading.Thread(target=wait_and_close, name="cdc-shutdown", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
