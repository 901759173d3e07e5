"""python -m services.consistency — the consistency server.

Any instance checks (on request and every CONSISTENCY_CHECK_INTERVAL_S); only the holder of
the etcd lease `consistency/repairer` repairs and rolls back.
"""
from __future__ import annotations

import logging
import sys

from deltarec.v1 import consistency_pb2, consistency_pb2_grpc
from services.common.boot import Boot
from services.consistency.config import ConsistencyConfig
from services.consistency.core import ConsistencyCore
from services.consistency.server import ConsistencyServicer

log = logging.getLogger("deltarec.consistency")


def main() -> int:
    boot = Boot.load("consistency", ConsistencyConfig)
    config = boot.config
    engine = boot.database(pool_size=4)
    core = ConsistencyCore(config, engine, boot.etcd(), boot.instance_id(config.instance_id))
    service = boot.grpc_service(consistency_pb2, "ConsistencyService")
    consistency_pb2_grpc.add_ConsistencyServiceServicer_to_server(ConsistencyServicer(core), service.server)
    service.on_shutdown(core.stop)
    log.info("consistency starting", extra={"instance": core.instance_id,
                                            "check_interval_s": config.check_interval_s})
    core.start()
    return boot.run(ready_check=core.wait_ready)


if __name__ == "__main__":
    sys.exit(main())
