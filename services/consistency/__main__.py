"""python -m services.consistency — the consistency server.

Any instance checks (on request and every CONSISTENCY_CHECK_INTERVAL_S); only the holder of
the etcd lease `consistency/repairer` repairs and rolls back.
"""
from __future__ import annotations

import logging
import sys

from deltarec.v1 import consistency_pb2, consistency_pb2_grpc
from services.common import db, logs
from services.common.config import ConfigError, load
from services.common.etcd import Etcd
from services.common.server import GrpcService, run_service
from services.consistency.config import ConsistencyConfig
from services.consistency.core import ConsistencyCore
from services.consistency.server import ConsistencyServicer

log = logging.getLogger("deltarec.consistency")
SERVICE_NAME = consistency_pb2.DESCRIPTOR.services_by_name["ConsistencyService"].full_name


def main() -> int:
    try:
        config = load(ConsistencyConfig)
    except ConfigError as error:
        print(f"consistency: configuration error: {error}", file=sys.stderr)
        return 2
    logs.setup("consistency", config.log_level)
    db.migrate(config.database_url)
    engine = db.make_engine(config.database_url, pool_size=4, application_name="deltarec-consistency")
    etcd = Etcd(config.etcd_endpoint, config.etcd_prefix)
    core = ConsistencyCore(config, engine, etcd)
    service = GrpcService.from_config("consistency", [SERVICE_NAME], config)
    consistency_pb2_grpc.add_ConsistencyServiceServicer_to_server(ConsistencyServicer(core), service.server)
    service.on_shutdown(core.stop)
    service.on_shutdown(etcd.close)
    service.on_shutdown(engine.dispose)
    log.info("consistency starting", extra={"instance": core.instance_id,
                                            "check_interval_s": config.check_interval_s})
    core.start()
    run_service(service, ready_check=core.wait_ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
